"""The per-cell result record (results/<cell-id>.json): schema-versioned, written atomically.

A result is written once per cell run, by the runner in the parent process, so a cell that crashes
or times out is still recorded, and no run ever touches another cell's file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# The records themselves live in portvlm.records (the suites fill them without importing the runner).
from portvlm.records import (  # noqa: E402,F401 - re-exported: results are read and written through this module
    EVIDENCE,
    SCHEMA,
    STATUSES,
    SUITE_STATUSES,
    CellResult,
    Check,
    SuiteResult,
    overall_status,
    result_from_json,
    suite_from_json,
)

# Where a user's run writes (untracked, .gitignore'd); the tracked results/ only when publishing is asked for.
LOCAL_RESULTS = "portvlm-results"
PUBLISHED_RESULTS = "results"


def write_result(result: CellResult, directory: str | os.PathLike) -> Path:
    """Write results/<cell>.json atomically (temp file + rename); other cells' files are never touched.

    Local roots (the venvs, the checkout) are written as ``<envs>`` / ``<repo>``: the record travels.
    """
    from portvlm.run.env import redact_paths

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{result.cell}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{result.cell}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(redact_paths(json.dumps(result.to_json(), indent=2, sort_keys=True, default=str)) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_results(directory: str | os.PathLike) -> list[CellResult]:
    """Every results/*.json that parses; unreadable files are skipped, never deleted."""
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            out.append(result_from_json(json.loads(path.read_text())))
        except (ValueError, TypeError, KeyError):
            continue
    return out
