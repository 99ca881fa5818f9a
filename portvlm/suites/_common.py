"""Helpers the three suites share: the patched-model context, comparisons against the tolerance table, vision-tower
calls that read every version's return type, and the suite's record builder."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from portvlm.records import Check, SuiteResult, SuiteStatus
from portvlm.testing import Comparison, check_from, compare, logits_of, tolerances  # noqa: F401 - the suites' names

# The attention implementation the model-to-be-patched is built with. The reference is always "eager".
PATCHED_BUILD_ATTN = "sdpa"


class SuiteSkip(Exception):
    """Raised inside a suite when it cannot run here; becomes status "skipped" with this reason."""


def torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = tolerances._dtype_name(dtype)
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    return tolerances._dtype_name(dtype)


@contextlib.contextmanager
def patched(model, ctx):
    """``portvlm.patch(model, arch=ctx.arch_id, dtype=ctx.dtype, matrix=ctx.matrix)``, with the context's forced backends.

    A forced backend (negative controls, explicit cells) replaces the policy's choice on the handle's
    ``AttentionState``, which the installed attention reads at call time; an undeclared name raises ``KeyError``.
    """
    import portvlm
    from portvlm.backends import get_backend

    with portvlm.patch(model, arch=ctx.arch_id, dtype=torch_dtype(ctx.dtype), matrix=ctx.matrix) as handle:
        for name in ("vision_backend", "text_backend"):
            forced = getattr(ctx, name)
            if forced is not None:
                get_backend(forced)  # declared (built in or registered), else KeyError naming the known ones
                setattr(handle.state, name, forced)
        yield handle


def report_summary(handle) -> dict:
    """The patch report as JSON-able data (``Report.to_dict``)."""
    return handle.report.to_dict()


def tol(ctx, direction: str, backend: str | None = None, output: str = "text") -> tolerances.Budget:
    """This cell's budget (``tolerances.budget``): the table's, times the family's declared scale for text outputs."""
    from portvlm import models

    return tolerances.budget(ctx.device_kind, ctx.dtype, backend or ctx.vision_backend, direction,
                             family=models.by_id(ctx.model_id), output=output)


def vision_features(model_id: str, tower, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Run the vision tower of tiny model ``model_id`` once: what the language model would get (plus deepstack)."""
    from portvlm import models
    from portvlm.shims import model_io

    return model_io.vision_features(models.by_id(model_id).layout, tower, pixel_values, grid_thw)


def resolve_paths(model):
    """``portvlm.shims.layer_paths.resolve`` (the shim owns where each version keeps its parts)."""
    from portvlm.shims.layer_paths import resolve

    return resolve(model)


class Timer:
    def __init__(self):
        self.t = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] = round(self.t.get(name, 0.0) + time.perf_counter() - t0, 4)


@dataclass
class Recorder:
    """Collects checks and figures; ``result()`` folds them into a SuiteResult (fail if any check failed)."""

    name: str
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "", value: float | None = None, bound: float | None = None) -> bool:
        return self.add(Check(name=name, ok=bool(ok), detail=detail, value=None if value is None else float(value),
                              bound=None if bound is None else float(bound)))

    def add(self, check: Check) -> bool:
        from portvlm.terminal import child_progress

        self.checks.append(check)
        child_progress(f"{self.name}: {check.name} {'ok' if check.ok else 'FAIL'}", minor=True)
        return check.ok

    def result(self) -> SuiteResult:
        status = SuiteStatus.PASS if self.checks and all(c.ok for c in self.checks) else SuiteStatus.FAIL
        return SuiteResult(name=self.name, status=status, figures=self.figures, checks=self.checks)
