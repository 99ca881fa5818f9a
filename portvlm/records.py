"""The records a cell run produces, shared by the suites (which fill them), the runner (which writes them) and the
publisher (which reads them). Pure data: no I/O, no torch.

Statuses, evidence levels and run modes are ``str``-valued enums: a member *is* its string, so JSON, golden files
and ``status == "pass"`` comparisons stay exactly as with bare strings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

SCHEMA = "portvlm.cell-result/1"
BENCHMARK_SCHEMA = "portvlm.benchmark/1"


class StrEnum(str, Enum):
    """A ``str`` that is also an enum member (``enum.StrEnum`` needs 3.11; portvlm runs on 3.10)."""

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__  # Enum hashes the member name: keep "pass" and Status.PASS one set element


class Status(StrEnum):
    """A cell's outcome.

    pass/fail: ran and met/missed its checks; xfail/xpass: against an expected failure; error: the cell crashed
    before its suites could report; timeout; excluded: declared not to run; skipped: could not run here (the reason
    says why) — never counted as a pass.
    """

    PASS = "pass"
    FAIL = "fail"
    XFAIL = "xfail"
    XPASS = "xpass"
    ERROR = "error"
    TIMEOUT = "timeout"
    EXCLUDED = "excluded"
    SKIPPED = "skipped"


class SuiteStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"
    SKIPPED = "skipped"


class Evidence(StrEnum):
    """What a result proves, strongest first: on the arch itself, its policy on other hardware, an image built, none."""

    HARDWARE = "hardware"
    EMULATED = "emulated"
    BUILT = "built"
    NONE = "none"


class CheckStatus(StrEnum):
    """A doctor check's status: ``info`` is shown but ranks as ``ok``; ``warn`` and ``fail`` carry a fix."""

    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "fail"


class Mode(StrEnum):
    """How the runner runs a cell on this host."""

    EXCLUDED = "excluded"
    VENV = "venv"
    PYTHON = "python"
    CONTAINER = "container"
    REFUSE = "refuse"


STATUSES = tuple(Status)
SUITE_STATUSES = tuple(SuiteStatus)
EVIDENCE = (Evidence.HARDWARE, Evidence.EMULATED, Evidence.BUILT, Evidence.NONE)
EVIDENCE_RANK = {Evidence.NONE: 0, Evidence.BUILT: 1, Evidence.EMULATED: 2, Evidence.HARDWARE: 3}
OK_STATUSES = (Status.PASS, Status.XFAIL, Status.EXCLUDED)


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
    status: str  # a SuiteStatus
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    wall_s: float = 0.0
    error: str | None = None  # traceback tail when status == "error"
    reason: str | None = None  # why, when status == "skipped"

    @property
    def ok(self) -> bool:
        return self.status == SuiteStatus.PASS


@dataclass
class CellResult:
    cell: str
    arch: str
    model: str
    stack: dict[str, Any]
    expected: str
    status: str  # a Status
    evidence: str  # an Evidence
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


def overall_status(expected: str, suites: dict[str, SuiteResult]) -> Status:
    """Fold suite outcomes into the cell status, against the declared expectation."""
    if not suites:
        return Status.ERROR
    statuses = {s.status for s in suites.values()}
    failed = bool(statuses & {SuiteStatus.FAIL, SuiteStatus.ERROR})
    if statuses == {SuiteStatus.SKIPPED}:
        return Status.SKIPPED
    if expected == Status.XFAIL:
        return Status.XFAIL if failed else Status.XPASS
    return Status.FAIL if failed else Status.PASS


@dataclass
class CellReport:
    """What the cell's child process reports to the runner (``portvlm.run.cell --out``): typed both ways."""

    evidence: str | None = None  # None: the child could not say (it crashed); the runner's plan stands
    evidence_notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    shims: list[dict[str, Any]] = field(default_factory=list)
    backends: dict[str, Any] = field(default_factory=dict)
    suites: dict[str, SuiteResult] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the child's traceback tail when it crashed before its suites could report

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CellReport:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        suites = {k: suite_from_json(v) for k, v in known.pop("suites", {}).items()}
        return cls(**known, suites=suites)


@dataclass
class BenchmarkRecord:
    """One benchmark run's JSON (``benchmarks/*.py``): where it ran, what its figures prove, what they were held to.

    ``evidence`` is the policy's own match of the host (``portvlm.testing.benchmark.evidence``: ``hardware`` on the
    arch, ``emulated`` elsewhere, with what differed in ``evidence_notes``), never a benchmark's own word; a smoke
    (tiny sizes, wiring only) says so in ``smoke`` and a note. ``tolerances`` are the suites' table entries the rows
    are held to, by name. ``figures`` are the benchmark's own header fields, ``rows`` its measurements.
    """

    benchmark: str
    evidence: str  # an Evidence
    evidence_notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)  # torch, transformers, python, device, gpu
    smoke: bool = False
    world_size: int = 1
    topology: dict[str, Any] | None = None  # portvlm.distributed.launch.Topology.as_dict() for multi-process runs
    tolerances: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {"atol": .., "rtol": ..}
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    date: str = ""
    schema: str = BENCHMARK_SCHEMA

    def to_json(self) -> dict[str, Any]:
        """The file's content: the record's fields, with ``environment`` and ``figures`` at the top level too (the
        readers of files written before this record, ``portvlm.publish.distributed``, read ``gpu``, ``part`` ...)."""
        doc = asdict(self)
        return {**doc.pop("environment"), **doc.pop("figures"), **doc}
