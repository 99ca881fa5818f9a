"""Block-diagonal (varlen) attention over packed ``[S, H, D]`` tensors: one kernel call per layer.

Imported only when attention runs (``portvlm.backends`` itself stays torch-free). Every implementation takes
the same arguments and returns ``[S, H, D]``; the declarations that say where each one may run live in
``portvlm.backends.__init__``.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------
# Host synchronisation accounting: ``max_seqlen`` is the only place portvlm's attention reads a device value
# back to the host. Tests and benchmarks read ``sync_count()`` to assert ≤ 1 sync per forward.
# --------------------------------------------------------------------------------------------------------------
_SYNCS = 0
# id(tensor) -> (weakref to tensor, tensor._version, host copy of cu_seqlens). Keyed by id because
# ``Tensor.__eq__`` is elementwise (a WeakKeyDictionary could end up comparing tensors); the weakref + version
# guard against a recycled id or an in-place edit. One ``.tolist()`` serves max_seqlen and xformers' seqlens.
_HOST_CU: dict[int, tuple[weakref.ref, int, tuple[int, ...]]] = {}


def sync_count() -> int:
    """How many host syncs portvlm's attention has made in this process (``host_cu_seqlens`` is the only one)."""
    return _SYNCS


def reset_sync_count() -> None:
    """Zero the sync counter (tests, benchmarks)."""
    global _SYNCS
    _SYNCS = 0


def clear_caches() -> None:
    """Drop cached host copies of cu_seqlens, flex block masks and xformers biases."""
    _HOST_CU.clear()
    _PER_CU.clear()


def _cached(store: dict, tensor, key_extra, build):
    """Per-tensor-object cache entry (weakref + version guarded)."""
    key = (id(tensor), key_extra)
    hit = store.get(key)
    if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
        return hit[2]
    value = build()

    def _drop(_ref, key=key):
        store.pop(key, None)

    store[key] = (weakref.ref(tensor, _drop), tensor._version, value)
    return value


def host_cu_seqlens(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """``cu_seqlens`` on the host: the one sync, cached per tensor object (repeated layers reuse it)."""

    def build():
        global _SYNCS
        _SYNCS += 1
        return tuple(int(x) for x in cu_seqlens.tolist())

    return _cached(_HOST_CU, cu_seqlens, None, build)


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Longest segment of ``cu_seqlens``: one host sync per tensor object, cached."""
    cu = host_cu_seqlens(cu_seqlens)
    return max((b - a for a, b in zip(cu[:-1], cu[1:], strict=False)), default=0)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Segment index of every packed position ``[total]`` (positions past ``cu_seqlens[-1]`` get ``n``); no sync."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # right=True: boundaries[i-1] <= p < boundaries[i] -> i, so position cu[1] starts segment 1.
    return torch.bucketize(positions, cu_seqlens[1:].contiguous(), right=True)


def block_diagonal_mask(cu_seqlens: torch.Tensor, total: int, *, causal: bool = False) -> torch.Tensor:
    """``BoolTensor[total, total]``: True where query i may attend key j (same segment; j <= i if causal). No sync."""
    seg = segment_ids(cu_seqlens, total)
    mask = seg[:, None] == seg[None, :]
    if causal:
        # Segments are contiguous, so global causality restricted to a segment is per-segment causality.
        idx = torch.arange(total, device=cu_seqlens.device)
        mask = mask & (idx[None, :] <= idx[:, None])
    return mask


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention wants packed [S, H, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}, {v.shape[1]})")


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA for kernels without native support: repeat each kv head for its group of query heads."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


# --------------------------------------------------------------------------------------------------------------
# Implementations. Signature: (q, k, v, cu_seqlens, max_seqlen, scale, causal) -> [S, H, D]
# --------------------------------------------------------------------------------------------------------------


def scaled_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · q kᵀ`` with the scale applied to q *before* the product: in fp16 the unscaled product overflows
    where ``|q·k|`` passes 65504 although the logit (√d times smaller) is far inside the range — Qwen2-VL's
    "!!!!" output (transformers #33294). Fused SDPA scales first too."""
    return torch.matmul(q * scale, k.transpose(-1, -2))


def _eager(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    """matmul + float mask + fp32 softmax: the reference-grade path every device runs."""
    k, v = _repeat_kv(q, k, v)
    mask = block_diagonal_mask(cu_seqlens, q.shape[0], causal=causal)
    qh, kh, vh = (t.transpose(0, 1) for t in (q, k, v))  # [H, S, D]
    scores = scaled_scores(qh, kh, scale)
    scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, vh).transpose(0, 1)


def _sdpa_masked(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    """One ``F.scaled_dot_product_attention`` over ``[1, H, S, D]`` with the bool block-diagonal mask."""
    k, v = _repeat_kv(q, k, v)
    mask = block_diagonal_mask(cu_seqlens, q.shape[0], causal=causal)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask[None, None], scale=scale
    )
    return out[0].transpose(0, 1)


# ---- efficient_varlen -----------------------------------------------------------------------------------------
# Why the autograd of the one-call varlen forward used to fail with "LSE is not correctly aligned (strideH)":
# the forward was called with compute_log_sumexp=False, so aten returned an LSE of shape [n, H, 0]; its
# contiguous strides are (H, 1, 1), and the backward (kernel_backward.h ``check_supported``) requires
# ``num_heads <= 1 || lse_strideH % 8 == 0`` (and the same for strideB). With cu_seqlens the forward
# (attention.cu) allocates the LSE as fp32 ``[n_segments, H, ceil(max_seqlen_q / kAlignLSE) * kAlignLSE]``
# (kAlignLSE = 32) and writes ``lse[segment, head, row]``; the backward reads it at
# ``segment * lse_strideB + head * lse_strideH + row``. So: compute the LSE whenever a gradient is needed and
# hand exactly that buffer (fp32, padded to 32) to the backward together with the forward's max_seqlens.
_LSE_ALIGN = 32


def _aligned_lse(lse: torch.Tensor) -> torch.Tensor:
    """fp32 LSE whose head/segment strides satisfy the backward's ``% 8`` check (pad rows to a multiple of 32)."""
    if lse.numel() == 0 and lse.shape[-1] == 0:
        raise RuntimeError("efficient_varlen backward needs the forward's log-sum-exp; the forward ran without it")
    lse = lse.float()
    if getattr(torch.version, "hip", None):  # AOTriton reads the LSE by its own layout: pass it through untouched
        return lse.contiguous()
    if lse.is_contiguous() and lse.stride(1) % 8 == 0 and lse.stride(0) % 8 == 0:
        return lse
    rows = -(-lse.shape[-1] // _LSE_ALIGN) * _LSE_ALIGN
    padded = lse.new_zeros(*lse.shape[:-1], rows)
    padded[..., : lse.shape[-1]] = lse
    return padded


def _efficient_fwd(*args, **kwargs):
    """aten._efficient_attention_forward (indirection: CPU tests substitute a layout-faithful emulation)."""
    return torch.ops.aten._efficient_attention_forward(*args, **kwargs)


def _efficient_bwd(*args, **kwargs):
    """aten._efficient_attention_backward (indirection: CPU tests substitute a layout-faithful emulation)."""
    return torch.ops.aten._efficient_attention_backward(*args, **kwargs)


def _sum_groups(grad: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of ``repeat_interleave(groups, dim=2)`` on ``[1, S, H, D]``: each kv head's group summed (fp32)."""
    b, s, h, d = grad.shape
    if h == kv_heads:
        return grad
    return grad.view(b, s, kv_heads, h // kv_heads, d).sum(3, dtype=torch.float32).to(dtype)


class _EfficientVarlen(torch.autograd.Function):
    """The one-call varlen kernel with GQA outside it: K/V are saved unexpanded (``[S, H_kv, D]``, not the query's
    ``H``) and re-expanded in the backward, so a 7:1 GQA model saves 1/7 of the K/V it would after a repeat."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, causal):
        q4, k4, v4 = (t.contiguous().unsqueeze(0) for t in (q, k, v))  # [1, S, H, D]; cu_seqlens marks segments
        ke, ve = (t.unsqueeze(0) for t in _repeat_kv(q4[0], k4[0], v4[0]))
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        mask_type = 1 if causal else 0  # 1 = CausalFromTopLeft, per segment (q and k lengths are equal)
        need_lse = any(ctx.needs_input_grad[:3])
        out, lse, seed, offset, mq, mk = _efficient_fwd(
            q4, ke, ve, None, cu, cu, max_seqlen, max_seqlen, 0.0, mask_type, need_lse, scale=scale
        )
        if need_lse:
            ctx.save_for_backward(q4, k4, v4, out, lse, cu, seed, offset)
            ctx.meta = (int(mq), int(mk), mask_type, scale)
        return out[0]

    @staticmethod
    def backward(ctx, grad_out):
        q4, k4, v4, out, lse, cu, seed, offset = ctx.saved_tensors
        mq, mk, mask_type, scale = ctx.meta
        ke, ve = (t.unsqueeze(0) for t in _repeat_kv(q4[0], k4[0], v4[0]))
        dq, dk, dv, _ = _efficient_bwd(
            grad_out.contiguous().unsqueeze(0), q4, ke, ve, None, out, cu, cu, mq, mk,
            _aligned_lse(lse), 0.0, seed, offset, mask_type, False, scale=scale,
        )
        del ke, ve
        kv = k4.shape[2]
        return dq[0], _sum_groups(dk, kv, k4.dtype)[0], _sum_groups(dv, kv, v4.dtype)[0], None, None, None, None


def _efficient_varlen(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    """torch's mem-efficient (cutlass / AOTriton) kernel over cu_seqlens: one call, any arch from sm50. The kernel has
    no GQA: the Function repeats K/V per call and keeps only the unexpanded K/V for the backward."""
    return _EfficientVarlen.apply(q, k, v, cu_seqlens, int(max_seqlen), float(scale), bool(causal))


# ---- xformers_blockdiag ---------------------------------------------------------------------------------------
_PER_CU: dict = {}


def _xformers_blockdiag(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    """xformers.ops.memory_efficient_attention with a BlockDiagonal(Causal)Mask on 4-D ``[1, S, H, D]`` inputs."""
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask, BlockDiagonalMask

    def build():
        cu = host_cu_seqlens(cu_seqlens)  # from_seqlens wants host ints: shares max_seqlen's one sync
        lens = [b - a for a, b in zip(cu[:-1], cu[1:], strict=False)]
        return (BlockDiagonalCausalMask if causal else BlockDiagonalMask).from_seqlens(lens)

    bias = _cached(_PER_CU, cu_seqlens, ("xformers", bool(causal)), build)
    k, v = _repeat_kv(q, k, v)
    # 4-D, never 3-D: a 3-D [S, H, D] call is read as [B=S, M=H, K=D] (batch of tokens, no mask) by xformers.
    out = xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, p=0.0, scale=scale)
    return out[0]


# ---- torch_varlen ---------------------------------------------------------------------------------------------
def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    """torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside torch, sm80+)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    kwargs = {"scale": scale}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:  # torch 2.12+
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(q, k, v)
    if causal:
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:  # early 2.10 docs spell it is_causal
            kwargs["is_causal"] = True
    return varlen_attn(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), **kwargs)


# ---- flex_document --------------------------------------------------------------------------------------------
_FLEX_FN: list = []


def _flex_fn():
    if not _FLEX_FN:
        from torch.nn.attention.flex_attention import flex_attention

        # Uncompiled flex_attention materialises the scores; compiled it is the Triton kernel.
        _FLEX_FN.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX_FN[0]


def flex_block_mask(cu_seqlens: torch.Tensor, total: int, *, causal: bool = False):
    """Document (segment) block mask for flex_attention, cached per cu_seqlens tensor object; no host sync."""
    from torch.nn.attention.flex_attention import create_block_mask

    def build():
        seg = segment_ids(cu_seqlens, total)

        def document(b, h, q_idx, kv_idx):
            same = seg[q_idx] == seg[kv_idx]
            return same & (kv_idx <= q_idx) if causal else same

        return create_block_mask(document, None, None, total, total, device=cu_seqlens.device)

    return _cached(_PER_CU, cu_seqlens, ("flex", total, bool(causal)), build)


def _flex_document(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    """flex_attention over ``[1, H, S, D]`` with a document block mask (Triton)."""
    mask = flex_block_mask(cu_seqlens, q.shape[0], causal=causal)
    kwargs = {"block_mask": mask, "scale": scale}
    if q.shape[1] != k.shape[1]:
        kwargs["enable_gqa"] = True
    out = _flex_fn()(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], **kwargs)
    return out[0].transpose(0, 1)


BUILTIN_IMPLS: dict[str, Callable] = {
    "eager": _eager,
    "sdpa_masked": _sdpa_masked,
    "efficient_varlen": _efficient_varlen,
    "xformers_blockdiag": _xformers_blockdiag,
    "torch_varlen": _torch_varlen,
    "flex_document": _flex_document,
}


@dataclass(frozen=True)
class KernelCall:
    """One ``varlen_attention`` call as ``trace`` records it: shapes, segments, causality, dtype and backend."""

    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    cu_seqlens: tuple[int, ...]
    max_seqlen: int
    causal: bool
    dtype: torch.dtype
    backend: str


_TRACES: list[list[KernelCall]] = []  # open traces; empty: varlen_attention records nothing (no host sync)


@contextlib.contextmanager
def trace() -> Iterator[list[KernelCall]]:
    """Record every ``varlen_attention`` call made inside the block (opt-in: reading ``cu_seqlens`` syncs the host).

        with kernels.trace() as calls:
            pmodel(**row)
        [c.cu_seqlens for c in calls]       # what each packed attention call saw
    """
    calls: list[KernelCall] = []
    _TRACES.append(calls)
    try:
        yield calls
    finally:
        _TRACES.remove(calls)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, backend, scale=None, causal=False):
    """Block-diagonal attention of packed ``[S, H, D]`` q/k/v over ``cu_seqlens`` in one kernel call; ``[S, H, D]``."""
    _check(q, k, v)
    if _TRACES:
        call = KernelCall(tuple(q.shape), tuple(k.shape), tuple(int(x) for x in cu_seqlens.tolist()), int(max_seqlen),
                          bool(causal), q.dtype, backend)
        for calls in _TRACES:
            calls.append(call)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    from portvlm.backends import get_backend

    declared = get_backend(backend)  # registered (test) backends shadow built-ins; unknown names raise KeyError
    impl = declared.impl or BUILTIN_IMPLS.get(backend)
    if impl is None:
        raise KeyError(f"attention backend {backend!r} declares no implementation")
    return impl(q, k, v, cu_seqlens, max_seqlen, scale, causal)
