"""The one door through which detection and the doctor touch the machine: fake it in tests.

Modelled on ``torch/utils/collect_env.py``'s injectable ``run_lambda``: every import, command, environment read,
file read and package-metadata lookup goes through a :class:`Probes` object, so a test can describe a V100 with
a cu130 torch, a missing ``nvidia-smi`` or an xformers built for another torch without owning any of them.
Nothing here raises: a command that is missing or times out is ``None``, a file that is absent is ``None``.
"""

from __future__ import annotations

import importlib
import os
import platform as _platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class CommandResult:
    """What a command printed; ``rc`` is its exit status."""

    rc: int
    stdout: str = ""
    stderr: str = ""


def run_command(argv: Sequence[str], timeout: float = 10.0) -> CommandResult | None:
    """Run ``argv`` without a shell; ``None`` when the program is missing, cannot start or times out."""
    if not argv or shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return CommandResult(proc.returncode, proc.stdout or "", proc.stderr or "")


def distribution_version(name: str) -> str | None:
    """Installed version of a distribution from its metadata (no import); ``None`` when absent."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except Exception:  # PackageNotFoundError, or a broken dist-info
        return None


def distribution_requires(name: str) -> tuple[str, ...] | None:
    """``Requires-Dist`` lines of an installed distribution; ``None`` when absent."""
    from importlib import metadata

    try:
        return tuple(metadata.requires(name) or ())
    except Exception:
        return None


def read_text(path: str) -> str | None:
    """A small text file's contents, ``None`` when unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(1 << 16)
    except OSError:
        return None


def host_facts() -> dict[str, Any]:
    """OS, Python and CPU facts from the standard library (cheap, no subprocess)."""
    return {
        "os": _platform.platform(),
        "system": _platform.system(),
        "machine": _platform.machine(),
        "python": _platform.python_version(),
        "python_implementation": _platform.python_implementation(),
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "processor": _platform.processor() or None,
    }


@dataclass(frozen=True)
class Probes:
    """Everything detection may ask of the machine. Replace any field with a fake in tests.

    ``import_module`` may raise (that is how "torch import error" is faked); every caller catches it.
    """

    import_module: Callable[[str], ModuleType | Any] = importlib.import_module
    run: Callable[[Sequence[str]], CommandResult | None] = run_command
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    version_of: Callable[[str], str | None] = distribution_version
    requires_of: Callable[[str], tuple[str, ...] | None] = distribution_requires
    read_text: Callable[[str], str | None] = read_text
    host: Callable[[], dict[str, Any]] = host_facts


def describe_error(exc: BaseException) -> str:
    """``"ImportError: libcudart.so.13: cannot open shared object file"`` — one line, bounded."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def try_import(probes: Probes, name: str) -> tuple[Any | None, str | None]:
    """``(module, None)`` or ``(None, reason)``; never raises (a broken package can raise anything on import)."""
    try:
        return probes.import_module(name), None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit/OSError/RuntimeError from a broken wheel are reasons too
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == name.split(".")[0]:
            return None, f"{name} not installed"
        return None, f"import {name} failed: {describe_error(exc)}"
