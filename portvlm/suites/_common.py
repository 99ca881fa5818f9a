"""Helpers the three suites share: the patched-model context, comparisons against the tolerance table, vision-tower
calls that read every version's return type, and the suite's record builder."""

from __future__ import annotations

import contextlib
import inspect
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
    """``portvlm.patch(model, arch=ctx.arch_id, dtype=ctx.dtype)`` with the context's forced backends, if any.

    Integration point with ``portvlm.shims.patch`` (owner: shims engineer). Backends forced by the context
    (negative controls, explicit cells) are passed as ``vision_backend=`` / ``text_backend=`` when ``patch``
    accepts them; a forced backend that ``patch`` cannot take is an error, never silently dropped.
    """
    if ctx.patcher is not None:  # tests inject a patcher (e.g. to exercise the harness itself)
        with ctx.patcher(model, ctx) as handle:
            yield handle
        return
    # A broken install (portvlm.patch not importable) is the suite's error, never a skip: let it raise.
    import portvlm.shims.patch as patch_module

    patch = patch_module.patch
    params = inspect.signature(patch).parameters
    kwargs: dict[str, Any] = {}
    if "dtype" in params:
        kwargs["dtype"] = torch_dtype(ctx.dtype)
    if ctx.matrix is not None:  # the cell's own matrix: the policy the cell declares is the one patched in
        kwargs["matrix"] = ctx.matrix
    forced = {n: getattr(ctx, n) for n in ("vision_backend", "text_backend") if getattr(ctx, n) is not None}
    late = {}
    for name, value in forced.items():
        if name in params:
            kwargs[name] = value
        else:
            late[name] = value
    with patch(model, arch=ctx.arch_id, **kwargs) as handle:
        # patch() (as of this writing) selects backends from the arch's policy and keeps the choice on
        # handle.state, which the installed attention reads at call time: forcing a backend sets it there.
        state = getattr(handle, "state", None)
        for name, value in late.items():
            if state is None or not hasattr(state, name):
                raise TypeError(f"portvlm.patch() takes no {name}= and its handle has no state.{name}; cannot force {value!r}")
            setattr(state, name, value)
        yield handle


def report_summary(handle) -> Any:
    """A JSON-able view of a PatchHandle's report (whatever shape the shims give it)."""
    rep = getattr(handle, "report", None)
    if rep is None:
        return None
    for attr in ("to_json", "as_dict", "to_dict"):
        if hasattr(rep, attr):
            try:
                return getattr(rep, attr)()
            except Exception:  # noqa: BLE001
                break
    if isinstance(rep, (dict, list, str)):
        return rep
    try:
        import dataclasses

        if dataclasses.is_dataclass(rep):
            return dataclasses.asdict(rep)
    except Exception:  # noqa: BLE001
        pass
    return str(rep)


def tol(ctx, direction: str, backend: str | None = None) -> tuple[float, float]:
    return tolerances.tolerance(ctx.device_kind, ctx.dtype, backend or ctx.vision_backend, direction)


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
