"""The fp16 (Volta policy) upcast checks have teeth: they pass on the real code and fail without the upcasts."""

from __future__ import annotations

import pytest
import torch

from portvlm.backends import kernels, register_backend
from portvlm.shims.attention import rotary_of
from portvlm.suites import precision


def _transformers_vision_rotary():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mod

    return rotary_of(mod.Qwen2_5_VLVisionAttention) if hasattr(mod, "Qwen2_5_VLVisionAttention") else mod.apply_rotary_pos_emb_vision


def test_transformers_vision_rotary_passes_the_upcast_check():
    check = precision.rotary_check(_transformers_vision_rotary())
    assert check.ok, check.detail


def test_a_rotary_in_pure_fp16_fails_it():
    def rope_fp16(q, k, cos, sin):  # the bug: cos/sin cast to fp16, math in fp16
        c, s = cos.half().unsqueeze(-2), sin.half().unsqueeze(-2)
        return q * c + precision._rotate_half(q) * s, k * c + precision._rotate_half(k) * s

    check = precision.rotary_check(rope_fp16)
    assert not check.ok, check.detail


@pytest.mark.parametrize("backend", ["sdpa_masked", "eager"])
def test_portvlm_fp16_attention_passes_the_softmax_check(backend):
    check = precision.softmax_check(backend)
    assert check.ok, check.detail


def test_a_softmax_in_pure_fp16_fails_it():
    def naive(q, k, v, cu_seqlens, max_seqlen, scale=None, causal=False):  # exp without the max shift, in fp16
        mask = kernels.block_diagonal_mask(cu_seqlens, q.shape[0])
        s = torch.einsum("qhd,khd->hqk", q, k) * (scale or q.shape[-1] ** -0.5)
        p = torch.exp(s).masked_fill(~mask, 0)
        return torch.einsum("hqk,khd->qhd", p / p.sum(-1, keepdim=True), v)

    from portvlm.backends import Backend

    with register_backend(Backend(name="naive_fp16_softmax", devices=("cpu",)), naive):
        check = precision.softmax_check("naive_fp16_softmax")
    assert not check.ok, check.detail


def _sink(causal_rows: int = 12, heads: int = 2, dim: int = 128):
    """An attention sink at fp16's edge: q·k₀ = 300·300 = 90,000 > 65504, its logit 90,000/√128 ≈ 7,955 is not.

    Every query puts all its weight on key 0 (the others' logits are O(1)), so the answer is v₀ in every row."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(causal_rows, heads, dim, generator=g) for _ in range(3))
    q[:, :, 0], k[:, :, 0] = 300.0, 0.0
    k[0, :, 0] = 300.0
    return q.half(), k.half(), v.half()


def test_eager_logits_past_fp16_only_before_the_scale_stay_finite_in_both_eager_paths():
    """transformers #33294 (Qwen2-VL fp16 "!!!!"): ``matmul(q, kᵀ) * scale`` overflows where the scaled logit would
    not; portvlm's eager paths scale q first. The unscaled product is checked to overflow, so the case has teeth."""
    from types import SimpleNamespace

    from portvlm.shims.attention import AttentionState, make_text_attention

    q, k, v = _sink()
    assert torch.isinf(torch.matmul(q.transpose(0, 1), k.transpose(0, 1).transpose(-1, -2))).any()  # the old order
    want = v[:1].float().expand(q.shape[0], -1, -1)
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    packed = kernels.varlen_attention(q, k, v, cu, q.shape[0], backend="eager", causal=True)
    fn = make_text_attention(AttentionState(text_backend="eager"))
    batched, _ = fn(SimpleNamespace(training=False, is_causal=True), *(t.transpose(0, 1)[None] for t in (q, k, v)), None)
    for name, out in (("kernels eager", packed), ("text registry eager", batched[0])):
        assert torch.isfinite(out).all(), name
        torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=0, msg=name)
