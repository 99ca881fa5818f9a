"""Tiny random-init configs for the three families, shaped like the real models (heads, window, merge, GQA).

Test fixtures for the shims tests only (``portvlm.suites.tiny`` belongs to the suites; these stay independent of it).
The same dicts build on transformers 4.50 … 5.23; no weights are downloaded.
"""

from __future__ import annotations

import inspect

import torch
import transformers

IMG, VID, VSTART, VEND = 250, 251, 252, 253
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")

_TEXT = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,  # head_dim 16
    num_key_value_heads=2,  # GQA, as in the real models
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
)
_TOKENS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)

CONFIGS = {
    "qwen2_5_vl": dict(
        text_config=dict(_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=64,
            fullatt_block_indexes=[1],  # block 0 and 2 windowed, block 1 full
        ),
        **_TOKENS,
    ),
    "qwen3_vl": dict(
        text_config=dict(_TEXT, head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                           "mrope_interleaved": True}),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
            deepstack_visual_indexes=[1],
        ),
        **_TOKENS,
    ),
    "llava": dict(
        text_config=dict(_TEXT, model_type="llama"),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32,
        ),
        image_token_index=IMG,
        image_seq_length=4,  # (28/14)^2 patches, CLS dropped by the "default" strategy
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    ),
}

CLASSES = {
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
}

PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}
# Different sizes, a windowed-with-padding image, and a 2-frame video (t=2), packed into one vision call.
GRIDS = [(1, 4, 4), (1, 12, 8), (2, 4, 8)]
# What the full model gets: images only (video prompts need per-family frame/timestamp framing).
IMAGE_GRIDS = [(1, 4, 4), (1, 12, 8), (1, 8, 4)]


def available(family: str) -> list[str]:
    """Why this family cannot be built here (empty: it can)."""
    if not hasattr(transformers, CLASSES[family][1]):
        return [f"{CLASSES[family][1]} is not in transformers {transformers.__version__} (Qwen3-VL first ships in 4.57.1)"]
    return []


def build(family: str, attn_implementation: str = "eager", seed: int = 0):
    cfg_cls, model_cls = (getattr(transformers, n) for n in CLASSES[family])
    kwargs = dict(CONFIGS[family])
    if family == "qwen2_5_vl" and "text_config" not in getattr(cfg_cls, "sub_configs", {}):
        # <=4.51: Qwen2_5_VLConfig is flat (text fields at the top level), see breakpoints §2.
        kwargs.update(kwargs.pop("text_config"))
    cfg = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    return model_cls._from_config(cfg, attn_implementation=attn_implementation).eval()


def pixels(family: str, grids=GRIDS, seed: int = 1):
    """``(pixel_values, grid_thw)`` for Qwen families; ``[N, 3, 28, 28]`` images for LLaVA."""
    g = torch.Generator().manual_seed(seed)
    if family == "llava":
        return torch.randn(len(grids), 3, 28, 28, generator=g), None
    p = PATCH[family]
    rows = [torch.randn(t * h * w, 3 * 2 * p * p, generator=g) for t, h, w in grids]
    return torch.cat(rows), torch.tensor(grids)


def vision_tokens(family: str, grids=GRIDS) -> list[int]:
    """LLM tokens each image/video becomes after the merger."""
    if family == "llava":
        return [4] * len(grids)
    return [t * h * w // 4 for t, h, w in grids]


def inputs(family: str, grids=IMAGE_GRIDS, seed: int = 1) -> dict:
    """Model inputs: a short prompt with every image of ``grids`` in one sequence (LLaVA: one image each row)."""
    pv, grid = pixels(family, grids, seed)
    if family == "llava":
        ids = torch.tensor([[2, 3] + [IMG] * 4 + [5, 6, 7]] * len(grids))
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv)
    ids = [2, 3]
    for n in vision_tokens(family, grids):
        ids += [VSTART] + [IMG] * n + [VEND, 5]
    ids = torch.tensor([ids + [6, 7]])
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid)
    if "mm_token_type_ids" in inspect.signature(getattr(transformers, CLASSES[family][1]).forward).parameters:
        # 5.x Qwen: multimodal RoPE wants the token types (text 0, image 1, video 2) the processor would return.
        out["mm_token_type_ids"] = (ids == IMG).int()
    return out


def vision_features(family: str, tower, pv, grid):
    """Merged vision features ``[N_tokens, D]`` of the tower, whatever the version returns."""
    if family == "llava":
        out = tower(pv, output_hidden_states=True)
        return out.hidden_states[-2][:, 1:].reshape(-1, out.hidden_states[-2].shape[-1])
    out = tower(pv, grid_thw=grid)
    if isinstance(out, tuple):  # Qwen3-VL 4.57: (merged, deepstack)
        out = out[0]
    if hasattr(out, "pooler_output"):  # 5.x: BaseModelOutputWithPooling(pooler_output=merged)
        out = out.pooler_output
    return out
