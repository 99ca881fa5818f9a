"""What portvlm holds a model to, public as ``torch.testing`` is: elementwise comparison and the tolerance table.

    from portvlm.testing import compare, tolerances
    atol, rtol = tolerances.tolerance("cpu", "float32", None, "fwd")
    c = compare(patched_logits, reference_logits, atol, rtol, mask=attention_mask.bool())
    assert c.ok, c

The suites, ``portvlm.check`` and the benchmarks compare through these, so a figure means the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from portvlm.records import Check
from portvlm.testing import tolerances

if TYPE_CHECKING:  # pragma: no cover - nothing here imports torch until a comparison runs
    import torch


@dataclass
class Comparison:
    """One comparison's worst errors, its ratio to the tolerance (<= 1 passes) and whether all values were finite."""

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
    import torch

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
    """A ``Check`` named ``name`` from a comparison (its ratio against the bound 1), ``what`` leading the detail."""
    detail = (
        f"{what}max_abs={cmp.max_abs_err:.3g} max_rel={cmp.max_rel_err:.3g} vs atol={cmp.atol:g} rtol={cmp.rtol:g}"
        + ("" if cmp.finite else " (non-finite values)")
    )
    return Check(name=name, ok=cmp.ok, value=cmp.ratio, bound=1.0, detail=detail)


def logits_of(out) -> torch.Tensor:
    """The logits of a model output (``.logits``, or the first element of a tuple output)."""
    return out.logits if hasattr(out, "logits") else out[0]

__all__ = ["Comparison", "check_from", "compare", "logits_of", "tolerances"]
