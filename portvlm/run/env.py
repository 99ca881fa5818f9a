"""Build (or reuse) the local virtual environment a cell runs in, with uv.

One venv per resolved environment key, shared by every cell that resolves to it (a cpu cell and an
emulated sm70 cell on the same transformers reuse one venv). uv hard-links from its cache, so a new
env costs seconds once the wheels are cached.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from portvlm.errors import EnvironmentBuildError

REPO_ROOT = Path(__file__).resolve().parents[2]
# The cell envs' own needs: portvlm's runtime dependencies (pyproject.toml; a test keeps the two in step — the
# images `pip check` them), numpy (torch warns without it) and the test runner (the torch tests run there).
CELL_REQUIREMENTS = ("numpy", "pyyaml", "packaging", "jsonschema", "rich", "jinja2", "uv",
                     "pytest", "pytest-xdist", "hypothesis")
# A CPU torch wheel is not on PyPI (its +cpu builds live on PyTorch's own index). A machine that keeps
# wheels locally (PIP_FIND_LINKS, as CI images often do) is used first.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ENV_RECIPE = "2"


@dataclass(frozen=True)
class EnvSpec:
    """What one cell environment holds."""

    python: str  # interpreter to create the venv from ("3.11" or a path)
    torch: str  # "2.13.0+cpu": an exact version incl. local build tag
    transformers: str
    extras: tuple[str, ...] = ()  # further requirement strings (xformers==…)
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> str:
        tail = "-".join(e.replace("==", "") for e in self.extras)
        base = f"py{self.python}-torch{self.torch.replace('+', '')}-tf{self.transformers}"
        return f"{base}-{tail}" if tail else base

    def requirements(self) -> list[str]:
        return [f"torch=={self.torch}", f"transformers=={self.transformers}", *self.extras, *CELL_REQUIREMENTS]


def envs_root() -> Path:
    return Path(os.environ.get("PORTVLM_ENVS", REPO_ROOT / ".portvlm" / "envs"))


def _find_links() -> list[str]:
    raw = os.environ.get("PORTVLM_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS") or ""
    return [p for p in raw.split() if p]


def _uv() -> str:
    uv = shutil.which("uv")
    if uv:
        return uv
    try:
        from uv import find_uv_bin  # the PyPI wheel of uv ships this

        return find_uv_bin()
    except ImportError as exc:
        raise EnvironmentBuildError("uv is not installed: run `pip install uv` (cell environments are built with it)") from exc


def env_python(path: Path) -> Path:
    return path / "bin" / "python"


def ensure_env(spec: EnvSpec, *, quiet: bool = True) -> Path:
    """Return the python of a venv that satisfies ``spec``, creating it if missing. Idempotent."""
    root = envs_root()
    path = root / spec.key
    stamp = path / ".portvlm-spec"
    # The recipe version is part of the stamp: bump it when how envs are built changes.
    wanted = hashlib.sha256("\n".join([ENV_RECIPE, *spec.requirements()]).encode()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == wanted and env_python(path).exists():
        return env_python(path)
    root.mkdir(parents=True, exist_ok=True)
    uv = _uv()
    env = {**os.environ, "VIRTUAL_ENV": str(path)}
    env.pop("PYTHONPATH", None)
    q = ["-q"] if quiet else []
    python = str(env_python(path))
    cmd_venv = [uv, "venv", *q, "--allow-existing", "-p", spec.python, str(path)]
    cmd_install = [uv, "pip", "install", *q, "-p", python]
    for fl in _find_links():
        cmd_install += ["--find-links", fl]
    if "+cpu" in spec.torch and not any(Path(fl).glob(f"torch-{spec.torch}-*.whl") for fl in _find_links()):
        cmd_install += ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"]
    cmd_install += spec.requirements()
    cmd_editable = [uv, "pip", "install", *q, "-p", python, "--no-deps", "-e", str(REPO_ROOT)]
    for cmd in (cmd_venv, cmd_install, cmd_editable):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EnvironmentBuildError(
                f"building env {spec.key} failed at `{' '.join(cmd[:4])} …`:\n{proc.stderr.strip()[-2000:]}"
            )
    stamp.write_text(wanted + "\n")
    return env_python(path)


def host_torch_spec() -> str:
    """The torch this host can install: the CPU build of the project's CPU lane."""
    return os.environ.get("PORTVLM_HOST_TORCH", "2.13.0+cpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m portvlm.run.env", description="build/reuse a cell venv; prints its python")
    p.add_argument("--transformers", required=True)
    p.add_argument("--torch", default=host_torch_spec())
    p.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    p.add_argument("--extra", action="append", default=[])
    a = p.parse_args(argv)
    try:
        print(ensure_env(EnvSpec(a.python, a.torch, a.transformers, tuple(a.extra))))
    except EnvironmentBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
