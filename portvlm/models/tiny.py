"""Tiny random-init models of the registered families, seeded so every transformers version gets the same weights.

No weights exist here: every model is built from its family's ``tiny_config`` (small enough for a CPU, with the
shapes that matter to attention ports kept real). Weights are re-drawn by portvlm (``reinit``), not by transformers'
``_init_weights``: the same seed gives the same weights on every transformers version, and the scale is
~1/sqrt(fan_in), so attention is peaked enough that a wrong softmax scale or a dropped mask shows up far above fp32
noise (with transformers' std 0.02 attention is almost uniform and such bugs hide under the tolerance).
"""

from __future__ import annotations

import torch

from portvlm import models
from portvlm.models import inputs as model_inputs
from portvlm.models.family import BOS, EOS, IMG, LLAVA_IMG, PAD, VEND, VID, VOCAB, VSTART  # noqa: F401 - the tiny ids
from portvlm.models.inputs import InputGeometry


def model_ids() -> tuple[str, ...]:
    """The tiny models the registry can build (matrix model ids, variants included)."""
    return models.model_ids()


def unsupported(model_id: str):
    """The ``UnsupportedError`` for a family the installed transformers does not ship (names the first that does)."""
    import transformers

    from portvlm.errors import UnsupportedError
    from portvlm.policy import packaged_matrix

    family = models.by_id(model_id)
    declared = next((m for m in packaged_matrix().models if m.id == model_id), None)
    first = f">= {declared.min_transformers}" if declared is not None else "that ships it"
    return UnsupportedError(f"{model_id} needs transformers {first} ({family.description or family.model_type}), "
                            f"found {transformers.__version__}")


def config(model_id: str):
    """The tiny config of ``model_id`` (a matrix model id) on the installed transformers."""
    return models.by_id(model_id).tiny_config()


def model_class(model_id: str):
    """The ForConditionalGeneration class of ``model_id`` on the installed transformers."""
    family = models.by_id(model_id)
    import transformers

    if isinstance(family.model_class, str) and not hasattr(transformers, family.model_class):
        raise unsupported(model_id)
    return family.load_class()


def geometry(model_id: str) -> InputGeometry:
    """The input geometry of tiny model ``model_id``, read from its tiny config as from any config."""
    return model_inputs.geometry(model_id)


def is_available(model_id: str) -> list[str]:
    """Reasons ``model_id`` cannot be built with the installed transformers (empty = it can)."""
    try:
        model_class(model_id)
    except Exception as exc:  # noqa: BLE001 - a reason, not a crash
        return [str(exc)]
    return []


@torch.no_grad()
def reinit(model: torch.nn.Module, seed: int) -> None:
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
    family = models.by_id(model_id)
    cfg = config(model_id)
    cls = model_class(model_id)
    model = cls._from_config(cfg, attn_implementation=attn_implementation)
    reinit(model, seed)
    variant = family.variant(model_id)
    if variant is not None:
        variant.convert(model)
    return model.to(dtype).eval()


def family_figures(model_id: str, dtype) -> dict:
    """Figures every result of ``model_id`` carries beyond its suite's (a variant's, e.g. llava_mla's KV bytes)."""
    variant = models.by_id(model_id).variant(model_id)
    if variant is None or variant.figures is None:
        return {}
    from portvlm.backends import normalize_dtype

    return variant.figures(config(model_id), getattr(torch, normalize_dtype(dtype)))


def clone(model, *, attn_implementation: str = "eager", dtype: torch.dtype = torch.float32, model_id: str):
    """A fresh instance with ``model``'s exact state dict (never trust two seeded builds to agree)."""
    other = build(model_id, attn_implementation=attn_implementation, dtype=torch.float32)
    other.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    return other.to(dtype).eval()


IGNORE_INDEX = -100  # transformers' (and torch's cross_entropy default) label that contributes no loss


def labelled(sample: dict) -> dict:
    """``sample`` plus ``labels``: its input ids, with the tiny vision and special tokens ignored (-100)."""
    labels = sample["input_ids"].clone()
    labels[torch.isin(labels, torch.tensor([IMG, VID, VSTART, VEND, LLAVA_IMG]))] = IGNORE_INDEX
    return {**sample, "labels": labels}
