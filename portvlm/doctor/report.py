"""The doctor's records: environment checks, backend choices, shims, per-family verdicts, the report (JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from portvlm.doctor.collect import SCHEMA, EnvInfo
from portvlm.records import CheckStatus, StrEnum


class Verdict(StrEnum):
    """A model family's (and the report's) verdict."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


OK, WARN, FAIL = Verdict.OK, Verdict.WARN, Verdict.FAIL
RANK = {CheckStatus.OK: 0, CheckStatus.INFO: 0, CheckStatus.WARN: 1, CheckStatus.FAIL: 2}
VERDICT = {0: OK, 1: WARN, 2: FAIL}


@dataclass(frozen=True)
class Check:
    """One environment-wide finding with a :class:`~portvlm.records.CheckStatus`; ``fix`` is a command or an action."""

    id: str
    status: CheckStatus
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class BackendChoice:
    """The attention backend portvlm would choose for one role, and why every other candidate lost."""

    role: str  # "vision" | "text"
    priority: tuple[str, ...]
    dtype: str
    head_dim: int
    chosen: str | None = None
    lost: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None  # no backend usable, or portvlm.backends unavailable


@dataclass(frozen=True)
class Shim:
    name: str
    detail: str
    source: str  # "declared" (portvlm.shims listing) | "predicted" (from the transformers version)
    label: str = ""  # a few words for the one-screen view


@dataclass(frozen=True)
class FamilyReport:
    model: str  # matrix model id: "qwen2_5vl"
    family: str  # transformers model_type: "qwen2_5_vl"
    verdict: str  # OK | WARN | FAIL
    cell: str | None = None  # matched cell id
    match: str = "none"  # "exact" (a stack pins the installed transformers) | "nearest" | "none"
    stack: str | None = None
    expected: str | None = None  # the matched cell's declared outcome: pass | xfail | excluded
    differences: tuple[str, ...] = ()  # installed vs the matched stack
    reasons: tuple[str, ...] = ()
    fix: str | None = None
    dtype: str | None = None
    vision: BackendChoice | None = None
    text: BackendChoice | None = None
    shims: tuple[Shim, ...] = ()


@dataclass(frozen=True)
class Report:
    env: EnvInfo
    arch: str | None = None  # the matrix arch whose policy applies
    arch_match: str = "none"  # "exact" | "nearest" | "none"
    evidence: str = "hardware"  # what a cell run here would record: "hardware" | "emulated"
    evidence_note: str | None = None
    device_arch: str | None = None  # the device's own arch id, declared or not ("sm90", "sm110", "gfx1100")
    declared: bool | None = None  # matrix.yaml declares device_arch (None: no matrix to ask)
    add_to_matrix: str | None = None  # the archs: entry to add for an undeclared device arch (YAML)
    checks: tuple[Check, ...] = ()
    families: tuple[FamilyReport, ...] = ()
    matrix: str | None = None  # path of the matrix used
    matrix_error: str | None = None
    verdict: str = OK

    def to_json(self) -> dict[str, Any]:
        """The documented record (docs/doctor.md; portvlm/data/doctor.schema.json)."""
        return {
            "schema": SCHEMA,
            "verdict": self.verdict,
            "arch": {"id": self.arch, "match": self.arch_match, "evidence": self.evidence,
                     "evidence_note": self.evidence_note, "device": self.device_arch, "declared": self.declared,
                     "add_to_matrix": self.add_to_matrix},
            "matrix": {"path": self.matrix, "error": self.matrix_error},
            "checks": [asdict(c) for c in self.checks],
            "families": [asdict(f) for f in self.families],
            "environment": self.env.to_json(),
        }

    def exit_code(self, strict: bool = False) -> int:
        """0, or 1 under ``--strict`` when anything FAILs."""
        return 1 if strict and self.verdict == FAIL else 0
