"""Where a VLM keeps its decoder layers, vision tower, vision blocks, projector and lm_head, on every version.

Shim ``layer_paths`` answers the 4.52.0 layout change (``*Model`` split out of
``*ForConditionalGeneration``; ``m.model.layers`` → ``m.model.language_model.layers``, ``m.visual`` →
``m.model.visual``, LLaVA ``m.language_model.model.layers`` → ``m.model.language_model.layers``) and the 5.0.0
removal of the backward-compatible ``visual`` / ``language_model`` properties. Paths are probed in order (the
canonical current one first); the version is never consulted. Facts: ../shared/research/transformers-breakpoints.md §2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from portvlm.errors import UnsupportedError

# Candidate attribute paths per part, canonical (4.52+) first. A path is tried on the model instance.
TEXT_LAYERS = ("model.language_model.layers", "model.layers", "language_model.model.layers", "language_model.layers")
VISION_TOWER = ("model.visual", "visual", "model.vision_tower", "vision_tower")
LM_HEAD = ("lm_head", "language_model.lm_head")
# Relative to the vision tower: Qwen ViTs keep `.blocks`; CLIP/SigLIP keep `.vision_model.encoder.layers`.
VISION_BLOCKS = ("blocks", "vision_model.encoder.layers", "encoder.layers")
# Qwen's patch merger sits inside the tower; LLaVA's projector beside it.
PROJECTOR = ("model.multi_modal_projector", "multi_modal_projector", "model.visual.merger", "visual.merger")


@dataclass(frozen=True)
class LayerPaths:
    text_layers: object  # nn.ModuleList of decoder layers
    vision_tower: object
    vision_blocks: object  # nn.ModuleList of ViT blocks
    projector: object
    lm_head: object
    decoder_layer_classes: tuple  # for FSDP auto-wrap (transformer_auto_wrap_policy wants classes)
    vision_block_classes: tuple
    paths: dict = field(default_factory=dict, compare=False)  # part -> the attribute path that resolved

    @property
    def decoder_layer_class_names(self) -> tuple[str, ...]:
        """Class names (accelerate's ``fsdp_transformer_layer_cls_to_wrap`` wants names)."""
        return tuple(c.__name__ for c in self.decoder_layer_classes)

    @property
    def vision_block_class_names(self) -> tuple[str, ...]:
        return tuple(c.__name__ for c in self.vision_block_classes)


def _get(obj, path: str):
    for part in path.split("."):
        # getattr on nn.Module raises AttributeError for a missing child; properties removed in 5.0 do too.
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _first(obj, candidates: tuple[str, ...], part: str, model_type: str, prefix: str = ""):
    for path in candidates:
        found = _get(obj, path)
        if found is not None:
            return found, prefix + path
    raise UnsupportedError(
        f"layer_paths: cannot find the {part} of a {model_type} model on this transformers version "
        f"(tried {', '.join(prefix + c for c in candidates)}): upstream moved it (update portvlm.shims.layer_paths), "
        "or this model is laid out unlike the families portvlm declares (portvlm/models/)"
    )


def family_of(model) -> str:
    """``config.model_type`` of a VLM (``UnsupportedError`` for an object without a config).

    No family list here: the paths are probed on the instance. Which families portvlm supports is the matrix's
    ``models:`` (``patch`` gates on it) and ``portvlm.models`` (the records).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise UnsupportedError(f"{type(model).__name__} has no config.model_type: not a transformers VLM")
    return model_type


def _classes(modules) -> tuple:
    seen: dict = {}
    for m in modules:
        seen.setdefault(type(m), None)
    return tuple(seen)


def resolve(model) -> LayerPaths:
    """Find the parts of a VLM ``*ForConditionalGeneration`` instance (text layers, vision tower and blocks, …)."""
    from portvlm.wrappers import foreign_reasons, wrapper_of

    model_type = family_of(model)
    wrapper = wrapper_of(model)
    if wrapper is not None:  # PeftModel forwards .config, so the family check passes on the wrapper
        raise UnsupportedError(f"layer_paths: {type(model).__name__} is a {wrapper.label}, not the model: pass "
                               "portvlm.wrappers.unwrap(model).model (patch, check and parallelize do that)")
    reasons = foreign_reasons(model)
    if reasons:
        raise UnsupportedError(f"layer_paths: {reasons[0]}")
    text_layers, text_path = _first(model, TEXT_LAYERS, "text decoder layers", model_type)
    tower, tower_path = _first(model, VISION_TOWER, "vision tower", model_type)
    blocks, blocks_path = _first(tower, VISION_BLOCKS, "vision blocks", model_type, prefix=tower_path + ".")
    projector, projector_path = _first(model, PROJECTOR, "projector", model_type)
    lm_head, lm_head_path = _first(model, LM_HEAD, "lm_head", model_type)
    return LayerPaths(
        text_layers=text_layers,
        vision_tower=tower,
        vision_blocks=blocks,
        projector=projector,
        lm_head=lm_head,
        decoder_layer_classes=_classes(text_layers),
        vision_block_classes=_classes(blocks),
        paths={
            "text_layers": text_path,
            "vision_tower": tower_path,
            "vision_blocks": blocks_path,
            "projector": projector_path,
            "lm_head": lm_head_path,
        },
    )
