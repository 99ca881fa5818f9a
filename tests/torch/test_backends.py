"""Attention backends against a per-segment fp32 oracle: forward and backward, GQA, causal, length-1 segments.

CPU runs eager and sdpa_masked for real, and efficient_varlen's autograd wiring through a layout-faithful CPU
emulation of aten's mem-efficient ops (the LSE layout and the backward's alignment check included). The CUDA
kernels themselves are checked by ``benchmarks/gpu_backend_check.py``.
"""

from __future__ import annotations

import math
import sys
import types

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from portvlm.backends import BACKENDS, Backend, backend_reasons, register_backend, select  # noqa: E402
from portvlm.backends import kernels as K  # noqa: E402
from portvlm.platform import CPU  # noqa: E402

LENGTHS = [7, 1, 12, 4]  # >= 3 segments of different lengths, one of length 1
CU = [0, 7, 8, 20, 24]


def cu_tensor(device="cpu"):
    return torch.tensor(CU, dtype=torch.int32, device=device)


def reference(q, k, v, cu, causal=False, scale=None):
    """Per-segment fp32 attention, each segment computed on its own (the oracle)."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(cu[:-1], cu[1:], strict=False):
        qi = q[a:b].float().transpose(0, 1)
        ki = k[a:b].float().repeat_interleave(groups, 1).transpose(0, 1)
        vi = v[a:b].float().repeat_interleave(groups, 1).transpose(0, 1)
        s = (qi @ ki.transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
        if causal:
            n = b - a
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((s.softmax(-1) @ vi).transpose(0, 1))
    return torch.cat(outs)


def make_qkv(heads=4, kv_heads=4, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = CU[-1]
    q = torch.randn(total, heads, dim, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(total, kv_heads, dim, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(total, kv_heads, dim, generator=g, dtype=torch.float32).to(dtype)
    return q, k, v


def check_against_reference(backend, *, heads, kv_heads, causal, atol=2e-5):
    q, k, v = make_qkv(heads, kv_heads)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    cu = cu_tensor()
    out = K.varlen_attention(*leaves, cu, K.max_seqlen(cu), backend=backend, causal=causal)
    ref = reference(*ref_leaves, CU, causal=causal)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    for name, got, want in zip("qkv", leaves, ref_leaves, strict=False):
        torch.testing.assert_close(got.grad, want.grad, atol=atol * 5, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


CPU_USABLE = [n for n in BACKENDS if not backend_reasons(n, CPU, "float32", 16, need_backward=True)]


def test_cpu_usable_backends_are_eager_and_sdpa():
    assert set(CPU_USABLE) == {"eager", "sdpa_masked"}
    assert select(None, CPU, torch.float32, 16, need_backward=True).name == "sdpa_masked"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backend_matches_per_segment_reference(backend, heads, kv_heads, causal):
    reasons = backend_reasons(backend, CPU, "float32", 16, need_backward=True)
    if reasons:
        pytest.skip(f"{backend} not usable here: {'; '.join(reasons)}")
    check_against_reference(backend, heads=heads, kv_heads=kv_heads, causal=causal)


def test_scale_is_honoured():
    q, k, v = make_qkv()
    cu = cu_tensor()
    for backend in CPU_USABLE:
        out = K.varlen_attention(q, k, v, cu, 12, backend=backend, scale=0.05)
        torch.testing.assert_close(out, reference(q, k, v, CU, scale=0.05), atol=2e-5, rtol=1e-4)


def test_low_precision_close_to_fp32_reference():
    q, k, v = make_qkv(dtype=torch.bfloat16)
    cu = cu_tensor()
    for backend in CPU_USABLE:
        out = K.varlen_attention(q, k, v, cu, 12, backend=backend)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference(q, k, v, CU), atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------------------------------
# Block mask, segment ids, host syncs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_block_diagonal_mask(causal):
    total = CU[-1] + 3  # trailing padding rows belong to no real segment
    mask = K.block_diagonal_mask(cu_tensor(), total, causal=causal)
    want = torch.zeros(total, total, dtype=torch.bool)
    for a, b in zip(CU[:-1], CU[1:], strict=False):
        block = torch.ones(b - a, b - a, dtype=torch.bool)
        want[a:b, a:b] = block.tril() if causal else block
    assert mask.dtype == torch.bool
    assert torch.equal(mask[: CU[-1], : CU[-1]], want[: CU[-1], : CU[-1]])
    assert not mask[CU[-1] :, : CU[-1]].any() and not mask[: CU[-1], CU[-1] :].any()


def test_mask_and_kernels_never_read_device_values():
    # On the meta device any .item()/.tolist() raises: building the mask and running the masked kernels
    # with a given max_seqlen proves they need no host sync.
    cu = cu_tensor("meta")
    assert K.block_diagonal_mask(cu, 24, causal=True).shape == (24, 24)
    q, k, v = (t.to("meta") for t in make_qkv(4, 2))
    for backend in CPU_USABLE:
        assert K.varlen_attention(q, k, v, cu, 12, backend=backend).shape == q.shape
    with pytest.raises(Exception):  # noqa: B017 - the control: a real host read fails on meta
        cu.tolist()


def test_one_sync_per_forward_cached_per_tensor():
    K.reset_sync_count()
    cu = cu_tensor()
    q, k, v = make_qkv()
    for _layer in range(8):  # repeated layers reuse the cached host copy
        K.varlen_attention(q, k, v, cu, K.max_seqlen(cu), backend="sdpa_masked")
    assert K.max_seqlen(cu) == max(LENGTHS)
    assert K.sync_count() == 1
    cu2 = cu_tensor()  # a new tensor object (next batch): one more sync
    K.max_seqlen(cu2)
    assert K.sync_count() == 2
    cu2[-1] = 40  # edited in place: the version guard resyncs
    assert K.max_seqlen(cu2) == 20 and K.sync_count() == 3
    K.reset_sync_count()
    assert K.sync_count() == 0


# ---------------------------------------------------------------------------------------------------------------
# efficient_varlen: aten's op layout emulated on CPU, including the backward's LSE alignment check
# ---------------------------------------------------------------------------------------------------------------


def _emulated_forward(q, k, v, bias, cu_q, cu_k, max_q, max_k, dropout_p, mask_type, compute_lse, *, scale=None, **_):
    """CPU twin of aten._efficient_attention_forward with cu_seqlens (attention.cu): LSE [n, H, ceil(max/32)*32]."""
    n, heads = cu_q.numel() - 1, q.shape[2]
    lse = torch.full((n, heads, -(-max_q // 32) * 32 if compute_lse else 0), float("inf"))
    out = torch.empty_like(q)
    cu = cu_q.tolist()
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=False)):
        s = torch.einsum("mhd,nhd->hmn", q[0, a:b].float(), k[0, a:b].float()) * scale
        if mask_type == 1:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        if compute_lse:
            lse[i, :, : b - a] = s.logsumexp(-1)
        out[0, a:b] = torch.einsum("hmn,nhd->mhd", s.softmax(-1), v[0, a:b].float()).to(q.dtype)
    return out, lse, torch.tensor(0), torch.tensor(0), max_q, max_k


def _emulated_backward(go, q, k, v, bias, out, cu_q, cu_k, max_q, max_k, lse, dropout_p, seed, offset, mask_type,
                       bias_requires_grad, *, scale=None, **_):
    """CPU twin of aten._efficient_attention_backward: same alignment check, reads lse[segment, head, row]."""
    heads = q.shape[2]
    if not (heads <= 1 or lse.stride(1) % 8 == 0):
        raise RuntimeError("LSE is not correctly aligned (strideH)")
    if not (cu_q.numel() - 1 <= 1 or lse.stride(0) % 8 == 0):
        raise RuntimeError("LSE is not correctly aligned (strideB)")
    dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
    cu = cu_q.tolist()
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=False)):
        qi, ki, vi, oi, gi = (t[0, a:b].float() for t in (q, k, v, out, go))
        s = torch.einsum("mhd,nhd->hmn", qi, ki) * scale
        if mask_type == 1:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.exp(s - lse[i, :, : b - a, None])  # the LSE as laid out by the forward
        dv[0, a:b] = torch.einsum("hmn,mhd->nhd", p, gi)
        dp = torch.einsum("mhd,nhd->hmn", gi, vi)
        delta = (gi * oi).sum(-1).transpose(0, 1)[..., None]  # [H, M, 1]
        ds = p * (dp - delta)
        dq[0, a:b] = torch.einsum("hmn,nhd->mhd", ds, ki) * scale
        dk[0, a:b] = torch.einsum("hmn,mhd->nhd", ds, qi) * scale
    return dq, dk, dv, torch.empty(0)


@pytest.fixture
def emulated_efficient_ops(monkeypatch):
    monkeypatch.setattr(K, "_efficient_fwd", _emulated_forward)
    monkeypatch.setattr(K, "_efficient_bwd", _emulated_backward)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_efficient_varlen_autograd_wiring(emulated_efficient_ops, heads, kv_heads, causal):
    check_against_reference("efficient_varlen", heads=heads, kv_heads=kv_heads, causal=causal, atol=1e-5)


def test_efficient_varlen_saves_gqa_kv_unexpanded(emulated_efficient_ops):
    """The backward keeps K/V at their own head count (a 7:1 GQA model used to save 7x its K/V per layer: the
    memory that capped sm70's longest SP row); only q and the output are saved at the query's head count."""
    heads, kv_heads, dim = 8, 2, 16
    q, k, v = (t.requires_grad_(True) for t in make_qkv(heads, kv_heads, dim))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = K.varlen_attention(q, k, v, cu_tensor(), K.max_seqlen(cu_tensor()), backend="efficient_varlen")
    total = CU[-1]
    assert sorted(s for s in saved if len(s) == 4) == sorted(
        [(1, total, heads, dim)] * 2 + [(1, total, kv_heads, dim)] * 2), saved
    out.sum().backward()  # and the re-expanded backward still runs
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


def test_efficient_varlen_root_cause_of_the_lse_error(emulated_efficient_ops):
    """The anchor's call (compute_log_sumexp=False) hands the backward an [n, H, 0] LSE: strideH 1, not % 8."""
    q, k, v = (t[None] for t in make_qkv())
    cu = cu_tensor()
    out, lse, seed, off, mq, mk = K._efficient_fwd(q, k, v, None, cu, cu, 12, 12, 0.0, 0, False, scale=0.25)
    assert lse.shape == (4, 4, 0) and lse.stride(1) == 1
    with pytest.raises(RuntimeError, match=r"LSE is not correctly aligned \(strideH\)"):
        K._efficient_bwd(out, q, k, v, None, out, cu, cu, mq, mk, lse, 0.0, seed, off, 0, False, scale=0.25)
    out, lse, *_ = K._efficient_fwd(q, k, v, None, cu, cu, 12, 12, 0.0, 0, True, scale=0.25)
    assert lse.shape == (4, 4, 32) and lse.stride(1) % 8 == 0  # padded to kAlignLSE = 32


def test_aligned_lse_pads_a_misaligned_buffer():
    lse = torch.randn(3, 4, 12)
    fixed = K._aligned_lse(lse)
    assert fixed.shape == (3, 4, 32) and fixed.stride(1) % 8 == 0
    assert torch.equal(fixed[..., :12], lse)
    aligned = torch.randn(3, 4, 32)
    assert K._aligned_lse(aligned) is aligned
    with pytest.raises(RuntimeError, match="log-sum-exp"):
        K._aligned_lse(torch.empty(3, 4, 0))


def test_no_grad_forward_skips_the_lse(emulated_efficient_ops, monkeypatch):
    calls = []
    monkeypatch.setattr(K, "_efficient_fwd", lambda *a, **kw: calls.append(a[10]) or _emulated_forward(*a, **kw))
    q, k, v = make_qkv()
    with torch.no_grad():
        K.varlen_attention(q, k, v, cu_tensor(), 12, backend="efficient_varlen")
    K.varlen_attention(q.requires_grad_(), k, v, cu_tensor(), 12, backend="efficient_varlen")
    assert calls == [False, True]


# ---------------------------------------------------------------------------------------------------------------
# flash-attn is never reached by a non-flash backend; negative controls are caught
# ---------------------------------------------------------------------------------------------------------------


class _Tripwire(types.ModuleType):
    touched: list = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        _Tripwire.touched.append(f"{self.__name__}.{name}")

        def boom(*a, **kw):
            raise AssertionError(f"flash-attn reached through {self.__name__}.{name}")

        return boom


def test_non_flash_backends_never_reach_flash_attn(monkeypatch, emulated_efficient_ops):
    _Tripwire.touched = []
    for mod in ("flash_attn", "flash_attn.flash_attn_interface", "flash_attn_2_cuda"):
        monkeypatch.setitem(sys.modules, mod, _Tripwire(mod))
    non_flash = [n for n, b in BACKENDS.items() if not b.is_flash]
    assert "torch_varlen" not in non_flash and "efficient_varlen" in non_flash
    for backend in [*CPU_USABLE, "efficient_varlen"]:
        assert backend in non_flash
        check_against_reference(backend, heads=4, kv_heads=2, causal=True, atol=2e-5)
    assert _Tripwire.touched == []


def _mask_dropped(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    k, v = K._repeat_kv(q, k, v)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale).transpose(0, 1)


def _layout_swapped(q, k, v, cu_seqlens, max_seqlen, scale, causal):  # [S,H,D] fed as [H,S,D] without transposing
    k, v = K._repeat_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _wrong_scale(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    return K._sdpa_masked(q, k, v, cu_seqlens, max_seqlen, 1.0, causal)


@pytest.mark.parametrize("impl", [_mask_dropped, _layout_swapped, _wrong_scale], ids=["mask_dropped", "layout_swap", "wrong_scale"])
def test_negative_controls_are_caught(impl):
    name = "broken_" + impl.__name__.strip("_")
    with register_backend(Backend(name=name, devices=("cpu",)), impl=impl):
        assert select([name], CPU, "float32", 16).name == name
        with pytest.raises(AssertionError):
            check_against_reference(name, heads=4, kv_heads=2, causal=False)
    with pytest.raises(KeyError):
        K.varlen_attention(*make_qkv(), cu_tensor(), 12, backend=name)


def test_real_probes_on_this_machine():
    # the undeclared-for-CPU backends say why; a CPU torch has the efficient op symbols but no CUDA device
    assert backend_reasons("efficient_varlen", CPU, "float16", 80) == ["needs device cuda, found cpu (CPU)"]
    assert backend_reasons("sdpa_masked", CPU, "float32", 80) == []
