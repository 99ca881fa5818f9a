"""Model inputs for any registered family, built from its ``InputGeometry`` (a tiny model's or a user's config).

Text, one image, several images and a video packed in one sequence, and a padded batch, as model kwargs. Qwen-style
("patches") inputs carry explicit 3-D mrope ``position_ids`` computed here (``mrope_positions``), independently of
the installed version's ``get_rope_index`` (whose signature changed, e.g. 5.x needs ``mm_token_type_ids``): the
reference and the patched model see identical positions, and packing / streaming can reset or slice them.
The suites, ``portvlm.check`` and the benchmarks build their inputs here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from portvlm.models.family import PAD


@dataclass(frozen=True)
class InputGeometry:
    """What building inputs needs to know of a model: its layout, token ids and the vision patch geometry.

    ``geometry(model_id)`` is a tiny model's; ``geometry(config)`` reads any registered family's config.
    """

    model_type: str  # transformers model_type: "qwen2_5_vl" | "qwen3_vl" | "llava" | …
    layout: str  # portvlm.models.family.LAYOUTS: "patches" (Qwen-VL style) | "images" (LLaVA style)
    vocab: int
    bos: int
    pad: int
    image: int  # image token id
    video: int | None = None  # patches: video, vision start / end token ids
    vstart: int | None = None
    vend: int | None = None
    patch: int = 14
    merge: int = 2
    temporal: int = 2
    channels: int = 3
    image_size: int | None = None  # images layout
    window: int | None = None  # Qwen2.5-VL window size in patches (None: no windowed blocks)
    frames_apart: bool = False  # Qwen3-VL: <vs> frame <ve> per temporal patch, each with grid t=1
    # False where one prompt cannot hold images and a video together (GLM-4.xV: video frames use the image token,
    # and get_placeholder_mask counts both media against it): the "packed" input is then images only
    mixes_media: bool = True

    def special(self) -> set[int]:
        return {t for t in (self.bos, self.pad, self.image, self.video, self.vstart, self.vend) if t is not None}

    @property
    def pixel_dim(self) -> int:
        """Patches layout: values per flattened patch row (channels × temporal patch × patch²)."""
        return self.channels * self.temporal * self.patch**2

    @property
    def image_tokens(self) -> int:
        """Images layout: tokens one image becomes (patches; the "default" strategy drops CLS)."""
        return (self.image_size // self.patch) ** 2


def text_ids(cfg) -> tuple[int, int, int]:
    """``(vocab, bos, pad)`` of a VLM config's text model (bos 1 / pad 0 where the config leaves them unset)."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = int(getattr(text, "vocab_size", None) or cfg.vocab_size)
    bos = getattr(text, "bos_token_id", None)
    pad = getattr(text, "pad_token_id", None)
    return vocab, 1 if bos is None else bos, 0 if pad is None else pad


def geometry(model) -> InputGeometry:
    """The input geometry of ``model``: a tiny model id, any registered family's config, or a geometry as it is."""
    if isinstance(model, InputGeometry):
        return model
    from portvlm import models

    if isinstance(model, str):
        return _tiny_geometry(model, models.by_id(model).model_type)
    return models.by_type(model.model_type).geometry(model)


@functools.cache
def _tiny_geometry(model_id: str, model_type: str) -> InputGeometry:
    """A tiny model's geometry, read from its family's tiny config as from any config (cached per registered type)."""
    from portvlm import models

    return models.by_type(model_type).geometry(models.by_id(model_id).tiny_config())


# Grids in patches (t, h, w). Window = 8×8 patches, so 16×16 spans 4 windows, 8×12 and 12×8 span 2 (one partial).
SINGLE_IMAGE = (1, 12, 16)
PACKED_IMAGES = ((1, 16, 16), (1, 8, 12), (1, 12, 8))
PACKED_VIDEO = (2, 8, 8)  # t=2 temporal patches = 4 frames
KINDS = ("text", "image", "packed", "padded_batch")
# The parity cases (kind, padding side) the suites and portvlm.check compare logits on.
CASES = (("text", None), ("image", None), ("packed", None), ("padded_batch", "left"), ("padded_batch", "right"))


def case_name(kind: str, side: str | None) -> str:
    return kind if side is None else f"{kind}_{side}"


@dataclass
class Segment:
    """A piece of one sequence: text tokens, or one image / video with its patch grid."""

    kind: str  # "text" | "image" | "video"
    tokens: list[int] | None = None
    grid: tuple[int, int, int] | None = None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def text_tokens(geo: InputGeometry, n: int, g: torch.Generator) -> list[int]:
    """``n`` random ordinary token ids: below 200 and the vocab, none of the geometry's special ids."""
    ids = [t for t in range(3, min(geo.vocab, 200)) if t not in geo.special()]
    return [ids[i] for i in torch.randint(0, len(ids), (n,), generator=g).tolist()]


def vision_tokens(model, seg: Segment) -> list[int]:
    """The token ids one image / video segment becomes in a Qwen sequence (``model``: a model id or a geometry)."""
    geo = geometry(model)
    t, h, w = seg.grid
    per_frame = (h // geo.merge) * (w // geo.merge)
    tok = geo.image if seg.kind == "image" else geo.video
    if geo.frames_apart and seg.kind == "video":
        out: list[int] = []
        for _ in range(t):
            out += [geo.vstart] + [tok] * per_frame + [geo.vend]
        return out
    return [geo.vstart] + [tok] * (t * per_frame) + [geo.vend]


def mrope_positions(model, segments: list[Segment], start: int = 0) -> torch.Tensor:
    """``[3, S]`` t/h/w positions of one sequence, Qwen-style, computed here (independent of the version)."""
    geo = geometry(model)
    rows: list[torch.Tensor] = []
    nxt = start
    for seg in segments:
        if seg.kind == "text":
            n = len(seg.tokens)
            rows.append(torch.arange(nxt, nxt + n).expand(3, n))
            nxt += n
            continue
        t, h, w = seg.grid
        gh, gw = h // geo.merge, w // geo.merge
        frames = [1] * t if (geo.frames_apart and seg.kind == "video") else [t]
        for ft in frames:
            rows.append(torch.full((3, 1), nxt))  # <vision_start>
            nxt += 1
            step = 2 if seg.kind == "video" else 0  # tokens_per_second × seconds per temporal patch
            tt = (torch.arange(ft) * step).view(-1, 1, 1).expand(ft, gh, gw).flatten()
            hh = torch.arange(gh).view(1, -1, 1).expand(ft, gh, gw).flatten()
            ww = torch.arange(gw).view(1, 1, -1).expand(ft, gh, gw).flatten()
            block = torch.stack([tt, hh, ww]) + nxt
            rows.append(block)
            nxt = int(block.max()) + 1
            rows.append(torch.full((3, 1), nxt))  # <vision_end>
            nxt += 1
    return torch.cat(rows, dim=1).long()


def _pixels(geo: InputGeometry, grids: list[tuple[int, int, int]], g: torch.Generator, dtype) -> torch.Tensor | None:
    if not grids:
        return None
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, geo.pixel_dim, generator=g).to(dtype)


def qwen_sequence(model, segments: list[Segment], dtype=torch.float32, seed: int = 0) -> dict[str, Any]:
    """Model kwargs for one Qwen sequence (batch 1) made of ``segments``, with explicit mrope positions.

    ``model``: a tiny model id, a config or an ``InputGeometry`` (any Qwen model's, read from its config).
    """
    geo = geometry(model)
    g = _gen(seed)
    ids: list[int] = []
    images, videos = [], []
    for seg in segments:
        if seg.kind == "text":
            ids += seg.tokens
        else:
            ids += vision_tokens(geo, seg)
            (images if seg.kind == "image" else videos).append(seg.grid)
    out: dict[str, Any] = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    out["position_ids"] = mrope_positions(geo, segments)[:, None, :]
    if images:
        out["pixel_values"] = _pixels(geo, images, g, dtype)
        out["image_grid_thw"] = torch.tensor(images)
    if videos:
        out["pixel_values_videos"] = _pixels(geo, videos, g, dtype)
        out["video_grid_thw"] = torch.tensor(videos)
    return out


def _llava_sequence(geo: InputGeometry, n_images: int, text_lens: list[int], dtype, seed: int, bos: bool) -> dict[str, Any]:
    g = _gen(seed)
    ids: list[int] = ([geo.bos] if bos else []) + text_tokens(geo, text_lens[0], g)
    for i in range(n_images):
        ids += [geo.image] * geo.image_tokens + text_tokens(geo, text_lens[i + 1], g)
    out: dict[str, Any] = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    out["position_ids"] = torch.arange(len(ids))[None]
    if n_images:
        size = geo.image_size
        out["pixel_values"] = torch.randn(n_images, geo.channels, size, size, generator=g).to(dtype)
    return out


def segments(model, kind: str, seed: int = 0) -> list[Segment]:
    """The Qwen segments of input ``kind`` (text / image / packed); ``model``: a model id or a geometry."""
    geo = geometry(model)
    g = _gen(seed + 1000)
    if kind == "text":
        return [Segment("text", [geo.bos] + text_tokens(geo, 23, g))]
    if kind == "image":
        return [Segment("text", [geo.bos] + text_tokens(geo, 5, g)), Segment("image", grid=SINGLE_IMAGE),
                Segment("text", text_tokens(geo, 6, g))]
    if kind == "packed":
        segs = [Segment("text", [geo.bos] + text_tokens(geo, 4, g))]
        for grid in PACKED_IMAGES:
            segs += [Segment("image", grid=grid), Segment("text", text_tokens(geo, 3, g))]
        if geo.mixes_media:
            segs += [Segment("video", grid=PACKED_VIDEO), Segment("text", text_tokens(geo, 5, g))]
        return segs
    raise KeyError(kind)


def build(model, kind: str, dtype: torch.dtype = torch.float32, *, padding_side: str = "left", seed: int = 0,
          llava_bos: bool = False) -> dict[str, Any]:
    """Model kwargs for input ``kind`` ∈ ``KINDS`` (float tensors in ``dtype``); ``padded_batch`` pads on ``padding_side``.

    ``model``: a tiny model id, a config or an ``InputGeometry``. ``llava_bos``: images-layout prompts start with BOS
    (portvlm.check does, as a real prompt would; the suites' do not, so their recorded results stay comparable).
    """
    geo = geometry(model)
    if kind == "padded_batch":
        return _padded_batch(geo, dtype, padding_side, seed, llava_bos)
    if geo.layout == "images":
        n_img, lens = {"text": (0, [24]), "image": (1, [5, 6]), "packed": (3, [4, 3, 3, 5])}[kind]
        return _llava_sequence(geo, n_img, lens, dtype, seed, llava_bos)
    return qwen_sequence(geo, segments(geo, kind, seed), dtype, seed)


def _padded_batch(geo: InputGeometry, dtype, side: str, seed: int, llava_bos: bool) -> dict[str, Any]:
    """Two rows of different lengths (each with one image), padded with the geometry's pad id and masked."""
    g = _gen(seed + 2000)
    if geo.layout == "images":
        rows = [_llava_sequence(geo, 1, [6, 8], dtype, seed, llava_bos),
                _llava_sequence(geo, 1, [2, 3], dtype, seed + 1, llava_bos)]
    else:
        rows = [
            qwen_sequence(geo, [Segment("text", [geo.bos] + text_tokens(geo, 6, g)), Segment("image", grid=(1, 8, 12)),
                                Segment("text", text_tokens(geo, 7, g))], dtype, seed),
            qwen_sequence(geo, [Segment("text", [geo.bos] + text_tokens(geo, 2, g)), Segment("image", grid=(1, 8, 8)),
                                Segment("text", text_tokens(geo, 3, g))], dtype, seed + 1),
        ]
    return pad_rows(rows, side, pad=geo.pad)


def pad_rows(rows: list[dict[str, Any]], side: str = "left", pad: int = PAD) -> dict[str, Any]:
    """Batch single-row kwargs: pad ids (with ``pad``)/mask/positions to the longest row; concatenate pixels and grids."""
    n = max(r["input_ids"].shape[1] for r in rows)
    ids, mask, pos = [], [], []
    for r in rows:
        k = n - r["input_ids"].shape[1]
        pad_ids = torch.full((1, k), pad, dtype=torch.long)
        pad_mask = torch.zeros(1, k, dtype=torch.long)
        p = r["position_ids"]
        pad_pos = torch.zeros(*p.shape[:-1], k, dtype=p.dtype)  # positions under padding are never attended
        cat = (lambda a, b: torch.cat([b, a], -1)) if side == "left" else (lambda a, b: torch.cat([a, b], -1))
        ids.append(cat(r["input_ids"], pad_ids))
        mask.append(cat(r["attention_mask"], pad_mask))
        pos.append(cat(p, pad_pos))
    out: dict[str, Any] = {
        "input_ids": torch.cat(ids, 0),
        "attention_mask": torch.cat(mask, 0),
        "position_ids": torch.cat(pos, -2),
    }
    for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"):
        parts = [r[key] for r in rows if key in r]
        if parts:
            out[key] = torch.cat(parts, 0)
    return out


def vision_items(model, kind: str = "packed", dtype=torch.float32, seed: int = 0) -> list[dict[str, Any]]:
    """The images/videos of input ``kind`` one at a time: ``[{"pixel_values", "grid_thw"}]`` in sequence order (the
    images, then the video: the order the model concatenates their features)."""
    geo = geometry(model)
    full = build(geo, kind, dtype, seed=seed)
    if geo.layout == "images":
        pv = full.get("pixel_values")
        return [] if pv is None else [{"pixel_values": pv[i : i + 1], "grid_thw": None} for i in range(pv.shape[0])]
    out, offsets = [], {"image": 0, "video": 0}
    for seg in (s for s in segments(geo, kind, seed) if s.kind != "text"):
        key = "pixel_values" if seg.kind == "image" else "pixel_values_videos"
        n = seg.grid[0] * seg.grid[1] * seg.grid[2]
        start = offsets[seg.kind]
        out.append({"pixel_values": full[key][start : start + n], "grid_thw": torch.tensor([seg.grid]), "kind": seg.kind})
        offsets[seg.kind] += n
    return out


def vision_batch(model, kind: str = "packed", dtype=torch.float32, seed: int = 0) -> dict[str, Any]:
    """All images/videos of ``kind`` packed into one vision-tower call: ``{"pixel_values", "grid_thw"}``."""
    items = vision_items(model, kind, dtype, seed)
    if geometry(model).layout == "images":
        return {"pixel_values": torch.cat([i["pixel_values"] for i in items], 0), "grid_thw": None}
    return {"pixel_values": torch.cat([i["pixel_values"] for i in items], 0), "grid_thw": torch.cat([i["grid_thw"] for i in items], 0)}


def num_windows(grid: tuple[int, int, int], window_patches: int = 8) -> int:
    """How many Qwen2.5-VL attention windows one grid spans (per frame × frames)."""
    t, h, w = grid
    return t * (-(-h // window_patches)) * (-(-w // window_patches))
