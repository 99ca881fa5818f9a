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
