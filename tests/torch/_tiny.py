"""Fixtures for the shims tests: ``portvlm.models.tiny``'s models (the one tiny-model factory), keyed by transformers
family, and the packed inputs these tests feed them.

The same configs build on transformers 4.50 … 5.24; no weights are downloaded. The family ↔ model id map is the
family records' (``portvlm.models``).
"""

from __future__ import annotations

import inspect

import torch
import transformers

from portvlm import models
from portvlm.models import tiny
from portvlm.shims.model_io import vision_features as _vision_features

IMG, VID, VSTART, VEND = tiny.IMG, tiny.VID, tiny.VSTART, tiny.VEND
# The shim tests' own families (every transformers 4.50-5.24 CI stack builds them); the 5.x families declared for
# issue 24 are covered by their matrix cells and tests/torch/test_generic_families.py, not by every shim test
# (each would add minutes per CI stack).
FAMILIES = tuple(t for t in models.model_types() if t in ("qwen2_5_vl", "qwen3_vl", "llava"))

# Different sizes, a windowed-with-padding image, and a 2-frame video (t=2), packed into one vision call.
GRIDS = [(1, 4, 4), (1, 12, 8), (2, 4, 8)]
# What the full model gets: images only (video prompts need per-family frame/timestamp framing).
IMAGE_GRIDS = [(1, 4, 4), (1, 12, 8), (1, 8, 4)]
_LLAVA_TOKENS = tiny.geometry("llava").image_tokens  # CLS dropped by the "default" strategy


def model_id(family: str) -> str:
    return models.by_type(family).model_id


def available(family: str) -> list[str]:
    """Why this family cannot be built here (empty: it can)."""
    return tiny.is_available(model_id(family))


def build(family: str, attn_implementation: str = "eager", seed: int = 0):
    return tiny.build(model_id(family), attn_implementation=attn_implementation, seed=seed)


def pixels(family: str, grids=GRIDS, seed: int = 1):
    """``(pixel_values, grid_thw)`` for Qwen families; ``[N, 3, S, S]`` images for LLaVA."""
    g = torch.Generator().manual_seed(seed)
    geo = tiny.geometry(model_id(family))
    if geo.layout == "images":
        size = geo.image_size
        return torch.randn(len(grids), geo.channels, size, size, generator=g), None
    rows = [torch.randn(t * h * w, geo.pixel_dim, generator=g) for t, h, w in grids]
    return torch.cat(rows), torch.tensor(grids)


def vision_tokens(family: str, grids=GRIDS) -> list[int]:
    """LLM tokens each image/video becomes after the merger."""
    if models.by_type(family).layout == "images":
        return [_LLAVA_TOKENS] * len(grids)
    merge = tiny.geometry(model_id(family)).merge
    return [t * h * w // merge**2 for t, h, w in grids]


def inputs(family: str, grids=IMAGE_GRIDS, seed: int = 1) -> dict:
    """Model inputs: a short prompt with every image of ``grids`` in one sequence (LLaVA: one image each row)."""
    pv, grid = pixels(family, grids, seed)
    if models.by_type(family).layout == "images":
        ids = torch.tensor([[3, 4] + [tiny.LLAVA_IMG] * _LLAVA_TOKENS + [5, 6, 7]] * len(grids))
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv)
    ids = [3, 4]
    for n in vision_tokens(family, grids):
        ids += [VSTART] + [IMG] * n + [VEND, 5]
    ids = torch.tensor([ids + [6, 7]])
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid)
    if "mm_token_type_ids" in inspect.signature(tiny.model_class(model_id(family)).forward).parameters:
        # 5.x Qwen: multimodal RoPE wants the token types (text 0, image 1, video 2) the processor would return.
        out["mm_token_type_ids"] = (ids == IMG).int()
    return out


def vision_features(family: str, tower, pv, grid):
    """Merged vision features ``[N_tokens, D]`` of the tower (``portvlm.shims.model_io.vision_features``)."""
    features = _vision_features(models.by_type(family).layout, tower, pv, grid)["features"]
    return features.reshape(-1, features.shape[-1])


__all__ = ["FAMILIES", "GRIDS", "IMAGE_GRIDS", "available", "build", "inputs", "pixels", "transformers",
           "vision_features", "vision_tokens"]
