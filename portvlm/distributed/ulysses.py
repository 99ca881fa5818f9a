"""Ulysses sequence parallelism for the text decoder: sequence ↔ heads all-to-all around portvlm's varlen kernel.

Each SP rank holds a contiguous slice of the packed row (``split_sizes``). Inside every text attention, after the
module has applied its rotary embedding to its local q/k (positions were computed on the whole row and sliced), the
all-to-all turns ``[S_local, H, D]`` into ``[S, H/sp, D]``: every rank then sees the WHOLE row for its share of the
heads and runs the arch's varlen kernel with the row's global ``cu_seqlens`` — samples that straddle a rank
boundary attend exactly as in one process. A second all-to-all returns ``[S_local, H, D]``. The collectives are
torch's functional ones (``all_to_all_single_autograd``), so backward is the mirrored all-to-all.

Hook: portvlm's text attention (registry function on 4.53+, the <=4.52 Qwen2.5-VL class forward) calls
``kernels.varlen_attention(..., backend=state.text_backend)`` for a packed row. ``UlyssesBackend`` registers a
backend of its own (``portvlm.backends.register_backend``) that wraps the policy's backend, and the handle's
``state.text_backend`` is pointed at it for as long as the parallel model lives — no change to the attention code.

Fewer KV heads than the SP degree (Qwen2.5-VL-3B: 2 KV heads) are repeated until the SP degree divides them
(DeepSpeed-Ulysses and lmms-engine do the same); a query head count the degree does not divide is refused.
"""

from __future__ import annotations

import itertools
import math

from portvlm.errors import UnsupportedError

BACKEND_PREFIX = "ulysses"
_COUNTER = itertools.count()


def split_sizes(total: int, sp: int) -> list[int]:
    """Tokens per SP rank for a row of ``total`` tokens: contiguous, as even as possible, the first ranks +1."""
    base, extra = divmod(int(total), sp)
    return [base + (1 if r < extra else 0) for r in range(sp)]


def split_bounds(total: int, sp: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` of every SP rank's slice of the row."""
    out, start = [], 0
    for n in split_sizes(total, sp):
        out.append((start, start + n))
        start += n
    return out


def head_reasons(num_heads: int, num_kv_heads: int, sp: int) -> list[str]:
    """Why Ulysses cannot split these attention heads over ``sp`` ranks (empty: it can)."""
    if num_heads % sp:
        return [f"Ulysses SP splits attention heads across ranks: {num_heads} query heads are not divisible by the "
                f"SP degree {sp}; use an SP degree that divides {num_heads}"]
    if num_heads % num_kv_heads:
        return [f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads"]
    return []


def kv_repeat(num_heads: int, num_kv_heads: int, sp: int) -> int:
    """How many times each KV head is repeated so that ``sp`` divides the KV heads (and GQA groups stay whole)."""
    r = sp // math.gcd(num_kv_heads, sp)
    if num_heads % (num_kv_heads * r):  # cannot keep whole groups: fall back to one KV head per query head
        r = num_heads // num_kv_heads
    return r


def seq_to_heads(x, sizes: list[int], rank: int, group):
    """``[S_local, H, D]`` → ``[S, H/sp, D]``: gather the row, keep this rank's heads (autograd all-to-all)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    sp = len(sizes)
    s_local, h, d = x.shape
    chunks = x.reshape(s_local, sp, h // sp, d).transpose(0, 1).reshape(sp * s_local, h // sp, d).contiguous()
    out = all_to_all_single_autograd(chunks, list(sizes), [s_local] * sp, group)
    return _wait(out)


def heads_to_seq(x, sizes: list[int], rank: int, group):
    """``[S, H/sp, D]`` → ``[S_local, H, D]``: scatter the row back, gather all heads of this rank's tokens."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    sp = len(sizes)
    s_local = sizes[rank]
    _, hs, d = x.shape
    out = _wait(all_to_all_single_autograd(x.contiguous(), [s_local] * sp, list(sizes), group))
    return out.reshape(sp, s_local, hs, d).transpose(0, 1).reshape(s_local, sp * hs, d)


def _wait(t):
    # Functional collectives return an AsyncCollectiveTensor; reading it waits. Make the wait explicit.
    wait = getattr(t, "wait", None)
    return wait() if callable(wait) else t


class UlyssesBackend:
    """A registered attention backend that runs ``inner`` over the whole row with this rank's share of heads."""

    def __init__(self, inner: str, group, rank: int, sp: int, *, fault: str | None = None):
        self.inner = inner
        self.group = group
        self.rank = rank
        self.sp = sp
        self.fault = fault  # negative controls only: "local_cu" (per-rank cu_seqlens)
        self.name = f"{BACKEND_PREFIX}{next(_COUNTER)}_{inner}"
        self.calls = 0

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, scale, causal):
        from portvlm.backends import kernels

        s_local, heads, _ = q.shape
        kv_heads = k.shape[1]
        reasons = head_reasons(heads, kv_heads, self.sp)
        if reasons:
            raise UnsupportedError("; ".join(reasons))
        cu_host = kernels.host_cu_seqlens(cu_seqlens)  # cached per tensor: one sync per forward, not per layer
        total = cu_host[-1]
        sizes = split_sizes(total, self.sp)
        if sizes[self.rank] != s_local:
            raise ValueError(
                f"Ulysses SP rank {self.rank}: the attention got {s_local} tokens but cu_seqlens describes a row of "
                f"{total} tokens, whose slice for this rank is {sizes[self.rank]} (split {sizes}); pass the GLOBAL "
                "cu_seqlens of the whole packed row"
            )
        r = kv_repeat(heads, kv_heads, self.sp)
        if r > 1:
            k = k.repeat_interleave(r, dim=1)
            v = v.repeat_interleave(r, dim=1)
        qg, kg, vg = (seq_to_heads(t, sizes, self.rank, self.group) for t in (q, k, v))
        cu = cu_seqlens
        if self.fault == "local_cu":  # each rank's own boundaries: attention cut at every rank edge
            import torch

            edges = sorted(set(cu_host) | set(itertools.accumulate(sizes)))
            cu = torch.tensor([0, *[e for e in edges if e > 0]], dtype=cu_seqlens.dtype, device=cu_seqlens.device)
            max_seqlen = max(b - a for a, b in itertools.pairwise(edges))
        self.calls += 1
        out = kernels.varlen_attention(qg, kg, vg, cu, max_seqlen, backend=self.inner, scale=scale, causal=causal)
        return heads_to_seq(out, sizes, self.rank, self.group)

    def declaration(self):
        """The ``portvlm.backends.Backend`` record this backend registers under (the inner one's limits)."""
        from portvlm.backends import Backend, get_backend

        inner = get_backend(self.inner)
        fields = {f: getattr(inner, f) for f in inner.__dataclass_fields__ if f != "impl"}
        fields.update(name=self.name, note=f"Ulysses SP over {self.sp} ranks around {self.inner}")
        return Backend(**fields)
