"""Qwen2-VL and Qwen3-VL-MoE: the siblings of the declared Qwen-VL families, served by the same shims.

Qwen2-VL is Qwen2.5-VL without window attention (every ViT block full); Qwen3-VL-MoE is Qwen3-VL's tower (deepstack)
over a sparse MoE text model. Both need only a declaration on the stacks they are cell-tested on.
"""

from __future__ import annotations

from portvlm.models.family import TINY_MROPE, TINY_TEXT, Family, standard_anchors
from portvlm.models.qwen import (
    QWEN3_TINY_ROPE,
    QWEN3_TINY_VISION,
    TEMPORAL_PATCH,
    _build,
    geometry,
    qwen3_geometry,
    require,
)

MERGE = 2
QWEN2 = "transformers.models.qwen2_vl.modeling_qwen2_vl"
QWEN3_MOE = "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe"


def qwen2_vl_config():
    """Tiny Qwen2-VL: 4 full-attention ViT blocks (embed_dim 32, 2 heads), 2 text layers."""
    vision = dict(depth=4, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=TINY_TEXT["hidden_size"],
                  in_chans=3, in_channels=3, patch_size=14, temporal_patch_size=TEMPORAL_PATCH,
                  spatial_merge_size=MERGE)
    text = dict(TINY_TEXT, rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": TINY_MROPE})
    return _build("Qwen2VLConfig", vision, text)


def qwen3_vl_moe_config():
    """Tiny Qwen3-VL-MoE: Qwen3-VL's tower (deepstack taps at 1 and 2) over a 4-expert text model."""
    require("Qwen3VLMoeConfig", "qwen3vl_moe")
    vision = dict(QWEN3_TINY_VISION, deepstack_visual_indexes=[1, 2])
    text = dict(TINY_TEXT, head_dim=16, rope_theta=10000.0, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[], rope_scaling=QWEN3_TINY_ROPE)
    return _build("Qwen3VLMoeConfig", vision, text)


QWEN2_VL = Family(
    model_type="qwen2_vl",
    model_id="qwen2vl",
    model_class="Qwen2VLForConditionalGeneration",
    tiny_config=qwen2_vl_config,
    geometry=geometry,
    layout="patches",
    head_dims=(80, 128),  # Qwen2-VL-7B: ViT 1280 / 16 heads; text 128
    anchors=standard_anchors(QWEN2, "VisionAttention", "Qwen2VLForConditionalGeneration"),
    description="Qwen2-VL",
)

QWEN3_VL_MOE = Family(
    model_type="qwen3_vl_moe",
    model_id="qwen3vl_moe",
    model_class="Qwen3VLMoeForConditionalGeneration",
    tiny_config=qwen3_vl_moe_config,
    geometry=qwen3_geometry,
    layout="patches",
    head_dims=(72, 128),  # Qwen3-VL-30B-A3B (config defaults): ViT 1152 / 16 heads; text 128
    anchors=standard_anchors(QWEN3_MOE, "Qwen3VLMoeVisionAttention", "Qwen3VLMoeForConditionalGeneration"),
    description="Qwen3-VL-MoE (Qwen3-VL with a sparse MoE text model)",
)
