"""``portvlm doctor``: verdicts with reasons, not just versions.

``collect(probes) -> EnvInfo`` reads the machine through an injectable :class:`Probes` (tests fake every fault);
``diagnose(info, matrix) -> Report`` is pure and says, per model family, OK / WARN / FAIL, which matrix cell this
is, which attention backend portvlm would choose (and why every other lost), which shims apply, and the fix.
``portvlm doctor [--json] [--strict] [--matrix PATH] [--model ID]``; the JSON is documented in docs/doctor.md.
"""

from __future__ import annotations

from typing import Any

from portvlm.doctor.collect import SCHEMA, EnvInfo, collect
from portvlm.doctor.diagnose import FAIL, OK, WARN, BackendChoice, Check, FamilyReport, Report, Shim, diagnose
from portvlm.platform.probes import CommandResult, Probes

__all__ = [
    "SCHEMA", "EnvInfo", "Report", "Check", "FamilyReport", "BackendChoice", "Shim", "Probes", "CommandResult",
    "OK", "WARN", "FAIL", "collect", "diagnose", "load_matrix_or_reason", "record", "main",
]


def load_matrix_or_reason(path: str | None = None):
    """``(matrix, None)`` or ``(None, reason)``: a broken or missing matrix degrades the report, never crashes it."""
    try:
        from portvlm.matrix import load_matrix
    except Exception as exc:
        return None, f"portvlm.matrix.load_matrix not importable: {type(exc).__name__}: {exc}"
    try:
        return load_matrix(path), None
    except Exception as exc:
        return None, str(exc)


def record(probes: Probes | None = None, matrix=None) -> dict[str, Any]:
    """The ``portvlm doctor --json`` record: what every results JSON embeds as ``environment``."""
    matrix_error = None
    if matrix is None:
        matrix, matrix_error = load_matrix_or_reason()
    return diagnose(collect(probes), matrix, matrix_error=matrix_error).to_json()


def main(argv: list[str] | None = None, probes: Probes | None = None, stdout=None) -> int:
    """``portvlm doctor`` (portvlm.doctor.cli)."""
    from portvlm.doctor.cli import main as doctor_main

    return doctor_main(argv, probes, stdout)
