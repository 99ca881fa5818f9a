"""`portvlm matrix`: validate matrix.yaml and print the expanded cells (thin shell over load/expand/select)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from portvlm.errors import MatrixError
from portvlm.matrix.expand import cells_to_json, expand, select
from portvlm.matrix.load import cli_matrix
from portvlm.matrix.schema import OUTCOMES, Cell, Matrix

COLUMNS = ("cell", "runtime", "torch", "transformers", "expected", "reason")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `portvlm matrix`; 0 when the matrix is valid, 2 on bad input."""
    args = _parser().parse_args(argv)
    try:
        matrix = cli_matrix(args.file)
    except MatrixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    unknown = _unknown_filters(matrix, args)
    if unknown:
        print(f"error: {unknown}", file=sys.stderr)
        return 2
    cells = select(expand(matrix), arch=args.arch, model=args.model, stack=args.stack, ci=True if args.ci else None)
    if args.json:
        print(json.dumps(cells_to_json(cells), indent=2, ensure_ascii=False))
        return 0
    rows = [_row(cell) for cell in cells]
    if sys.stdout.isatty() and _print_rich(rows):
        pass
    else:
        print(_plain_table(rows))
    print(summary(matrix, cells))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portvlm matrix", description="Validate matrix.yaml and print the expanded cells."
    )
    parser.add_argument(
        "--file", metavar="PATH", help="matrix file (default: $PORTVLM_MATRIX, else the packaged one)"
    )
    parser.add_argument("--json", action="store_true", help="print the cells as JSON (the CI job matrix format)")
    parser.add_argument("--arch", action="append", metavar="ID", help="only this arch (repeatable)")
    parser.add_argument("--model", action="append", metavar="ID", help="only this model (repeatable)")
    parser.add_argument("--stack", action="append", metavar="ID", help="only this stack (repeatable)")
    parser.add_argument("--ci", action="store_true", help="only the cells of stacks in the CI selection (ci: true)")
    return parser


def _unknown_filters(matrix: Matrix, args: argparse.Namespace) -> str | None:
    """A one-line complaint about a filter naming an id the matrix does not declare, or None."""
    for kind, wanted, items in (
        ("arch", args.arch, matrix.archs),
        ("model", args.model, matrix.models),
        ("stack", args.stack, matrix.stacks),
    ):
        known = [item.id for item in items]
        for value in wanted or ():
            if value not in known:
                return f"unknown {kind} {value!r} in --{kind}; use one declared in {matrix.path} (known: {', '.join(known)})"
    return None


def _row(cell: Cell) -> tuple[str, ...]:
    return (
        cell.id,
        cell.arch.runtime,
        cell.stack.torch + "+" + cell.stack.torch_variant,
        cell.stack.transformers,
        cell.expected,
        cell.reason or "",
    )


def _plain_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max([len(column)] + [len(row[i]) for row in rows]) for i, column in enumerate(COLUMNS)]
    widths[-1] = 0  # the reason column is last and not padded

    def line(values) -> str:
        return "  ".join(value.ljust(width) for value, width in zip(values, widths, strict=True)).rstrip()

    return "\n".join([line(COLUMNS)] + [line(row) for row in rows])


def _print_rich(rows: list[tuple[str, ...]]) -> bool:
    """Print a rich table when rich is installed; False (print nothing) when it is not."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    table = Table(*COLUMNS, box=None, pad_edge=False, header_style="bold")
    styles = {"pass": "green", "xfail": "yellow", "excluded": "dim"}
    for row in rows:
        table.add_row(*row, style=styles.get(row[4]))
    Console().print(table)
    return True


def summary(matrix: Matrix, cells: tuple[Cell, ...]) -> str:
    """`54 cells (6 archs × 3 models, 15 stacks) from matrix.yaml: 51 pass, 0 xfail, 3 excluded; 24 in CI`."""
    counts = Counter(cell.expected for cell in cells)
    outcomes = ", ".join(f"{counts.get(outcome, 0)} {outcome}" for outcome in OUTCOMES)
    archs = len({cell.arch.id for cell in cells})
    models = len({cell.model.id for cell in cells})
    stacks = len({cell.stack.id for cell in cells})
    in_ci = sum(1 for cell in cells if cell.stack.ci and cell.expected != "excluded")
    return (
        f"{len(cells)} cells ({archs} archs × {models} models, {stacks} stacks) from {matrix.path}: "
        f"{outcomes}; {in_ci} runnable in the CI selection"
    )


if __name__ == "__main__":
    sys.exit(main())
