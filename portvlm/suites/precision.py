"""fp16 checks for the Volta policy: the upcasts fp16 needs where there is no bf16.

Volta has no bf16, so its policy runs in fp16, whose range (max 65504 ≈ e^11) and 10-bit mantissa break two
things unless they are computed in fp32: rotary embeddings (large angles, products that cancel) and the softmax
(exp of un-shifted logits overflows; long fp16 sums lose mass). Each check here feeds inputs that make a
missing upcast visible and compares with the same math done in fp32.
"""

from __future__ import annotations

import torch

from portvlm.records import Check

# One fp16 rounding of a result computed in fp32: |err| <= 2^-11 · |ref| (+ the smallest normal for ~0 values).
FP16_ONE_ROUNDING = 2.0**-11


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotary_reference(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Vision rotary (q·cos + rotate_half(q)·sin, cos/sin broadcast over heads) in fp32."""
    q = q.float()
    return q * cos.float().unsqueeze(-2) + _rotate_half(q) * sin.float().unsqueeze(-2)


def rotary_check(rope, device: str = "cpu", seq: int = 1024, heads: int = 4, dim: int = 32) -> Check:
    """``rope(q, k, cos, sin)`` on fp16 q/k must equal the fp32 computation rounded once to fp16."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(seq, heads, dim, generator=g) * 4).to(device, torch.float16)
    k = (torch.randn(seq, heads, dim, generator=g) * 4).to(device, torch.float16)
    pos = torch.arange(seq, dtype=torch.float32) * 7.0 + 3000.0  # large angles: fp16 cos/sin lose digits
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ang = torch.outer(pos, inv)
    emb = torch.cat((ang, ang), dim=-1).to(device)
    cos, sin = emb.cos(), emb.sin()
    q_out, k_out = rope(q, k, cos, sin)
    worst = 0.0
    for got, x in ((q_out, q), (k_out, k)):
        ref = rotary_reference(x, cos, sin)
        err = (got.float() - ref).abs() / (ref.abs() + 2.0**-14)
        worst = max(worst, float(err.max()))
    return Check(
        name="fp16.rotary_in_fp32",
        ok=worst <= FP16_ONE_ROUNDING * 1.01 and q_out.dtype == torch.float16,
        value=worst,
        bound=FP16_ONE_ROUNDING,
        detail=f"rotary on fp16 q/k (angles up to {float(pos.max()):.0f} rad): worst relative error vs fp32 math "
        f"{worst:.2e} (one fp16 rounding = {FP16_ONE_ROUNDING:.2e}); output dtype {q_out.dtype}",
    )


def softmax_check(backend: str, device: str = "cpu", seq: int = 2048, heads: int = 2, dim: int = 64) -> Check:
    """fp16 attention with logits far beyond e^11 and long rows: finite and equal to fp32 within fp16 tolerance."""
    from portvlm.backends import kernels

    g = torch.Generator().manual_seed(1)
    q = torch.randn(seq, heads, dim, generator=g)
    k = torch.randn(seq, heads, dim, generator=g)
    q = q / q.norm(dim=-1, keepdim=True) * 24.0  # |q·k|·scale up to ~24²/8 = 72 ≫ 11
    k = k / k.norm(dim=-1, keepdim=True) * 24.0
    v = torch.randn(seq, heads, dim, generator=g)
    cu = torch.tensor([0, seq // 2, seq], dtype=torch.int32, device=device)
    args = [t.to(device) for t in (q, k, v)]
    out16 = kernels.varlen_attention(*(t.half() for t in args), cu, seq // 2, backend=backend)
    ref = kernels.varlen_attention(*(t.float() for t in args), cu, seq // 2, backend="eager")
    err = float((out16.float() - ref).abs().max())
    finite = bool(torch.isfinite(out16).all())
    bound = 5e-3 * float(ref.abs().max()) + 5e-3
    return Check(
        name="fp16.softmax_in_fp32",
        ok=finite and err <= bound,
        value=err,
        bound=bound,
        detail=f"{backend} in fp16, logits up to ~72 (fp16 exp overflows at ~11), rows of {seq // 2}: "
        f"finite={finite}, max abs err vs fp32 {err:.2e}",
    )
