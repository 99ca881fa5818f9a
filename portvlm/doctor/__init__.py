"""``portvlm doctor``: verdicts with reasons, not just versions.

``collect(probes) -> EnvInfo`` reads the machine through an injectable :class:`Probes` (tests fake every fault);
``diagnose(info, matrix) -> Report`` is pure and says, per model family, OK / WARN / FAIL, which matrix cell this
is, which attention backend portvlm would choose (and why every other lost), which shims apply, and the fix.
``portvlm doctor [--json] [--strict] [--matrix PATH] [--model ID]``; the JSON is documented in docs/doctor.md.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    """``portvlm doctor``: exit 0; with ``--strict`` exit 1 when anything FAILs; 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="portvlm doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the schema-versioned record (docs/doctor.md)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any check or model family FAILs")
    parser.add_argument("--matrix", metavar="PATH", help="matrix.yaml to match cells against")
    parser.add_argument("--model", action="append", metavar="ID", help="only these model ids (repeatable)")
    parser.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    stdout = stdout or sys.stdout
    matrix, matrix_error = load_matrix_or_reason(args.matrix)
    if matrix is not None and args.model:
        from dataclasses import replace

        unknown = sorted(set(args.model) - {m.id for m in matrix.models})
        if unknown:
            print(f"error: unknown model {', '.join(unknown)}; one of: {', '.join(m.id for m in matrix.models)}",
                  file=sys.stderr)
            return 2
        matrix = replace(matrix, models=tuple(m for m in matrix.models if m.id in args.model))
    report = diagnose(collect(probes), matrix, matrix_error=matrix_error)
    if args.json:
        stdout.write(json.dumps(report.to_json(), indent=2, sort_keys=False, default=str) + "\n")
    else:
        from portvlm.doctor.render import write

        write(report, stdout, colour=False if args.no_color else None)
    return report.exit_code(args.strict)


if __name__ == "__main__":
    sys.exit(main())
