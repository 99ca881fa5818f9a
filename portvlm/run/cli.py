"""The run commands: `portvlm run` (the runner), and the two entry points it and nox start as processes:
`python -m portvlm.run.cell` (one cell's suites, the runner's child) and `python -m portvlm.run.env` (a cell venv).
"""

from __future__ import annotations

import argparse
import sys

from portvlm.errors import MatrixError
from portvlm.run.results import LOCAL_RESULTS, PUBLISHED_RESULTS
from portvlm.run.runner import Interrupted, print_summary, run_many
from portvlm.suites import DEFAULT_SUITES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="portvlm run", description=f"run matrix cells and write <results>/<cell>.json "
                                f"(default {LOCAL_RESULTS}/, untracked; --publish: the tracked {PUBLISHED_RESULTS}/)")
    p.add_argument("--arch")
    p.add_argument("--model")
    p.add_argument("--stack")
    p.add_argument("--ci", action="store_true", help="only the stacks marked ci: true")
    p.add_argument("--matrix", default=None)
    p.add_argument("--results", default=None, metavar="DIR",
                   help=f"where results go (default: {LOCAL_RESULTS}/, which git ignores)")
    p.add_argument("--publish", action="store_true",
                   help=f"write the project's tracked {PUBLISHED_RESULTS}/ (what `nox -s publish` renders; CI does this)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--fast", action="store_true", help="skip the slowest checks (recorded as skipped)")
    p.add_argument("--suites", default=DEFAULT_SUITES)
    p.add_argument("--require-hardware", action="store_true",
                   help="fail instead of emulating an arch this host does not have")
    p.add_argument("--python", help="run cells with this interpreter instead of building venvs")
    p.add_argument("--image", help="run cells inside this container image")
    p.add_argument("--host-arch", help="override host detection (tests, device runs)")
    a = p.parse_args(argv)
    if a.publish and a.results not in (None, PUBLISHED_RESULTS):
        p.error(f"--publish writes {PUBLISHED_RESULTS}/; drop --results {a.results} (or --publish)")
    a.results = PUBLISHED_RESULTS if a.publish else (a.results or LOCAL_RESULTS)
    from portvlm.matrix import cli_matrix, cli_matrix_path, expand, select

    matrix_path = cli_matrix_path(a.matrix)  # --matrix, else $PORTVLM_MATRIX: children get it by --matrix
    try:
        matrix = cli_matrix(a.matrix)
    except MatrixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cells = select(expand(matrix), arch=a.arch, model=a.model, stack=a.stack, ci=True if a.ci else None)
    if not cells:
        print(f"error: no cell matches arch={a.arch} model={a.model} stack={a.stack}; `portvlm matrix` lists them",
              file=sys.stderr)
        return 2
    if a.publish:
        print(f"publishing: results go to the tracked {PUBLISHED_RESULTS}/ (git shows them as changes; "
              "`nox -s publish` renders SUPPORT.md and site/ from them)")
    try:
        results = run_many(cells, results_dir=a.results, matrix_path=matrix_path, host_arch=a.host_arch, archs=matrix.archs,
                           require_hardware=a.require_hardware, python=a.python, image=a.image,
                           timeout=a.timeout, fast=a.fast, suites=a.suites)
    except Interrupted as stop:
        print_summary(stop.results, a.results)
        return 130  # 128 + SIGINT, as a shell reports a Ctrl-C
    code = print_summary(results, a.results)
    if not a.publish and a.results == LOCAL_RESULTS:
        print(f"({LOCAL_RESULTS}/ is yours and untracked: `portvlm publish --results {LOCAL_RESULTS} --out "
              f"{LOCAL_RESULTS}` renders a table of it; `--publish` writes the project's {PUBLISHED_RESULTS}/)")
    return code
