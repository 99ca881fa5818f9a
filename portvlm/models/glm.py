"""GLM-4.1V (``glm4v``), GLM-4.5V (``glm4v_moe``) and GLM-OCR (``glm_ocr``): Qwen-style patch towers, mrope text.

Their vision attention is Qwen2.5-VL's shape (fused ``qkv``, ``proj``, ``apply_rotary_pos_emb_vision``, one call per
``cu_seqlens`` segment without flash) and their text attention goes through the attention registry, so the shims
serve them as declared. GLM-OCR's vision attention adds per-head ``q_norm`` / ``k_norm`` before rotary, which
portvlm's vision forward applies (``shims.attention.VISION_CHILDREN``). Token framing differs from Qwen only in
names: ``image_start_token_id`` / ``image_end_token_id`` around the image tokens.
"""

from __future__ import annotations

from portvlm.models.family import IMG, TINY_TEXT, VEND, VID, VSTART, Family, standard_anchors

MERGE = 2
TEMPORAL_PATCH = 2
GLM4V = "transformers.models.glm4v.modeling_glm4v"
GLM4V_MOE = "transformers.models.glm4v_moe.modeling_glm4v_moe"
GLM_OCR = "transformers.models.glm_ocr.modeling_glm_ocr"

TINY_VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                   image_size=112,  # an 8×8 learned position grid, interpolated to each image
                   temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE, out_hidden_size=TINY_TEXT["hidden_size"])
TINY_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                first_k_dense_replace=1, n_group=1, topk_group=1)


def geometry(cfg):
    """The input geometry of a GLM-V config: Qwen's patch geometry under GLM's token names."""
    from portvlm.models.inputs import InputGeometry, text_ids
    from portvlm.shims import model_io

    vc = cfg.vision_config
    vocab, bos, pad = text_ids(cfg)
    # GLM-4.1V / 4.5V mark video frames with the IMAGE token (Glm4vModel.get_placeholder_mask, 5.x: "special_video_mask
    # is special_image_mask"), so one prompt holds images or a video, never both: mixes_media=False
    return InputGeometry(
        cfg.model_type, "patches", vocab, bos, pad, int(cfg.image_token_id), int(cfg.image_token_id),
        int(cfg.image_start_token_id), int(cfg.image_end_token_id),
        patch=vc.patch_size, merge=vc.spatial_merge_size, temporal=vc.temporal_patch_size,
        channels=model_io.vision_channels(vc), frames_apart=True,  # GLM frames each video frame like an image
        mixes_media=False,
    )


def _build(cls_name: str, model_id: str, text: dict):
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        from portvlm.models.tiny import unsupported

        raise unsupported(model_id)
    ids = dict(image_token_id=IMG, video_token_id=VID, image_start_token_id=VSTART, image_end_token_id=VEND,
               video_start_token_id=VSTART, video_end_token_id=VEND)
    return cls(text_config=text, vision_config=dict(TINY_VISION), tie_word_embeddings=False, **ids)


def _rope(section):
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}


def glm4v_config():
    """Tiny GLM-4.1V: 4 ViT blocks, 2 text layers, head_dim 16 (8 rotary frequencies, t/h/w 2/3/3)."""
    return _build("Glm4vConfig", "glm4v", dict(TINY_TEXT, rope_parameters=_rope([2, 3, 3])))


def glm4v_moe_config():
    """Tiny GLM-4.5V: GLM-4.1V's tower over a 4-expert text model (first layer dense), half-rotary heads."""
    return _build("Glm4vMoeConfig", "glm4v_moe",
                  dict(TINY_TEXT, head_dim=16, rope_parameters=_rope([1, 1, 2]), **TINY_MOE))


def glm_ocr_config():
    """Tiny GLM-OCR: a 4-block ViT with q/k norms, 2 text layers."""
    return _build("GlmOcrConfig", "glm_ocr", dict(TINY_TEXT, head_dim=16, rope_parameters=_rope([2, 3, 3])))


def _anchors(module: str, prefix: str, top: str) -> dict[str, tuple[str, ...]]:
    return standard_anchors(module, f"{prefix}VisionAttention", top)


GLM4V_FAMILY = Family(
    model_type="glm4v",
    model_id="glm4v",
    model_class="Glm4vForConditionalGeneration",
    tiny_config=glm4v_config,
    geometry=geometry,
    layout="patches",
    head_dims=(128, 128),  # GLM-4.1V-9B (config defaults): ViT 1536 / 12 heads; text 4096 / 32
    anchors=_anchors(GLM4V, "Glm4v", "Glm4vForConditionalGeneration"),
    description="GLM-4.1V",
)

GLM4V_MOE_FAMILY = Family(
    model_type="glm4v_moe",
    model_id="glm4v_moe",
    model_class="Glm4vMoeForConditionalGeneration",
    tiny_config=glm4v_moe_config,
    geometry=geometry,
    layout="patches",
    # ViT 1536 / 12 heads (config defaults); text: the class default would give 4096 / 96 = 42, GLM-4.5V's released
    # config sets head_dim 128 (read in its config.json by the research notes, not in this wheel)
    head_dims=(128, 128),
    anchors=_anchors(GLM4V_MOE, "Glm4vMoe", "Glm4vMoeForConditionalGeneration"),
    description="GLM-4.5V (GLM-4.1V tower, MoE text)",
)

GLM_OCR_FAMILY = Family(
    model_type="glm_ocr",
    model_id="glm_ocr",
    model_class="GlmOcrForConditionalGeneration",
    tiny_config=glm_ocr_config,
    geometry=geometry,
    layout="patches",
    head_dims=(64, 64),  # GLM-OCR (config defaults)
    anchors=_anchors(GLM_OCR, "GlmOcr", "GlmOcrForConditionalGeneration"),
    description="GLM-OCR (GLM-V tower with q/k norms)",
)
