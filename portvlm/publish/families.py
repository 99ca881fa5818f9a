"""The support table's "families" section and badge, from the generic sweep (results/families/, written by
``python -m portvlm.models.generic --out results/families/sweep-tf<version>.json``).

Every packed-image (``cu_seqlens``) VLM family of the swept transformers is one row: declared or not, and whether
portvlm's generic path passes its parity checks (vision attention, packed text rows), fails them, or could not be
built from the family's config alone. The newest transformers version swept wins. Pure apart from reading the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from portvlm.shims import versions

SUBDIR = "families"
BADGE_LABEL = "portvlm families"


@dataclass(frozen=True)
class FamilyRow:
    model_type: str
    declared: bool
    status: str  # "passes" | "fails" | "not built" | "not applicable"
    vision: str
    text: str
    errors: str  # "vision 1e-07 · text 7e-07"
    why: str  # the first note, one line


@dataclass(frozen=True)
class Sweep:
    transformers: str | None
    source: str | None  # the JSON's file name under results/families/
    rows: tuple[FamilyRow, ...] = ()

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    @property
    def declared(self) -> int:
        return sum(r.declared for r in self.rows)

    @property
    def message(self) -> str:
        """``"5 declared · 21/32 pass generic"`` (or ``never run``)."""
        if not self.rows:
            return "never run"
        return f"{self.declared} declared · {self.count('passes')}/{len(self.rows)} pass generic"

    @property
    def color(self) -> str:
        if not self.rows:
            return "lightgrey"
        declared_bad = any(r.declared and r.status != "passes" for r in self.rows)
        return "red" if declared_bad else "brightgreen"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:160]


def latest(results_dir) -> tuple[Sweep, list[str]]:
    """The sweep of the newest transformers version under ``results_dir/families``, and problems reading it."""
    folder = Path(results_dir) / SUBDIR
    problems: list[str] = []
    found = []
    for path in sorted(folder.glob("sweep-*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            version = versions.parse(str(data["transformers"]))
            found.append((version, path, data))
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{SUBDIR}/{path.name}: unreadable sweep ({type(exc).__name__}: {exc})")
    if not found:
        return Sweep(None, None), problems
    _, path, data = max(found, key=lambda item: item[0])
    rows = []
    for r in data.get("rows", []):
        errors = " · ".join(f"{part} {r[f'{part}_err']:.0e}" for part in ("vision", "text")
                            if r.get(f"{part}_err") is not None)
        rows.append(FamilyRow(r["model_type"], bool(r.get("declared")), r.get("status", "not built"),
                              r.get("vision", "not built"), r.get("text", "not built"), errors or "—",
                              _one_line(r["notes"][0]) if r.get("notes") else ""))
    order = {"passes": 0, "fails": 1, "not applicable": 2, "not built": 3}
    rows.sort(key=lambda r: (not r.declared, order.get(r.status, 9), r.model_type))
    return Sweep(str(data["transformers"]), path.name, tuple(rows)), problems


def endpoint(sweep: Sweep) -> dict:
    """The shields.io endpoint document of the families badge."""
    return {"schemaVersion": 1, "label": BADGE_LABEL, "message": sweep.message, "color": sweep.color}
