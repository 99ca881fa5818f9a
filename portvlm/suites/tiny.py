"""Tiny random-init models shaped like the real ones, and the inputs the suites feed them.

No weights exist here: every model is built from a config small enough for a CPU, but with the shapes that
matter to attention ports kept real — GQA text heads, mrope sections, Qwen2.5-VL's windowed + full-attention
ViT blocks (window 112 px / patch 14 / merge 2, so an image of more than 8×8 patches spans several windows),
Qwen3-VL's deepstack indexes, LLaVA's CLIP tower with a CLS token dropped by the "default" strategy.

Weights are re-drawn by portvlm (``_reinit``), not by transformers' ``_init_weights``: the same seed gives the same
weights on every transformers version, and the scale is ~1/sqrt(fan_in), so attention is peaked enough that a
wrong softmax scale or a dropped mask shows up far above fp32 noise (with transformers' std 0.02 attention is almost
uniform and such bugs hide under the tolerance).

Qwen inputs carry explicit 3-D mrope ``position_ids`` computed here (``mrope_positions``), independently of the
installed version's ``get_rope_index`` (whose signature changed, e.g. 5.x needs ``mm_token_type_ids``): the
reference and the patched model see identical positions, and packing / streaming can reset or slice them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

MODEL_IDS = ("qwen2_5vl", "qwen3vl", "llava", "llava_mla")

# llava_mla: the tiny LLaVA below, converted by portvlm.mla.convert (MHA2MLA: partial RoPE + joint SVD) — the
# conversion is part of the family. Reduced rank (full rank is 28 per KV head here), so the latent path is real.
MLA_SPEC = dict(rank=8, rope_dims=4, selection="2-norm")
INPUT_FAMILY = {"llava_mla": "llava"}  # families fed the same inputs as another


def input_family(model_id: str) -> str:
    """The family whose inputs ``model_id`` takes (llava_mla is a LLaVA to its inputs)."""
    return INPUT_FAMILY.get(model_id, model_id)

# Token ids inside the tiny vocab (all < VOCAB).
VOCAB = 256
PAD, BOS, EOS = 0, 1, 2
IMG, VID, VSTART, VEND = 250, 251, 252, 253
LLAVA_IMG = 255

# Text decoder shared by all three families: 4 query heads, 2 kv heads (GQA), head_dim 16, 2 layers.
_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
    tie_word_embeddings=False,
)
_MROPE = [2, 3, 3]  # t/h/w sections of head_dim/2 = 8

# Per-family geometry the inputs need (``geometry`` gathers it; ``InputGeometry.of`` reads the same from a config).
PATCH = {"qwen2_5vl": 14, "qwen3vl": 16, "llava": 14}
MERGE = 2
TEMPORAL_PATCH = 2
LLAVA_IMAGE_SIZE = 56  # 4×4 patches + CLS per image
WINDOW_PX = 112  # Qwen2.5-VL: 112 px / 14 / merge 2 = 4 merged units = 8×8 patches per window


@dataclass(frozen=True)
class InputGeometry:
    """What building inputs needs to know of a model: its input family, token ids and the vision patch geometry.

    ``geometry(model_id)`` is the tiny models'; ``InputGeometry.of(model.config)`` reads any model's (portvlm.check).
    """

    family: str  # input family (a matrix model id): "qwen2_5vl" | "qwen3vl" | "llava"
    vocab: int
    bos: int
    pad: int
    image: int  # image token id
    video: int | None = None  # Qwen: video, vision start / end token ids
    vstart: int | None = None
    vend: int | None = None
    patch: int = 14
    merge: int = 2
    temporal: int = 2
    channels: int = 3
    image_size: int | None = None  # LLaVA
    window: int | None = None  # Qwen2.5-VL window size in patches

    @classmethod
    def of(cls, cfg) -> InputGeometry:
        """The geometry a transformers config (``model.config``) of a matrix-declared family describes."""
        from portvlm.policy import packaged_matrix

        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        vc = cfg.vision_config
        family = packaged_matrix().model_for_family(cfg.model_type).id
        vocab = int(getattr(text, "vocab_size", None) or cfg.vocab_size)
        bos = getattr(text, "bos_token_id", None)
        pad = getattr(text, "pad_token_id", None)
        bos, pad = 1 if bos is None else bos, 0 if pad is None else pad
        if family == "llava":
            image = getattr(cfg, "image_token_index", None)
            image = image if image is not None else cfg.image_token_id
            return cls(family, vocab, bos, pad, int(image), patch=vc.patch_size, image_size=vc.image_size,
                       channels=getattr(vc, "num_channels", 3))
        window = getattr(vc, "window_size", None)
        return cls(
            family, vocab, bos, pad, int(cfg.image_token_id), int(cfg.video_token_id),
            int(cfg.vision_start_token_id), int(cfg.vision_end_token_id),
            patch=vc.patch_size, merge=vc.spatial_merge_size, temporal=vc.temporal_patch_size,
            channels=getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3),
            window=window // vc.patch_size if window else None,
        )

    def special(self) -> set[int]:
        return {t for t in (self.bos, self.pad, self.image, self.video, self.vstart, self.vend) if t is not None}

    @property
    def pixel_dim(self) -> int:
        """Qwen: values per flattened patch row (channels × temporal patch × patch²)."""
        return self.channels * self.temporal * self.patch**2

    @property
    def image_tokens(self) -> int:
        """LLaVA: tokens one image becomes (patches; the "default" strategy drops CLS)."""
        return (self.image_size // self.patch) ** 2

    @property
    def frames_apart(self) -> bool:
        """Qwen3-VL separates video frames by timestamps: <vs> frame <ve> per temporal patch, each with grid t=1."""
        return self.family == "qwen3vl"


def geometry(model) -> InputGeometry:
    """The input geometry of tiny model ``model`` (a model id; an ``InputGeometry`` is returned as it is)."""
    if isinstance(model, InputGeometry):
        return model
    family = input_family(model)
    if family == "llava":
        return InputGeometry(family, VOCAB, BOS, PAD, LLAVA_IMG, patch=PATCH[family], image_size=LLAVA_IMAGE_SIZE)
    if family not in PATCH:
        raise KeyError(f"unknown tiny model {model!r}; known: {', '.join(MODEL_IDS)}")
    return InputGeometry(family, VOCAB, BOS, PAD, IMG, VID, VSTART, VEND, patch=PATCH[family], merge=MERGE,
                         temporal=TEMPORAL_PATCH, window=WINDOW_PX // PATCH[family] if family == "qwen2_5vl" else None)


def _transformers():
    import transformers

    return transformers


def _qwen_config(model_id: str):
    tf = _transformers()
    if model_id == "qwen2_5vl":
        cls = tf.Qwen2_5_VLConfig
        vision = dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,  # head_dim 16
            in_chans=3,
            in_channels=3,
            patch_size=PATCH[model_id],
            temporal_patch_size=TEMPORAL_PATCH,
            spatial_merge_size=MERGE,
            window_size=WINDOW_PX,
            fullatt_block_indexes=[1, 3],
            out_hidden_size=_TEXT["hidden_size"],
            tokens_per_second=2,
        )
        text = dict(_TEXT, rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": _MROPE})
    elif model_id == "qwen3vl":
        if not hasattr(tf, "Qwen3VLConfig"):
            raise _unsupported(model_id)
        cls = tf.Qwen3VLConfig
        vision = dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            in_channels=3,
            patch_size=PATCH[model_id],
            temporal_patch_size=TEMPORAL_PATCH,
            spatial_merge_size=MERGE,
            out_hidden_size=_TEXT["hidden_size"],
            num_position_embeddings=64,  # an 8×8 learned grid, interpolated to each image
            deepstack_visual_indexes=[1, 2],  # fed into text layers 0 and 1
        )
        text = dict(
            _TEXT,
            head_dim=16,
            rope_theta=10000.0,
            rope_scaling={"rope_type": "default", "mrope_section": _MROPE, "mrope_interleaved": True},
        )
    else:  # pragma: no cover - guarded by config()
        raise KeyError(model_id)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if "text_config" in getattr(cls, "sub_configs", {}):
        cfg = cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    else:  # ≤4.51: one flat config for the text model (transformers 4.52 added Qwen2_5_VLTextConfig)
        cfg = cls(vision_config=vision, **text, **ids)
    if not hasattr(cfg, "vocab_size"):
        # 4.52-4.56 (text_config split out, no forwarding __getattribute__ until 4.57) compute the loss with
        # `self.config.vocab_size` on the top-level config: give it the text model's.
        cfg.vocab_size = cfg.get_text_config().vocab_size
    return cfg


def _llava_config():
    tf = _transformers()
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=LLAVA_IMAGE_SIZE,
        patch_size=PATCH["llava"],
        projection_dim=32,
        layer_norm_eps=1e-5,
    )
    text = dict(_TEXT, model_type="llama", rope_theta=10000.0)
    kwargs = dict(
        vision_config=vision,
        text_config=text,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
        # <=4.47 LLaVA takes a prompt with fewer image tokens than this for an unexpanded (legacy) one: keep it true.
        image_seq_length=(LLAVA_IMAGE_SIZE // PATCH["llava"]) ** 2,
    )
    params = inspect.signature(tf.LlavaConfig.__init__).parameters
    kwargs["image_token_index" if "image_token_index" in params else "image_token_id"] = LLAVA_IMG
    return tf.LlavaConfig(**kwargs)


def _unsupported(model_id: str):
    from portvlm.errors import UnsupportedError
    from portvlm.matrix import default_matrix
    from portvlm.shims.versions import family_min_transformers

    tf = _transformers()
    model = default_matrix().model(model_id)
    first = family_min_transformers()[model.family]
    return UnsupportedError(f"{model_id} needs transformers >= {first} ({model.description.split(' (')[0]}), "
                            f"found {tf.__version__}")


def config(model_id: str):
    """The tiny config for ``model_id`` ("qwen2_5vl" | "qwen3vl" | "llava") on the installed transformers."""
    if input_family(model_id) == "llava":
        return _llava_config()
    if model_id in ("qwen2_5vl", "qwen3vl"):
        return _qwen_config(model_id)
    raise KeyError(f"unknown tiny model {model_id!r}; known: {', '.join(MODEL_IDS)}")


def model_class(model_id: str):
    """The ForConditionalGeneration class of ``model_id`` on the installed transformers."""
    tf = _transformers()
    name = {
        "qwen2_5vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3vl": "Qwen3VLForConditionalGeneration",
        "llava": "LlavaForConditionalGeneration",
        "llava_mla": "LlavaForConditionalGeneration",
    }[model_id]
    if not hasattr(tf, name):
        raise _unsupported(model_id)
    return getattr(tf, name)


def is_available(model_id: str) -> list[str]:
    """Reasons ``model_id`` cannot be built with the installed transformers (empty = it can)."""
    try:
        model_class(model_id)
    except Exception as exc:  # noqa: BLE001 - a reason, not a crash
        return [str(exc)]
    return []


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter from one seeded generator, in name order: version-independent weights."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = p.shape
        if p.dim() >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod()) if p.dim() > 2 else shape[1]
            if "embed_tokens" in name or "position_embedding" in name or name.endswith("pos_embed.weight"):
                std = 1.0
            else:
                std = fan_in**-0.5
            val = torch.randn(shape, generator=gen) * std
        elif "norm" in name.lower() or "ln" in name.split(".")[-2:][0].lower() or name.endswith("class_embedding"):
            val = (1.0 + 0.1 * torch.randn(shape, generator=gen)) if name.endswith("weight") else 0.1 * torch.randn(shape, generator=gen)
        else:  # biases
            val = 0.1 * torch.randn(shape, generator=gen)
        p.copy_(val.to(p.dtype))


def build(model_id: str, *, attn_implementation: str = "eager", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random-init ``model_id`` in eval mode; the same seed gives the same weights on every version."""
    cfg = config(model_id)
    cls = model_class(model_id)
    if hasattr(cls, "_from_config"):
        model = cls._from_config(cfg, attn_implementation=attn_implementation)
    else:  # pragma: no cover - every version read has _from_config; kept for forward compatibility
        cfg._attn_implementation = attn_implementation
        model = cls(cfg)
    _reinit(model, seed)
    if model_id == "llava_mla":
        from portvlm.mla.conversion import MLASpec, convert

        convert(model, MLASpec(**MLA_SPEC))
    return model.to(dtype).eval()


def family_figures(model_id: str, dtype) -> dict:
    """Figures every result of ``model_id`` carries beyond its suite's (llava_mla: KV bytes per token, MHA vs MLA)."""
    if model_id != "llava_mla":
        return {}
    from portvlm.mla.conversion import Geometry as MLAGeometry
    from portvlm.mla.conversion import MLASpec, kv_figures
    from portvlm.suites.tolerances import _dtype_name

    size = torch.empty((), dtype=getattr(torch, _dtype_name(dtype))).element_size()
    return {"kv_bytes_per_token": kv_figures(MLAGeometry.of(config(model_id)), MLASpec(**MLA_SPEC), size)}


def clone(model, *, attn_implementation: str = "eager", dtype: torch.dtype = torch.float32, model_id: str):
    """A fresh instance with ``model``'s exact state dict (never trust two seeded builds to agree)."""
    other = build(model_id, attn_implementation=attn_implementation, dtype=torch.float32)
    other.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    return other.to(dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------

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

    ``model``: a tiny model id or an ``InputGeometry`` (any Qwen model's, read from its config).
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
        segs += [Segment("video", grid=PACKED_VIDEO), Segment("text", text_tokens(geo, 5, g))]
        return segs
    raise KeyError(kind)


def inputs(model, kind: str, dtype: torch.dtype = torch.float32, *, padding_side: str = "left", seed: int = 0,
           llava_bos: bool = False) -> dict[str, Any]:
    """Model kwargs for input ``kind`` ∈ ``KINDS`` (float tensors in ``dtype``); ``padded_batch`` pads on ``padding_side``.

    ``model``: a tiny model id or an ``InputGeometry``. ``llava_bos``: LLaVA prompts start with BOS (portvlm.check
    does, as a real prompt would; the suites' do not, so their recorded results stay comparable).
    """
    geo = geometry(model)
    if kind == "padded_batch":
        return _padded_batch(geo, dtype, padding_side, seed, llava_bos)
    if geo.family == "llava":
        n_img, lens = {"text": (0, [24]), "image": (1, [5, 6]), "packed": (3, [4, 3, 3, 5])}[kind]
        return _llava_sequence(geo, n_img, lens, dtype, seed, llava_bos)
    return qwen_sequence(geo, segments(geo, kind, seed), dtype, seed)


def _padded_batch(geo: InputGeometry, dtype, side: str, seed: int, llava_bos: bool) -> dict[str, Any]:
    """Two rows of different lengths (each with one image), padded with the geometry's pad id and masked."""
    g = _gen(seed + 2000)
    if geo.family == "llava":
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
    full = inputs(geo, kind, dtype, seed=seed)
    if geo.family == "llava":
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
    if geometry(model).family == "llava":
        return {"pixel_values": torch.cat([i["pixel_values"] for i in items], 0), "grid_thw": None}
    return {"pixel_values": torch.cat([i["pixel_values"] for i in items], 0), "grid_thw": torch.cat([i["grid_thw"] for i in items], 0)}


def num_windows(grid: tuple[int, int, int], window_patches: int = 8) -> int:
    """How many Qwen2.5-VL attention windows one grid spans (per frame × frames)."""
    t, h, w = grid
    return t * (-(-h // window_patches)) * (-(-w // window_patches))
