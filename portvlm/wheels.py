"""Where wheels come from, and what a cell environment installs: the one home for package sources.

portvlm names no package index of its own. The default index is the user's (``UV_DEFAULT_INDEX``,
``UV_INDEX_URL``, ``PIP_INDEX_URL``, uv.toml, ``pip config``); when they configured none, pip and uv use their own
defaults, and portvlm passes nothing. Local wheel directories (``PORTVLM_FIND_LINKS`` / ``PIP_FIND_LINKS``, as CI
images keep them) come first. The one index portvlm must know is PyTorch's per-variant one (``+cpu``, ``+cu126``,
``+rocm7.2`` builds are not on the default index); ``PORTVLM_TORCH_INDEX`` points it at a mirror.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from portvlm.errors import EnvironmentBuildError

# PyTorch publishes each CUDA / ROCm / CPU build under its own index (pytorch.org "Get started").
TORCH_INDEX = "https://download.pytorch.org/whl/{variant}"
TORCH_INDEX_ENV = "PORTVLM_TORCH_INDEX"  # a mirror, with {variant}

# The cell envs' own needs: portvlm's runtime dependencies (pyproject.toml; a test keeps the two in step — the
# images `pip check` them), numpy (torch warns without it) and the test runner (the torch tests run there).
CELL_REQUIREMENTS = ("numpy", "pyyaml", "packaging", "jsonschema", "rich", "jinja2", "uv",
                     "pytest", "pytest-xdist", "hypothesis")

# The trainer libraries the integration tests run against (pyproject's `integrations` extra; a unit test keeps the two
# in step). Pinned: the newest CI stack (transformers 5.24.0, torch 2.13.0+cpu) resolves them; pillow feeds the
# Qwen2.5-VL image processor. No torchvision: transformers 5.x's Qwen2.5-VL video processor needs it, and the tests
# send images only (examples/_offline.py).
INTEGRATION_REQUIREMENTS = ("peft==0.21.2", "trl==1.16.0", "accelerate==1.16.0", "pillow==12.3.0")
# Set in the stack whose venv gets them: there a missing library fails the integration tests instead of skipping them.
REQUIRE_INTEGRATIONS_ENV = "PORTVLM_REQUIRE_INTEGRATIONS"


def integration_requirements(stack, ci_stacks) -> tuple[str, ...]:
    """``INTEGRATION_REQUIREMENTS`` for the newest CI stack (by transformers version), ``()`` for the others."""
    from portvlm.versions import parse

    newest = max(ci_stacks, key=lambda s: parse(s.transformers), default=None)
    return INTEGRATION_REQUIREMENTS if newest is not None and stack.id == newest.id else ()


def torch_index(variant: str, environ: Mapping[str, str] | None = None) -> str:
    """PyTorch's index for one build variant ("cpu", "cu126", "rocm7.2"), or the mirror ``$PORTVLM_TORCH_INDEX`` names."""
    environ = os.environ if environ is None else environ
    return (environ.get(TORCH_INDEX_ENV) or TORCH_INDEX).format(variant=variant)


def find_links_dirs(environ: Mapping[str, str] | None = None) -> list[str]:
    """Local wheel directories: ``$PORTVLM_FIND_LINKS``, else pip's ``$PIP_FIND_LINKS`` (space-separated)."""
    environ = os.environ if environ is None else environ
    raw = environ.get("PORTVLM_FIND_LINKS") or environ.get("PIP_FIND_LINKS") or ""
    return [p for p in raw.split() if p]


def _pip_config(run: Callable = subprocess.run) -> dict[str, str]:
    """``pip config list`` as ``{"global.index-url": "…"}`` (empty when pip is missing or says nothing)."""
    try:
        proc = run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in (proc.stdout or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip("'\"")
    return out


def _uv_toml_index(paths: tuple[Path, ...]) -> str | None:
    """The default index a uv.toml declares (``[[index]] default = true``, or the legacy ``index-url``)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: no TOML reader in the standard library; env vars and pip config still count
        return None
    for path in paths:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for index in data.get("index", []) or []:
            if isinstance(index, dict) and index.get("default") and index.get("url"):
                return index["url"]
        pip = data.get("pip", {}) if isinstance(data.get("pip"), dict) else {}
        url = data.get("index-url") or pip.get("index-url")
        if url:
            return url
    return None


def _uv_toml_paths(environ: Mapping[str, str]) -> tuple[Path, ...]:
    if environ.get("UV_CONFIG_FILE"):
        return (Path(environ["UV_CONFIG_FILE"]),)
    home = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    dirs = [Path(p) for p in (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":") if p]
    return (home / "uv" / "uv.toml", *(d / "uv" / "uv.toml" for d in dirs), Path("/etc/uv/uv.toml"))


def configured_index(environ: Mapping[str, str] | None = None, *, run: Callable = subprocess.run) -> str | None:
    """The default package index the user configured for uv or pip; ``None`` when they set none (tools' default)."""
    environ = os.environ if environ is None else environ
    for name in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        if environ.get(name):
            return environ[name]
    url = _uv_toml_index(_uv_toml_paths(environ))
    if url:
        return url
    config = _pip_config(run)
    for key in ("global.index-url", "install.index-url", "download.index-url", ":env:.index-url"):
        if config.get(key):
            return config[key]
    return None


def uv_bin() -> str:
    """The uv executable: on PATH, else the one the ``uv`` wheel ships."""
    uv = shutil.which("uv")
    if uv:
        return uv
    try:
        from uv import find_uv_bin  # the PyPI wheel of uv ships this

        return find_uv_bin()
    except ImportError as exc:
        raise EnvironmentBuildError("uv is not installed: run `pip install uv` (cell environments are built with it)") from exc
