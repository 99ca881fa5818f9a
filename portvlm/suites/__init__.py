"""What a cell runs against its model family on its stack: numeric parity, a training step, a streaming smoke.

Each suite is ``run(ctx) -> portvlm.records.SuiteResult`` with checks (measured value and bound) and figures
(max errors, losses, cache sizes, times). The reference is always an *unpatched* fp32 eager model with the same
state dict, independent of portvlm; the model under test is ``portvlm.patch(model, arch=ctx.arch_id)`` in
``ctx.dtype``. Nothing here imports torch until a suite runs.
"""

from __future__ import annotations

import importlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SUITES = ("parity", "training", "streaming", "from_pretrained")
DEFAULT_SUITES = ",".join(SUITES)  # what a cell runs unless told otherwise


@dataclass
class SuiteContext:
    """Where and how a cell runs its suites."""

    model_id: str  # "qwen2_5vl" | "qwen3vl" | "llava" | "llava_mla"
    arch_id: str  # matrix arch id whose policy applies ("cpu", "sm70", "sm90", "gfx942", ...)
    device: str = "cpu"
    dtype: Any = "float32"  # torch dtype or its name
    vision_backend: str | None = None  # force a vision backend (negative controls); None = the arch's policy
    text_backend: str | None = None
    evidence: str = "hardware"  # "hardware" | "emulated" (an arch's policy on another device)
    fast: bool = False  # skip the slow parts (FSDP over 2 processes), each skip recorded with its reason
    seed: int = 0
    real_arch_id: str | None = None  # arch of the device actually used; tolerance kind follows it when emulated
    matrix: Any = None  # the Matrix (or its path) whose arch policies portvlm.patch applies; None: the packaged one
    # portvlm.check, for the from_pretrained suite. Handed in by whoever runs the suites (the cell child, tests):
    # the checker builds on the suites' inputs and comparisons, so the suites cannot import it (no folder cycle).
    checker: Callable | None = field(default=None, repr=False)

    @property
    def device_kind(self) -> str:
        """Tolerance device kind: the real device's (an emulated run rounds like the hardware it runs on)."""
        from portvlm.testing.tolerances import device_kind

        if self.device == "cpu":
            return "cpu"
        return device_kind(self.real_arch_id or self.arch_id, self.device)


def run_suite(ctx: SuiteContext, name: str):
    """Run one suite; its exception becomes status "error" (traceback tail), a ``SuiteSkip`` becomes "skipped"."""
    from portvlm.records import SuiteResult, SuiteStatus

    t0 = time.perf_counter()
    try:
        from portvlm.models import tiny
        from portvlm.suites._common import SuiteSkip

        reasons = tiny.is_available(ctx.model_id)
        if reasons:
            result = SuiteResult(name=name, status=SuiteStatus.SKIPPED, reason="; ".join(reasons))
        else:
            module = importlib.import_module(f"portvlm.suites.{name}")
            try:
                result = module.run(ctx)
            except SuiteSkip as skip:
                result = SuiteResult(name=name, status=SuiteStatus.SKIPPED, reason=str(skip))
            result.figures.update(tiny.family_figures(ctx.model_id, ctx.dtype))  # e.g. llava_mla's KV bytes/token
    except Exception:  # noqa: BLE001 - a suite's crash is its result, never the cell's
        tail = traceback.format_exc()[-4000:]
        result = SuiteResult(name=name, status=SuiteStatus.ERROR, error=tail)
    result.wall_s = round(time.perf_counter() - t0, 3)
    return result


def run_suites(ctx: SuiteContext, names=SUITES) -> dict:
    """Run the named suites in order; ``{name: SuiteResult}``."""
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise KeyError(f"unknown suite(s) {unknown}; known: {', '.join(SUITES)}")
    from portvlm.terminal import child_progress

    out = {}
    for i, name in enumerate(names, 1):
        child_progress(f"suite {name} ({i}/{len(names)})")  # the runner streams these to the person waiting
        out[name] = run_suite(ctx, name)
        child_progress(f"suite {name}: {out[name].status} in {out[name].wall_s:.1f}s")
    return out


__all__ = ["DEFAULT_SUITES", "SUITES", "SuiteContext", "run_suite", "run_suites"]
