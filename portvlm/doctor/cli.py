"""`portvlm doctor [--json] [--strict] [--matrix PATH] [--model ID]` (thin shell over collect + diagnose)."""

from __future__ import annotations

import argparse
import json
import sys

from portvlm.doctor import collect, diagnose, load_matrix_or_reason
from portvlm.platform.probes import Probes


def main(argv: list[str] | None = None, probes: Probes | None = None, stdout=None) -> int:
    """``portvlm doctor``: exit 0; with ``--strict`` exit 1 when anything FAILs; 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="portvlm doctor", description="diagnose this environment: verdicts with reasons and fixes")
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
    from portvlm.matrix import cli_matrix_path

    matrix, matrix_error = load_matrix_or_reason(cli_matrix_path(args.matrix))
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
        if report.verdict == "FAIL" and not args.strict:  # a newcomer reads FAIL and expects a failing exit code
            print("note: exit 0 (a diagnosis, not a test); --strict exits 1 when anything FAILs", file=sys.stderr)
    return report.exit_code(args.strict)

