"""The support table as data: one row per model × stack, one column per arch. Pure: no I/O, no rendering.

Every expanded cell of the matrix gets a slot, with or without a result, so coverage gaps stay visible:
a cell nobody ran shows "not run" with evidence "none"; a cell the matrix excludes shows its declared reason.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portvlm.records import EVIDENCE, STATUSES, CellResult, Status, result_from_json

NOT_RUN = "not run"
# Statuses that come with an explanation shown in the cell.
EXPLAINED = ("fail", "xfail", "xpass", "error", "timeout", "excluded", "skipped")
# One glyph + colour per evidence level; the legend and both renderings read from here.
EVIDENCE_STYLE: dict[str, dict[str, str]] = {
    "hardware": {"glyph": "●", "label": "hardware", "short": "hw", "help": "ran on that arch"},
    "emulated": {"glyph": "◐", "label": "emulated", "short": "emu", "help": "that arch's policy run on other hardware"},
    "built": {"glyph": "◇", "label": "built", "short": "built", "help": "environment resolved/built only"},
    "none": {"glyph": "○", "label": "none", "short": "none", "help": "no evidence: not run"},
}
STATUS_STYLE: dict[str, dict[str, str]] = {
    "pass": {"icon": "✅", "help": "ran and met every check"},
    "fail": {"icon": "❌", "help": "ran and missed a check"},
    "xfail": {"icon": "🟡", "help": "failed, as the matrix expects"},
    "xpass": {"icon": "❗", "help": "passed, though the matrix expects a failure"},
    "error": {"icon": "💥", "help": "crashed before its suites could report"},
    "timeout": {"icon": "⏱️", "help": "ran out of time"},
    "excluded": {"icon": "⛔", "help": "declared not to run"},
    "skipped": {"icon": "⏭️", "help": "could not run here"},
    NOT_RUN: {"icon": "⬜", "help": "in the matrix, no result yet"},
}
# Where the key numbers live in a result (first present wins). Parity: the parity suite's figures, else the
# largest measured value among its checks. Step time: the training suite's figures, else the cell's timings.
PARITY_FIGURES = ("max_abs_err", "max_parity_err", "max_err")
STEP_FIGURES = ("step_time_s", "step_s", "train_step_s")
# Families with a compressed KV cache (llava_mla) report KV bytes per token, MHA vs theirs, in every suite.
KV_FIGURE = "kv_bytes_per_token"
# A run whose machine had more runnable work than CPUs (1-minute load average / CPU count) times nothing useful: its
# step time is left out of the table (the result file keeps it, with the load).
BUSY_LOAD_PER_CPU = 1.0


@dataclass(frozen=True)
class Slot:
    """One table cell: what the matrix declares there and what its result (if any) says."""

    cell_id: str
    arch: str
    model: str
    stack: str
    expected: str  # the matrix's expectation: pass | xfail | excluded
    status: str  # a result status, or NOT_RUN
    evidence: str  # one of EVIDENCE
    reason: str | None = None  # shown for fail/xfail/error/... and for excluded cells
    parity_err: float | None = None
    step_s: float | None = None
    kv_bytes: tuple[int, int, int] | None = None  # (MHA, MLA, rank): KV cache bytes per token, where reported
    has_result: bool = False
    evidence_notes: tuple[str, ...] = ()
    host_load: tuple[float, int] | None = None  # (1-minute load average, CPU count) while the cell ran

    @property
    def busy(self) -> bool:
        """The machine was loaded beyond its CPU count while the cell ran: its timings are noise."""
        return self.host_load is not None and self.host_load[0] > BUSY_LOAD_PER_CPU * max(1, self.host_load[1])

    @property
    def explained(self) -> bool:
        return self.status in EXPLAINED and bool(self.reason)


@dataclass(frozen=True)
class Row:
    model: str
    stack: str
    slots: tuple[Slot | None, ...]  # one per arch column; None where the matrix has no such cell


@dataclass(frozen=True)
class PlatformSummary:
    """What one badge says: a platform groups arch columns (sm80+ is sm80 and sm90)."""

    platform: str
    archs: tuple[str, ...]
    total: int  # cells expected to run (excluded cells left out)
    passed: int
    counts: dict[str, int]  # status -> count over the expected-to-run cells
    passed_by_evidence: dict[str, int]

    @property
    def message(self) -> str:
        if self.total == 0:
            return "no cells"
        if self.counts.get(NOT_RUN, 0) == self.total:
            return f"not run ({self.total} cells)"
        parts = [f"{self.passed}/{self.total} pass"]
        for status in ("fail", "error", "timeout", "xpass", "xfail", "skipped", NOT_RUN):  # every cell accounted for
            if self.counts.get(status):
                parts.append(f"{self.counts[status]} {status}")
        for level in ("emulated", "built"):
            if self.passed_by_evidence.get(level):
                parts.append(f"{self.passed_by_evidence[level]} {level}")
        return " · ".join(parts)

    @property
    def color(self) -> str:
        if self.total == 0 or self.counts.get(NOT_RUN, 0) == self.total:
            return "lightgrey"
        if any(self.counts.get(s) for s in ("fail", "error", "timeout")):
            return "red"
        if self.counts.get("xpass"):
            return "orange"
        if self.passed + self.counts.get("xfail", 0) == self.total:
            return "brightgreen" if self.passed_by_evidence.get("hardware", 0) == self.passed else "green"
        return "yellow"  # nothing failed, but some cells are not run or skipped


@dataclass(frozen=True)
class Table:
    archs: tuple[str, ...]
    rows: tuple[Row, ...]
    platforms: tuple[PlatformSummary, ...]
    n_results: int  # results that matched a matrix cell
    problems: tuple[str, ...] = ()  # unreadable files, results for cells outside the matrix, ...

    @property
    def slots(self) -> tuple[Slot, ...]:
        return tuple(s for r in self.rows for s in r.slots if s is not None)


# Badge platforms: the arch ids each one covers.
PLATFORMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cpu", ("cpu",)),
    ("sm70", ("sm70",)),
    ("sm80+", ("sm80", "sm90")),
    ("gfx90a", ("gfx90a",)),
    ("gfx942", ("gfx942",)),
)


def platform_groups(archs) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """:data:`PLATFORMS` in column order, plus a badge of its own for every arch none of them names (a newly declared
    arch, e.g. sm100, shows as ``not run`` instead of vanishing from the summary)."""
    named = {a: (name, members) for name, members in PLATFORMS for a in members}
    groups = []
    for arch in archs:
        group = named.get(arch, (arch, (arch,)))
        if group not in groups:
            groups.append(group)
    return tuple(groups) + tuple(g for g in PLATFORMS if g not in groups)


@dataclass
class LoadedResults:
    """Results read from a directory, plus every file that could not be used and why."""

    by_cell: dict[str, CellResult] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # cell id -> the file it came from
    problems: list[str] = field(default_factory=list)


def read_results(directory: str | os.PathLike) -> LoadedResults:
    """Read results/*.json; a missing directory, unreadable or invalid file is noted, never raised."""
    loaded = LoadedResults()
    directory = Path(directory)
    if not directory.is_dir():
        loaded.problems.append(f"{directory.name}/: no results directory")
        return loaded
    for path in sorted(directory.glob("*.json")):
        try:
            result = result_from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            loaded.problems.append(f"{path.name}: unreadable result ({type(exc).__name__}: {_one_line(exc)})")
            continue
        reasons = result_reasons(result, path)
        if reasons:
            loaded.problems.append(f"{path.name}: ignored ({'; '.join(reasons)})")
            continue
        loaded.by_cell[result.cell] = result
        loaded.files[result.cell] = path
    return loaded


def result_reasons(result: CellResult, path: Path) -> list[str]:
    """Why a parsed result cannot be shown; empty means it can."""
    reasons = []
    if result.status not in STATUSES:
        reasons.append(f"status {result.status!r} is not one of {', '.join(STATUSES)}")
    if result.evidence not in EVIDENCE:
        reasons.append(f"evidence {result.evidence!r} is not one of {', '.join(EVIDENCE)}")
    if path.stem != result.cell:
        reasons.append(f"file name does not match its cell {result.cell!r}")
    return reasons


def build_table(
    cells, results: LoadedResults, archs: tuple[str, ...] | None = None, stacks: tuple[str, ...] | None = None
) -> Table:
    """Lay expanded cells and their results out as model × stack rows and arch columns.

    ``archs``/``stacks`` give the declared column and row order (the matrix's); first-seen order otherwise.
    """
    cells = tuple(cells)
    archs = tuple(archs) if archs is not None else tuple(dict.fromkeys(c.arch.id for c in cells))
    stacks = tuple(stacks or ()) + tuple(c.stack.id for c in cells)
    model_order = {m: i for i, m in enumerate(dict.fromkeys(c.model.id for c in cells))}
    stack_order = {s: i for i, s in enumerate(dict.fromkeys(stacks))}

    slots: dict[tuple[str, str, str], Slot] = {}
    for cell in cells:
        slots[(cell.model.id, cell.stack.id, cell.arch.id)] = make_slot(cell, results.by_cell.get(cell.id))

    keys = sorted({(m, s) for m, s, _ in slots}, key=lambda k: (model_order[k[0]], stack_order[k[1]]))
    rows = tuple(Row(m, s, tuple(slots.get((m, s, a)) for a in archs)) for m, s in keys)

    known = {c.id for c in cells}
    problems = list(results.problems)
    problems += [f"{cid}.json: result for a cell not in the matrix" for cid in sorted(set(results.by_cell) - known)]
    platforms = tuple(summarise(name, members, slots.values()) for name, members in platform_groups(archs))
    n_results = sum(1 for cid in results.by_cell if cid in known)
    return Table(archs, rows, platforms, n_results, tuple(problems))


def make_slot(cell, result: CellResult | None) -> Slot:
    """One table cell from a matrix cell and its result (or the lack of one)."""
    base = dict(cell_id=cell.id, arch=cell.arch.id, model=cell.model.id, stack=cell.stack.id, expected=cell.expected)
    if result is None:
        status = Status.EXCLUDED if cell.expected == Status.EXCLUDED else NOT_RUN
        reason = cell.reason if cell.expected != "pass" else None
        return Slot(**base, status=status, evidence="none", reason=reason)
    return Slot(
        **base,
        status=result.status,
        evidence=result.evidence,
        reason=result_reason(result, cell),
        parity_err=parity_error(result),
        step_s=step_time(result),
        kv_bytes=kv_bytes(result),
        has_result=True,
        evidence_notes=tuple(str(n) for n in result.evidence_notes),
        host_load=host_load(result),
    )


def host_load(result: CellResult) -> tuple[float, int] | None:
    """``(load average, CPUs)`` the runner recorded beside the timings, or None (results from before it did)."""
    load, cpus = _finite(result.timings.get("host_load_1m")), _finite(result.timings.get("host_cpus"))
    return (load, int(cpus)) if load is not None and cpus else None


def format_step(slot: Slot) -> str:
    """The step time as the table shows it: left out when the machine was busy, marked when its load is unknown."""
    if slot.step_s is None:
        return "—"
    if slot.host_load is None:
        return f"{format_seconds(slot.step_s)} (load not recorded)"
    if slot.busy:
        load, cpus = slot.host_load
        return f"— (busy machine: load {load:.1f} on {cpus} CPUs)"
    return format_seconds(slot.step_s)


def result_reason(result: CellResult, cell) -> str | None:
    """The explanation shown for a non-pass result: its own reason, else a failing suite's, else the matrix's."""
    if result.status not in EXPLAINED:
        return None
    if result.reason:
        return _one_line(result.reason)
    for name, suite in sorted(result.suites.items()):
        if suite.status in ("fail", "error", "skipped"):
            failing = [c for c in suite.checks if not c.ok]
            if suite.reason:
                return f"{name}: {_one_line(suite.reason)}"
            if failing:
                c = failing[0]
                detail = c.detail or (f"{_num(c.value)} > {_num(c.bound)}" if c.value is not None else "failed")
                return f"{name}: {c.name}: {_one_line(detail)}"
            if suite.error:
                return f"{name}: {_last_line(suite.error)}"
    if result.error:
        return _last_line(result.error)
    return cell.reason


def parity_error(result: CellResult) -> float | None:
    """The largest parity error the result reports, or None."""
    suite = result.suites.get("parity")
    if suite is None:
        return None
    for key in PARITY_FIGURES:
        value = _finite(suite.figures.get(key))
        if value is not None:
            return value
    values = [v for v in (_finite(c.value) for c in suite.checks) if v is not None]
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values) if values else None


def step_time(result: CellResult) -> float | None:
    """Seconds per training step, or None."""
    suite = result.suites.get("training")
    sources = ([suite.figures] if suite is not None else []) + [result.timings]
    for figures in sources:
        for key in STEP_FIGURES:
            value = _finite(figures.get(key))
            if value is not None:
                return value
    return None


def kv_bytes(result: CellResult) -> tuple[int, int, int] | None:
    """``(MHA, MLA, rank)`` KV bytes per token from the first suite that reports them, or None."""
    for _, suite in sorted(result.suites.items()):
        fig = suite.figures.get(KV_FIGURE)
        if isinstance(fig, dict) and all(isinstance(fig.get(k), int) for k in ("mha", "mla", "rank")):
            return fig["mha"], fig["mla"], fig["rank"]
    return None


def format_kv(value: tuple[int, int, int] | None) -> str:
    """``KV 512→192 B/tok (r=8)``, or "" when the result reports no KV figure."""
    if value is None:
        return ""
    mha, mla, rank = value
    return f"KV {mha}→{mla} B/tok (r={rank})"


def summarise(platform: str, archs: tuple[str, ...], slots) -> PlatformSummary:
    """Badge numbers for one platform; excluded cells do not count against it."""
    mine = [s for s in slots if s.arch in archs and s.status != "excluded"]
    counts: dict[str, int] = {}
    passed_by: dict[str, int] = {}
    for s in mine:
        counts[s.status] = counts.get(s.status, 0) + 1
        if s.status == Status.PASS:
            passed_by[s.evidence] = passed_by.get(s.evidence, 0) + 1
    return PlatformSummary(platform, archs, len(mine), counts.get("pass", 0), counts, passed_by)


def format_number(value: float | None) -> str:
    return _num(value)


def _num(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e4:
        return f"{value:.1e}"
    return f"{value:.3g}"


def format_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    if value < 1:
        return f"{value * 1000:.3g} ms"
    return f"{value:.3g} s"


def _finite(value: Any) -> float | None:
    """A number from a figure, or None; NaN/inf are kept (a NaN parity error must show, not vanish)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
