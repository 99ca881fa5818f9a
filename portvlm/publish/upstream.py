"""The support table's "newest upstream" row and badge, from the latest drift report (results/drift/, ``nox -s drift``).

Green when that run found no shim broken, red when upstream broke one, grey when the lane never ran. Pure apart from
reading the reports (``portvlm.drift.report.read_reports``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NEVER_RUN = "never run"


@dataclass(frozen=True)
class Upstream:
    """What the latest drift run tested and found (or that there was none)."""

    status: str  # "ok" | "broken" | NEVER_RUN
    transformers: str | None = None
    torch: str | None = None
    verified: bool | None = None
    verified_range: str | None = None
    tested_on: str | None = None  # YYYY-MM-DD
    cells: str = ""  # "2/2 CPU cells pass"
    problems: tuple[str, ...] = ()  # the report's "broken" reasons
    probe_changes: int = 0
    symbol_changes: int = 0
    report: str | None = None  # the Markdown report's file name under results/drift/

    @property
    def message(self) -> str:
        if self.status == NEVER_RUN:
            return NEVER_RUN
        return f"transformers {self.transformers} {'ok' if self.status == 'ok' else 'broken'}"

    @property
    def color(self) -> str:
        return {"ok": "brightgreen", "broken": "red"}.get(self.status, "lightgrey")

    @property
    def summary(self) -> str:
        """One line for the table: the verdict, the cells, what changed."""
        if self.status == NEVER_RUN:
            return "the drift lane has not run: `nox -s drift` tests the newest releases"
        head = "no shim broke" if self.status == "ok" else f"upstream broke a shim ({len(self.problems)} problem(s))"
        bits = [head, self.cells] if self.cells else [head]
        if self.probe_changes:
            bits.append(f"{self.probe_changes} probe answer(s) changed")
        if self.symbol_changes:
            bits.append(f"{self.symbol_changes} upstream name(s) changed")
        return "; ".join(bits)


def from_report(data: dict, md_name: str | None) -> Upstream:
    """The row of one drift report record."""
    new = data.get("newest") or {}
    cells = data.get("cells") or []
    passed = sum(1 for c in cells if c.get("status") in ("pass", "xfail", "excluded"))
    return Upstream(
        status="ok" if data.get("status") == "ok" else "broken",
        transformers=new.get("transformers"),
        torch=new.get("torch"),
        verified=bool(new.get("verified")),
        verified_range=new.get("verified_range"),
        tested_on=str(data.get("tested_at", ""))[:10] or None,
        cells=f"{passed}/{len(cells)} CPU cells pass" if cells else "",
        problems=tuple(str(p) for p in data.get("broken") or ()),
        probe_changes=len(data.get("probe_changes") or ()),
        symbol_changes=len(data.get("symbol_changes") or ()),
        report=md_name,
    )


def latest(results_dir: str | Path) -> tuple[Upstream, Path | None, list[str]]:
    """The newest drift report's row, its JSON path (None: never run), and reports that could not be read."""
    from portvlm.drift.report import read_reports

    reports, problems = read_reports(results_dir)
    if not reports:
        return Upstream(NEVER_RUN), None, problems
    path, data = reports[-1]
    md = path.with_suffix(".md")
    return from_report(data, md.name if md.exists() else None), path, problems
