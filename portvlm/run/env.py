"""Build (or reuse) the local virtual environment a cell runs in, with uv.

One venv per resolved environment key, shared by every cell that resolves to it (a cpu cell and an
emulated sm70 cell on the same transformers reuse one venv). uv hard-links from its cache, so a new
env costs seconds once the wheels are cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from portvlm.errors import EnvironmentBuildError
from portvlm.suites import DEFAULT_SUITES
from portvlm.wheels import CELL_REQUIREMENTS, configured_index, find_links_dirs, torch_index, uv_bin

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_RECIPE = "2"


@dataclass(frozen=True)
class EnvSpec:
    """What one cell environment holds."""

    python: str  # interpreter to create the venv from ("3.11" or a path)
    torch: str  # "2.13.0+cpu": an exact version incl. local build tag
    transformers: str
    extras: tuple[str, ...] = ()  # further requirement strings (xformers==…)
    notes: tuple[str, ...] = field(default=(), compare=False)
    excludes: tuple[str, ...] = ()  # packages left out of resolution (a declared override with install: none)
    overrides: tuple[str, ...] = ()  # requirements that replace upstream's pin of their package (declared overrides)

    @classmethod
    def for_stack(cls, stack, *, python: str | None = None, torch: str | None = None) -> EnvSpec:
        """The env of a matrix ``Stack`` (its python and torch build unless given), with its declared overrides."""
        return cls(
            python or stack.python,
            torch or f"{stack.torch}+{stack.torch_variant}",
            stack.transformers,
            excludes=tuple(o.package for o in stack.overrides if o.excluded),
            overrides=tuple(o.install for o in stack.overrides if not o.excluded),
            notes=tuple(o.describe() for o in stack.overrides),
        )

    @property
    def key(self) -> str:
        tail = "-".join(e.replace("==", "") for e in self.extras)
        tail += "".join(f"-no-{p}" for p in self.excludes)
        if self.overrides:
            tail += "-ovr" + hashlib.sha256("\n".join(self.overrides).encode()).hexdigest()[:8]
        base = f"py{self.python}-torch{self.torch.replace('+', '')}-tf{self.transformers}"
        return f"{base}-{tail.lstrip('-')}" if tail else base

    def requirements(self) -> list[str]:
        return [f"torch=={self.torch}", f"transformers=={self.transformers}", *self.extras, *CELL_REQUIREMENTS]

    def resolution(self) -> list[str]:
        """What changes resolution beyond :meth:`requirements` (part of the env's stamp)."""
        return [*(f"exclude {p}" for p in self.excludes), *(f"override {r}" for r in self.overrides)]


def override_args(excludes, overrides, directory: Path) -> list[str]:
    """uv's ``--excludes`` / ``--overrides`` arguments for declared overrides, their files written in ``directory``."""
    args: list[str] = []
    for flag, lines in (("--excludes", excludes), ("--overrides", overrides)):
        if lines:
            path = directory / f"{flag.strip('-')}.txt"
            path.write_text("\n".join(lines) + "\n")
            args += [flag, str(path)]
    return args


def local_paths() -> dict[str, str]:
    """This machine's roots and the placeholders records that travel (results, drift reports) name them by."""
    return {str(envs_root()): "<envs>", str(REPO_ROOT): "<repo>"}


def redact_paths(text: str, paths: dict[str, str] | None = None) -> str:
    """``text`` (JSON) with every local root replaced by its placeholder, longest root first."""
    for path, placeholder in sorted((local_paths() if paths is None else paths).items(), key=lambda kv: -len(kv[0])):
        text = text.replace(json.dumps(path)[1:-1], placeholder)  # as the path appears inside a JSON string
    return text


def envs_root() -> Path:
    return Path(os.environ.get("PORTVLM_ENVS", REPO_ROOT / ".portvlm" / "envs"))


def env_python(path: Path) -> Path:
    return path / "bin" / "python"


def _stamp(spec: EnvSpec) -> str:
    # The recipe version is part of the stamp: bump it when how envs are built changes.
    return hashlib.sha256("\n".join([ENV_RECIPE, *spec.requirements(), *spec.resolution()]).encode()).hexdigest()


def is_ready(spec: EnvSpec) -> bool:
    """The venv for ``spec`` exists and was built from the same requirements (``ensure_env`` would reuse it)."""
    path = envs_root() / spec.key
    stamp = path / ".portvlm-spec"
    return stamp.exists() and stamp.read_text().strip() == _stamp(spec) and env_python(path).exists()


def ensure_env(spec: EnvSpec, *, quiet: bool = True) -> Path:
    """Return the python of a venv that satisfies ``spec``, creating it if missing. Idempotent."""
    root = envs_root()
    path = root / spec.key
    stamp = path / ".portvlm-spec"
    wanted = _stamp(spec)
    if is_ready(spec):
        return env_python(path)
    root.mkdir(parents=True, exist_ok=True)
    uv = uv_bin()
    env = {**os.environ, "VIRTUAL_ENV": str(path)}
    env.pop("PYTHONPATH", None)
    q = ["-q"] if quiet else []
    python = str(env_python(path))
    cmd_venv = [uv, "venv", *q, "--allow-existing", "-p", spec.python, str(path)]
    cmd_install = [uv, "pip", "install", *q, "-p", python]
    index = configured_index()  # the user's pip/uv index (uv does not read pip's config); none: uv's own default
    if index:
        cmd_install += ["--default-index", index]
    for fl in find_links_dirs():
        cmd_install += ["--find-links", fl]
    if "+cpu" in spec.torch and not any(Path(fl).glob(f"torch-{spec.torch}-*.whl") for fl in find_links_dirs()):
        # A +cpu torch is not on the default index: PyTorch's own (or its mirror) is searched next to it.
        cmd_install += ["--extra-index-url", torch_index("cpu"), "--index-strategy", "unsafe-best-match"]
    path.mkdir(parents=True, exist_ok=True)
    cmd_install += override_args(spec.excludes, spec.overrides, path)  # kept in the env: it says how it was built
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


def ensure_envs(specs: list[EnvSpec], jobs: int = 3, say=print) -> list[Path]:
    """:func:`ensure_env` for each spec, ``jobs`` at a time (uv downloads and links in parallel; its cache locks);
    the pythons in ``specs`` order. Says which it builds and how long each took; the first failure raises."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.monotonic()
    todo = [s for s in specs if not is_ready(s)]
    if todo:
        say(f"building {len(todo)} of {len(specs)} environments, {jobs} at a time: {', '.join(s.key for s in todo)}")

    def one(spec: EnvSpec) -> Path:
        path = ensure_env(spec)
        if spec in todo:
            say(f"  built {spec.key} ({time.monotonic() - t0:.0f}s since start)")
        return path

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, specs))


def child_command(python: str, cell_id: str, out: str, *, matrix: str | None = None, evidence: str | None = None,
                  suites: str = DEFAULT_SUITES, fast: bool = False, in_container: bool = False) -> list[str]:
    """The one command that runs a cell's suites in a child process (``portvlm.run.cell``), venv or container."""
    cmd = [python, "-m", "portvlm.run.cell", "--cell", cell_id, "--out", out, "--suites", suites]
    if matrix:
        cmd += ["--matrix", matrix]
    if evidence:
        cmd += ["--evidence", str(evidence)]
    if fast:
        cmd.append("--fast")
    if in_container:
        cmd.append("--in-container")
    return cmd


def container_command(cell, image: str, tmp: str, *, matrix_path: str | None, evidence: str | None, fast: bool,
                      suites: str) -> list[str] | None:
    """The engine command that runs the cell's child inside ``image``, ``tmp`` mounted at /results (None: no engine).

    The container half of a cell's environment (the venv half is :func:`ensure_env`). A ``--matrix`` file is
    copied into ``tmp`` so the child inside reads the same matrix as the parent.
    """
    from portvlm import containers  # lazy: engine code only when a container is asked for
    from portvlm.matrix import load_matrix

    engine = containers.find_engine()
    if engine is None:
        return None
    spec = containers.find_spec(load_matrix(matrix_path), image)
    os.chmod(tmp, 0o777)  # the image runs as a non-root user
    inner = None
    if matrix_path:
        shutil.copyfile(matrix_path, os.path.join(tmp, "matrix.yaml"))
        inner = "/results/matrix.yaml"
    gpu = () if cell.arch.vendor == "cpu" else containers.gpu_run_flags(engine, cell.arch.vendor)
    child = child_command("python", cell.id, "/results/partial.json", matrix=inner, evidence=evidence, suites=suites,
                          fast=fast, in_container=True)
    from portvlm.terminal import PROGRESS_ENV

    # The child inside reports its suites as the venv child does (the runner reads the engine's output).
    return engine.cmd("run", "--rm", "-v", f"{tmp}:/results", "-e", f"{PROGRESS_ENV}=1", *gpu, spec.tag, *child)


def host_torch_spec() -> str:
    """The torch this host can install: the CPU build of the project's CPU lane."""
    return os.environ.get("PORTVLM_HOST_TORCH", "2.13.0+cpu")


def env_main(argv: list[str] | None = None) -> int:
    """``python -m portvlm.run.env``: build or reuse a cell venv and print its python."""
    import argparse

    from portvlm.errors import MatrixError

    p = argparse.ArgumentParser(prog="python -m portvlm.run.env", description="build/reuse a cell venv; prints its python")
    p.add_argument("--stack", help="a matrix.yaml stack id: its pins and declared overrides")
    p.add_argument("--transformers", help="a transformers version (the overrides matrix.yaml declares for it apply)")
    p.add_argument("--torch", default=None, help=f"torch build (default: the stack's, else {host_torch_spec()})")
    p.add_argument("--python", default=None)
    p.add_argument("--extra", action="append", default=[])
    p.add_argument("--matrix", default=None)
    a = p.parse_args(argv)
    if not a.stack and not a.transformers:
        p.error("give --stack or --transformers")
    try:
        spec = _env_spec(a)
    except (KeyError, MatrixError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in spec.notes:  # a declared override is never silent
        print(f"note: {note}", file=sys.stderr)
    try:
        print(ensure_env(spec))
    except EnvironmentBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _env_spec(a) -> EnvSpec:
    """The env ``python -m portvlm.run.env`` builds: a declared stack, or a transformers version on the host torch
    with the overrides the matrix declares for that version (its first stack that pins it)."""
    from dataclasses import replace

    from portvlm.matrix import load_matrix

    host_py = f"{sys.version_info.major}.{sys.version_info.minor}"
    matrix = load_matrix(a.matrix)
    if a.stack:
        stack = matrix.stack(a.stack)
        if a.transformers and a.transformers != stack.transformers:
            raise KeyError(f"--stack {a.stack} pins transformers {stack.transformers}, not {a.transformers}; give one")
        spec = EnvSpec.for_stack(stack, python=a.python, torch=a.torch)
    else:
        declared = next((s for s in matrix.stacks if s.transformers == a.transformers and s.overrides), None)
        spec = EnvSpec(a.python or host_py, a.torch or host_torch_spec(), a.transformers)
        if declared is not None:
            spec = EnvSpec.for_stack(declared, python=spec.python, torch=spec.torch)
    return replace(spec, extras=tuple(a.extra))


if __name__ == "__main__":  # nox starts this module as a process
    sys.exit(env_main())
