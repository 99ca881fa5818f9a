"""`portvlm publish [--results DIR] [--out DIR] [--matrix PATH]` (thin shell over write_all)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from portvlm.publish import write_all


def main(argv: list[str] | None = None) -> int:
    """`portvlm publish [--results DIR] [--out DIR] [--matrix PATH]`."""
    p = argparse.ArgumentParser(prog="portvlm publish", description="render SUPPORT.md, site/ and badges from results")
    p.add_argument("--results", default="results", help="folder of <cell-id>.json results (default: results)")
    p.add_argument("--out", default=".", help="where SUPPORT.md and site/ go (default: .)")
    p.add_argument("--matrix", default=None, help="matrix.yaml to lay the table out from (default: the usual lookup)")
    a = p.parse_args(argv)
    from portvlm.errors import MatrixError

    if is_tracked(a.out):
        print(f"publishing: rewriting the tracked SUPPORT.md and site/ under {a.out} from {a.results}/ "
              "(git shows them as changes; a local report: --results portvlm-results --out portvlm-results)")
    try:
        from portvlm.matrix import cli_matrix_path

        written, table = write_all(a.results, cli_matrix_path(a.matrix), a.out)
    except MatrixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    badges = [p.platform for p in table.platforms]
    print(f"generated from {table.n_results} results ({len(table.slots)} cells): wrote SUPPORT.md, "
          f"site/index.html, badges {', '.join(badges)} under {a.out}")
    for summary in table.platforms:
        print(f"  {summary.platform:<7} {summary.message}")
    for problem in table.problems:
        print(f"note: {problem}", file=sys.stderr)
    return 0


def is_tracked(out: str) -> bool:
    """``out`` is this checkout's root, whose SUPPORT.md and site/ git tracks."""
    from portvlm.run.env import REPO_ROOT

    return Path(out).resolve() == REPO_ROOT.resolve() and (REPO_ROOT / "SUPPORT.md").exists()
