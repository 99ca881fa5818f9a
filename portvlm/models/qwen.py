"""Qwen2.5-VL and Qwen3-VL: tiny configs, the input geometry of any of their configs, and what portvlm supports.

Tiny shapes keep what matters to attention ports real: GQA text heads, mrope sections, Qwen2.5-VL's windowed +
full-attention ViT blocks (window 112 px / patch 14 / merge 2, so an image of more than 8×8 patches spans several
windows), Qwen3-VL's deepstack indexes and learned position grid.
"""

from __future__ import annotations

from portvlm.models.family import IMG, TINY_MROPE, TINY_TEXT, VEND, VID, VSTART, Family, standard_anchors

MERGE = 2
TEMPORAL_PATCH = 2
WINDOW_PX = 112  # Qwen2.5-VL: 112 px / 14 / merge 2 = 4 merged units = 8×8 patches per window

QWEN25 = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
QWEN3 = "transformers.models.qwen3_vl.modeling_qwen3_vl"


def geometry(cfg, *, frames_apart: bool = False):
    """The input geometry of a Qwen-VL config: token ids, patch / merge / temporal sizes, channels, window."""
    from portvlm.models.inputs import InputGeometry, text_ids
    from portvlm.shims import model_io

    vc = cfg.vision_config
    vocab, bos, pad = text_ids(cfg)
    window = getattr(vc, "window_size", None)
    return InputGeometry(
        cfg.model_type, "patches", vocab, bos, pad, int(cfg.image_token_id), int(cfg.video_token_id),
        int(cfg.vision_start_token_id), int(cfg.vision_end_token_id),
        patch=vc.patch_size, merge=vc.spatial_merge_size, temporal=vc.temporal_patch_size,
        channels=model_io.vision_channels(vc), window=window // vc.patch_size if window else None,
        frames_apart=frames_apart,
    )


def qwen3_geometry(cfg):
    """The Qwen3-VL lineage's geometry (Qwen3-VL, -MoE, Qwen3.5): video frames apart, <vs> frame <ve> each (t=1)."""
    return geometry(cfg, frames_apart=True)


# The Qwen3-VL lineage's tiny tower (Qwen3-VL, Qwen3-VL-MoE, Qwen3.5): 4 blocks, head_dim 16, an 8×8 learned
# position grid interpolated to each image; Qwen3-VL's deepstack taps are added where the family has them.
QWEN3_TINY_VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
                         temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE,
                         out_hidden_size=TINY_TEXT["hidden_size"], num_position_embeddings=64)
QWEN3_TINY_ROPE = {"rope_type": "default", "mrope_section": TINY_MROPE, "mrope_interleaved": True}


def require(config_name: str, model_id: str) -> None:
    """``UnsupportedError`` (``tiny.unsupported``) when the installed transformers has no ``config_name``."""
    import transformers

    if not hasattr(transformers, config_name):
        from portvlm.models.tiny import unsupported

        raise unsupported(model_id)


def _build(cls_name: str, vision: dict, text: dict):
    import transformers

    from portvlm.shims import model_io

    cls = getattr(transformers, cls_name)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if "text_config" in getattr(cls, "sub_configs", {}):
        cfg = cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    else:  # ≤4.51: one flat config for the text model (transformers 4.52 added Qwen2_5_VLTextConfig)
        cfg = cls(vision_config=vision, **text, **ids)
    model_io.forward_vocab_size(cfg)
    return cfg


def qwen2_5_vl_config():
    """Tiny Qwen2.5-VL: 4 ViT blocks (1 and 3 full attention, the others windowed), head_dim 16 in both towers."""
    vision = dict(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=2,  # head_dim 16
        in_chans=3, in_channels=3,  # the channel count's name changed (shims.model_io.vision_channels): give both
        patch_size=14, temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE, window_size=WINDOW_PX,
        fullatt_block_indexes=[1, 3], out_hidden_size=TINY_TEXT["hidden_size"], tokens_per_second=2,
    )
    text = dict(TINY_TEXT, rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": TINY_MROPE})
    return _build("Qwen2_5_VLConfig", vision, text)


def qwen3_vl_config():
    """Tiny Qwen3-VL: 4 ViT blocks with deepstack taps at 1 and 2, an 8×8 learned position grid."""
    require("Qwen3VLConfig", "qwen3vl")
    vision = dict(QWEN3_TINY_VISION, deepstack_visual_indexes=[1, 2])  # fed into text layers 0 and 1
    text = dict(TINY_TEXT, head_dim=16, rope_theta=10000.0, rope_scaling=QWEN3_TINY_ROPE)
    return _build("Qwen3VLConfig", vision, text)


QWEN2_5_VL = Family(
    model_type="qwen2_5_vl",
    model_id="qwen2_5vl",
    model_class="Qwen2_5_VLForConditionalGeneration",
    tiny_config=qwen2_5_vl_config,
    geometry=geometry,
    layout="patches",
    head_dims=(80, 128),  # Qwen2.5-VL-7B: ViT 1280 / 16 heads; text 128
    sequence_parallel=True,
    anchors={
        **standard_anchors(QWEN25, "Qwen2_5_VLVisionAttention", "Qwen2_5_VLForConditionalGeneration"),
        "vision_dense_mask": (f"{QWEN25}.Qwen2_5_VisionTransformerPretrainedModel._prepare_attention_mask",),
        "text_classes": (f"{QWEN25}.QWEN2_5_VL_ATTENTION_CLASSES", f"{QWEN25}.apply_multimodal_rotary_pos_emb"),
        # shims.model_io: the text model portvlm.distributed feeds inputs_embeds + positions by keyword
        "model_io": (f"{QWEN25}.Qwen2_5_VLTextModel.forward",),
    },
    description="Qwen2.5-VL",
)

QWEN3_VL = Family(
    model_type="qwen3_vl",
    model_id="qwen3vl",
    model_class="Qwen3VLForConditionalGeneration",
    tiny_config=qwen3_vl_config,
    geometry=qwen3_geometry,
    layout="patches",
    head_dims=(72, 128),  # Qwen3-VL-8B: ViT 1152 / 16 heads; text 128
    sequence_parallel=True,
    anchors={
        **standard_anchors(QWEN3, "Qwen3VLVisionAttention", "Qwen3VLForConditionalGeneration"),
        # shims.model_io.deepstack_kwargs: visual_pos_masks / deepstack_visual_embeds are taken by keyword
        "model_io": (f"{QWEN3}.Qwen3VLTextModel.forward",),
    },
    description="Qwen3-VL",
)
