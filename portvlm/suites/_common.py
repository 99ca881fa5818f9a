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
from portvlm.suites import tolerances

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


@dataclass
class Comparison:
    max_abs_err: float
    max_rel_err: float
    ratio: float  # max |a-b| / (atol + rtol |b|): <= 1 passes
    atol: float
    rtol: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.ratio <= 1.0


def compare(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, mask: torch.Tensor | None = None) -> Comparison:
    """Elementwise ``|a - e| <= atol + rtol |e|`` over the positions ``mask`` keeps (a bool mask broadcast from the left)."""
    a = actual.detach().float()
    e = expected.detach().float()
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: patched {tuple(a.shape)} vs reference {tuple(e.shape)}")
    if mask is not None:
        a, e = a[mask], e[mask]
    finite = bool(torch.isfinite(a).all())
    diff = (a - e).abs()
    if not finite:
        return Comparison(float("inf"), float("inf"), float("inf"), atol, rtol, False)
    if diff.numel() == 0:
        return Comparison(0.0, 0.0, 0.0, atol, rtol, True)
    # relative error with the denominator floored at atol, so near-zero references do not blow it up
    rel = diff / e.abs().clamp_min(atol)
    ratio = diff / (atol + rtol * e.abs())
    return Comparison(float(diff.max()), float(rel.max()), float(ratio.max()), atol, rtol, True)


def check_from(name: str, cmp: Comparison, what: str = "") -> Check:
    detail = (
        f"{what}max_abs={cmp.max_abs_err:.3g} max_rel={cmp.max_rel_err:.3g} vs atol={cmp.atol:g} rtol={cmp.rtol:g}"
        + ("" if cmp.finite else " (non-finite values)")
    )
    return Check(name=name, ok=cmp.ok, value=cmp.ratio, bound=1.0, detail=detail)


def tol(ctx, direction: str, backend: str | None = None) -> tuple[float, float]:
    return tolerances.tolerance(ctx.device_kind, ctx.dtype, backend or ctx.vision_backend, direction)


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "pooler_output", None) is not None:  # 5.x: merged features are the pooler output
        return out.pooler_output
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.last_hidden_state


def vision_features(model_id: str, tower, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Run the vision tower once and return what the language model would get (plus deepstack features)."""
    from portvlm.suites.tiny import input_family

    if input_family(model_id) == "llava":
        out = tower(pixel_values, output_hidden_states=True)
        # LLaVA feeds hidden_states[vision_feature_layer = -2] (CLS dropped) to the projector.
        return {"features": out.hidden_states[-2][:, 1:]}
    out = tower(pixel_values, grid_thw=grid_thw)
    feats = {"features": _first_tensor(out)}
    deep = None
    if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], (list, tuple)):
        deep = out[1]  # 4.57: (merged, deepstack list)
    elif getattr(out, "deepstack_features", None) is not None:
        deep = out.deepstack_features
    if deep:
        for i, d in enumerate(deep):
            feats[f"deepstack{i}"] = d
    return feats


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
        self.checks.append(Check(name=name, ok=bool(ok), detail=detail, value=None if value is None else float(value), bound=None if bound is None else float(bound)))
        return bool(ok)

    def add(self, check: Check) -> bool:
        self.checks.append(check)
        return check.ok

    def result(self) -> SuiteResult:
        status = SuiteStatus.PASS if self.checks and all(c.ok for c in self.checks) else SuiteStatus.FAIL
        return SuiteResult(name=self.name, status=status, figures=self.figures, checks=self.checks)
