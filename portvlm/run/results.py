"""The per-cell result record (results/<cell-id>.json): schema-versioned, written atomically.

A result is written once per cell run, by the runner in the parent process, so a cell that crashes
or times out is still recorded, and no run ever touches another cell's file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "portvlm.cell-result/1"
EVIDENCE = ("hardware", "emulated", "built", "none")
# pass/fail: ran and met/missed its checks; xfail/xpass: against an expected failure;
# error: the cell crashed before its suites could report; timeout; excluded: declared not to run;
# skipped: could not run here (reason says why) — never counted as a pass.
STATUSES = ("pass", "fail", "xfail", "xpass", "error", "timeout", "excluded", "skipped")
SUITE_STATUSES = ("pass", "fail", "error", "skipped")


@dataclass
class Check:
    """One assertion a suite made, with the measured value and the bound it was held to."""

    name: str
    ok: bool
    detail: str = ""
    value: float | None = None
    bound: float | None = None


@dataclass
class SuiteResult:
    name: str  # "parity" | "training" | "streaming"
    status: str  # one of SUITE_STATUSES
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    wall_s: float = 0.0
    error: str | None = None  # traceback tail when status == "error"
    reason: str | None = None  # why, when status == "skipped"

    @property
    def ok(self) -> bool:
        return self.status == "pass"


@dataclass
class CellResult:
    cell: str
    arch: str
    model: str
    stack: dict[str, Any]
    expected: str
    status: str
    evidence: str
    evidence_notes: list[str] = field(default_factory=list)  # what differed from the real arch/stack
    reason: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)  # the doctor's record
    shims: list[dict[str, Any]] = field(default_factory=list)
    backends: dict[str, Any] = field(default_factory=dict)
    suites: dict[str, SuiteResult] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    started_at: str = ""
    error: str | None = None
    schema: str = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def suite_from_json(d: dict[str, Any]) -> SuiteResult:
    checks = [Check(**c) for c in d.get("checks", [])]
    return SuiteResult(**{**d, "checks": checks})


def result_from_json(d: dict[str, Any]) -> CellResult:
    if d.get("schema") != SCHEMA:
        raise ValueError(f"result schema {d.get('schema')!r} is not {SCHEMA!r}")
    suites = {k: suite_from_json(v) for k, v in d.get("suites", {}).items()}
    return CellResult(**{**d, "suites": suites})


def overall_status(expected: str, suites: dict[str, SuiteResult]) -> str:
    """Fold suite outcomes into the cell status, against the declared expectation."""
    if not suites:
        return "error"
    statuses = {s.status for s in suites.values()}
    failed = bool(statuses & {"fail", "error"})
    if statuses == {"skipped"}:
        return "skipped"
    if expected == "xfail":
        return "xfail" if failed else "xpass"
    return "fail" if failed else "pass"


def write_result(result: CellResult, directory: str | os.PathLike) -> Path:
    """Write results/<cell>.json atomically (temp file + rename); other cells' files are never touched."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{result.cell}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{result.cell}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(result.to_json(), fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
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
