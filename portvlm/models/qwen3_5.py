"""Qwen3.5 (dense and MoE): a Qwen3-VL-style patch tower; the text model interleaves Gated DeltaNet layers.

Qwen3.5's vision tower is Qwen3-VL's without deepstack (a fused ``qkv``, ``apply_rotary_pos_emb_vision``, a learned
position grid), so ``vision_varlen`` serves it unchanged; its text attention goes through the attention registry
(``text_registry``). What needed more than a declaration is the text model's Gated DeltaNet layers: their torch
fallbacks ignore ``cu_seqlens`` (silently to 5.17, refused from 5.23), so packed rows go through
``portvlm.shims.linear_attention`` (shim ``linear_attention_packed``). The tiny text keeps one layer of each kind
(DeltaNet first, then full attention), as the released models alternate 3:1.
"""

from __future__ import annotations

from portvlm.models.family import TINY_TEXT, Family, standard_anchors
from portvlm.models.qwen import QWEN3_TINY_ROPE, QWEN3_TINY_VISION, _build, qwen3_geometry, require

QWEN35 = "transformers.models.qwen3_5.modeling_qwen3_5"
QWEN35_MOE = "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe"

# The Gated DeltaNet widths: 4 value heads over 2 key heads (the grouped-value path), head dims 16.
TINY_LINEAR = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                   linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention"])
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                decoder_sparse_step=1, mlp_only_layers=[])
TINY_ROPE = dict(QWEN3_TINY_ROPE, rope_theta=10000.0)  # the tower is Qwen3-VL's tiny one (QWEN3_TINY_VISION)


# Qwen3.5's DeltaNet layers end in a gated RMSNorm over each 16-wide head of the delta rule's output
# (``Qwen3_5RMSNormGated``); in the tiny random model some of those rows have norm ~1e-4, so the norm scales fp32
# rounding in its input up ~85x (8.6e-7 in, 7.3e-5 out; tiny Qwen3.5, transformers 5.24, CPU). Upstream alone, no
# portvlm: eager vs sdpa vision features 1.4e-6 apart give image-prompt logits 1.6e-4 apart (Qwen3-VL, same tower:
# 2.4e-6). The delta rule itself is not it: chunked and recurrent rules give the same trajectories to 4e-6.
# portvlm's packed path matches each sample alone to 1e-5 at the layer (tests/torch/test_linear_attention.py).
DELTANET_SCALE = 30.0
DELTANET_WHY = ("the DeltaNet layers' gated RMSNorm rescales near-zero head outputs, amplifying fp32 rounding ~85x: "
                "upstream alone, eager vs sdpa give image logits 1.6e-4 apart (Qwen3-VL: 2.4e-6)")
# Five AdamW steps at lr 3e-3 amplify that further, without portvlm: upstream eager vs sdpa trajectories end 4.5e-4
# apart on Qwen3.5 (Qwen3-VL: 7e-7) and 0.10 apart on Qwen3.5-MoE, where (inference) a top-k routing choice flips.
# portvlm's trajectory is within 2e-6 (dense) and 4.2e-5 (MoE) of upstream's sdpa run.
DELTANET_TRAJECTORY = ("5 AdamW steps amplify the gated-norm noise: upstream alone, eager vs sdpa trajectories end "
                       "4.5e-4 apart (Qwen3.5) and 0.10 apart (Qwen3.5-MoE, a top-k routing flip, inferred)")


def qwen3_5_config():
    """Tiny Qwen3.5: a DeltaNet layer then a full-attention layer (head_dim 16), a 4-block ViT."""
    require("Qwen3_5Config", "qwen3_5")
    text = dict(TINY_TEXT, head_dim=16, rope_parameters=TINY_ROPE, partial_rotary_factor=1.0, **TINY_LINEAR)
    return _build("Qwen3_5Config", dict(QWEN3_TINY_VISION), text)


def qwen3_5_moe_config():
    """Tiny Qwen3.5-MoE: Qwen3.5's layers with 4 experts (2 per token) and a shared expert."""
    require("Qwen3_5MoeConfig", "qwen3_5_moe")
    text = dict(TINY_TEXT, head_dim=16, rope_parameters=TINY_ROPE, partial_rotary_factor=1.0, **TINY_LINEAR,
                **TINY_MOE)
    return _build("Qwen3_5MoeConfig", dict(QWEN3_TINY_VISION), text)


def _linear_anchors(module: str, prefix: str) -> tuple[str, ...]:
    return (f"{module}.causal_conv1d_fn", f"{module}.torch_chunk_gated_delta_rule", f"{module}.{prefix}GatedDeltaNet.forward")


QWEN3_5 = Family(
    model_type="qwen3_5",
    model_id="qwen3_5",
    model_class="Qwen3_5ForConditionalGeneration",
    tiny_config=qwen3_5_config,
    geometry=qwen3_geometry,
    layout="patches",
    head_dims=(72, 256),  # Qwen3.5 (config defaults): ViT 1152 / 16 heads; text head_dim 256
    anchors={
        **standard_anchors(QWEN35, "Qwen3_5VisionAttention", "Qwen3_5ForConditionalGeneration"),
        "linear_attention_packed": _linear_anchors(QWEN35, "Qwen3_5"),
    },
    description="Qwen3.5 (hybrid Gated DeltaNet / full-attention text, Qwen3-VL-style ViT)",
    tolerance_scale=DELTANET_SCALE,
    tolerance_why=DELTANET_WHY,
    trajectory_noise=DELTANET_TRAJECTORY,
)

QWEN3_5_MOE = Family(
    model_type="qwen3_5_moe",
    model_id="qwen3_5_moe",
    model_class="Qwen3_5MoeForConditionalGeneration",
    tiny_config=qwen3_5_moe_config,
    geometry=qwen3_geometry,
    layout="patches",
    head_dims=(72, 256),  # Qwen3.5-MoE (config defaults): ViT 1152 / 16 heads; text head_dim 256
    anchors={
        **standard_anchors(QWEN35_MOE, "Qwen3_5MoeVisionAttention", "Qwen3_5MoeForConditionalGeneration"),
        "linear_attention_packed": _linear_anchors(QWEN35_MOE, "Qwen3_5Moe"),
    },
    description="Qwen3.5-MoE (Qwen3.5 with a sparse MoE text model)",
    tolerance_scale=DELTANET_SCALE,
    tolerance_why=DELTANET_WHY,
    trajectory_noise=DELTANET_TRAJECTORY,
)

