"""Block-diagonal (varlen) attention over packed ``[S, H, D]`` tensors: one kernel call per layer.

Imported only when attention runs (``portvlm.backends`` itself stays torch-free). Every implementation takes
the same arguments and returns ``[S, H, D]``; the declarations that say where each one may run live in
``portvlm.backends.__init__``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------
# Host synchronisation accounting: ``max_seqlen`` is the only place portvlm's attention reads a device value
# back to the host. Tests and benchmarks read ``sync_count()`` to assert ≤ 1 sync per forward.
# --------------------------------------------------------------------------------------------------------------
_SYNCS = 0
# id(tensor) -> (weakref to tensor, tensor._version, value). Keyed by id because ``Tensor.__eq__`` is
# elementwise (a WeakKeyDictionary could end up comparing tensors); the weakref + version guard against
# a recycled id or an in-place edit.
_MAX_SEQLEN_CACHE: dict[int, tuple[weakref.ref, int, int]] = {}


def sync_count() -> int:
    """How many host syncs ``max_seqlen`` has made in this process."""
    return _SYNCS


def reset_sync_count() -> None:
    """Zero the sync counter (tests, benchmarks)."""
    global _SYNCS
    _SYNCS = 0


def clear_caches() -> None:
    """Drop cached max-seqlens and flex block masks."""
    _MAX_SEQLEN_CACHE.clear()
    _FLEX_MASKS.clear()


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Longest segment of ``cu_seqlens``: the one host sync, cached per tensor object (and its version)."""
    global _SYNCS
    key = id(cu_seqlens)
    hit = _MAX_SEQLEN_CACHE.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    if cu_seqlens.numel() < 2:
        value = 0
    else:
        value = int(cu_seqlens.diff().max().item())
        _SYNCS += 1

    def _drop(_ref, key=key):
        _MAX_SEQLEN_CACHE.pop(key, None)

    _MAX_SEQLEN_CACHE[key] = (weakref.ref(cu_seqlens, _drop), cu_seqlens._version, value)
    return value


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


def _eager(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    """matmul + float mask + fp32 softmax: the reference-grade path every device runs."""
    k, v = _repeat_kv(q, k, v)
    mask = block_diagonal_mask(cu_seqlens, q.shape[0], causal=causal)
    qh, kh, vh = (t.transpose(0, 1) for t in (q, k, v))  # [H, S, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
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


BUILTIN_IMPLS: dict[str, Callable] = {
    "eager": _eager,
    "sdpa_masked": _sdpa_masked,
}

_FLEX_MASKS: dict = {}


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, backend, scale=None, causal=False):
    """Block-diagonal attention of packed ``[S, H, D]`` q/k/v over ``cu_seqlens`` in one kernel call; ``[S, H, D]``."""
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    from portvlm.backends import get_backend

    declared = get_backend(backend)  # registered (test) backends shadow built-ins; unknown names raise KeyError
    impl = declared.impl or BUILTIN_IMPLS.get(backend)
    if impl is None:
        raise KeyError(f"attention backend {backend!r} declares no implementation")
    return impl(q, k, v, cu_seqlens, max_seqlen, scale, causal)
