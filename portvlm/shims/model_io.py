"""What a VLM's config and forward look like on each transformers version: small accessors, one per upstream change.

The rest of portvlm (``models``, ``suites``, ``distributed``, ``check``, the benchmarks) calls these instead of
probing attribute names itself, so a transformers release that renames a field breaks one function here, and the
drift lane (``portvlm.drift.symbols``) names it. Each accessor probes the feature, not the version,
and says which upstream change it answers, in which range, and whether upstream has fixed it since.
"""

from __future__ import annotations

import inspect


def image_token_field(config_cls) -> str:
    """The LLaVA config constructor's image token parameter: ``image_token_index``, else ``image_token_id``.

    Upstream: 4.52.0 made ``image_token_id`` the name the model reads (an ``attribute_map`` alias of
    ``image_token_index``; research/transformers-breakpoints.md §LLaVA). The constructor still takes
    ``image_token_index`` on 4.50.3 and 5.24.0 (checked); the signature probe keeps a release that drops it working.
    """
    params = inspect.signature(config_cls.__init__).parameters
    return "image_token_index" if "image_token_index" in params else "image_token_id"


def image_token_id(cfg) -> int:
    """A VLM config's image token id under either name (4.49-4.51 read ``image_token_index``; 4.52+ ``image_token_id``)."""
    value = getattr(cfg, "image_token_index", None)
    return int(value if value is not None else cfg.image_token_id)


def vision_channels(vision_cfg) -> int:
    """A Qwen-VL vision config's input channels: ``in_channels``, else the Qwen2-VL-era ``in_chans``, else 3 (RGB).

    Upstream: Qwen2-VL's vision config called the field ``in_chans``; Qwen2.5-VL's takes ``in_channels`` (4.50.3 and
    5.24.0 checked) and Qwen3-VL's too. Configs saved under the old name still carry it, so both are read; the tiny
    configs pass both so every version finds its own.
    """
    return getattr(vision_cfg, "in_channels", None) or getattr(vision_cfg, "in_chans", None) or 3


def forward_vocab_size(cfg) -> None:
    """Give a split VLM config a top-level ``vocab_size`` where the loss reads it and the config does not forward it.

    Upstream: 4.52.0 split ``text_config`` out of Qwen2.5-VL's config while ``ForConditionalGeneration.forward``
    kept computing the loss with ``self.config.vocab_size``; 4.57.0 added attribute forwarding to the text config
    (fixed from 4.57). Affected: 4.52.0-4.56.x. Probed: sets the text model's value only where the attribute is absent.
    """
    if not hasattr(cfg, "vocab_size"):
        cfg.vocab_size = cfg.get_text_config().vocab_size


def tower_outputs(out):
    """``(merged features, [deepstack features])`` from any version's Qwen-VL vision tower return value.

    Upstream: the tower returned the merged tensor (Qwen2.5-VL, 4.49-4.57), a ``(merged, deepstack list)`` tuple
    (Qwen3-VL, 4.57), and from 5.0.0 a ``BaseModelOutputWithPooling``-style output whose ``pooler_output`` holds
    the merged features (``deepstack_features`` beside it). Probed on the value; a return type with neither raises.
    """
    import torch

    if isinstance(out, torch.Tensor):
        return out, []
    if isinstance(out, tuple):
        deep = out[1] if len(out) > 1 and isinstance(out[1], (list, tuple)) else []
        return out[0], list(deep)
    merged = getattr(out, "pooler_output", None)
    if merged is None:
        raise TypeError(f"vision tower returned {type(out).__name__} without pooler_output (upstream changed it): "
                        "update portvlm.shims.model_io.tower_outputs")
    return merged, list(getattr(out, "deepstack_features", None) or [])


def vision_features(layout: str, tower, pixel_values, grid_thw=None) -> dict:
    """Run a vision tower once; what the language model gets: ``{"features", "deepstack<i>"…}``.

    ``layout`` is the family's (``portvlm.models.family.LAYOUTS``). "images" (LLaVA): the tower's hidden state at
    ``vision_feature_layer=-2`` with CLS dropped (the "default" strategy). "patches" (Qwen-VL): the merged features
    and deepstack taps, whatever the version returns (``tower_outputs``).
    """
    if layout == "images":
        out = tower(pixel_values, output_hidden_states=True)
        return {"features": out.hidden_states[-2][:, 1:]}
    merged, deep = tower_outputs(tower(pixel_values, grid_thw=grid_thw))
    feats = {"features": merged}
    feats.update({f"deepstack{i}": d for i, d in enumerate(deep)})
    return feats


def reset_rope_state(model) -> None:
    """Forget the mrope ``rope_deltas`` a Qwen-VL model cached from its previous call, so the next call starts clean.

    Upstream: Qwen2-VL-family models keep ``self.rope_deltas`` between calls (on ``*ForConditionalGeneration`` to
    4.51, on the inner ``*Model`` since the 4.52.0 split) and reuse it for a call that continues a cache or passes
    ``inputs_embeds`` (5.24.0: ``cache_length > 0 or input_ids is None``): a forward after another prompt, a
    training step after generation, an SP rank's text-only slice would get stale positions. Present in every version
    read (4.50.3 … 5.24.0), not fixed upstream. A no-op for models without the attribute (LLaVA).
    """
    for holder in (model, getattr(model, "model", None)):
        if holder is not None and hasattr(holder, "rope_deltas"):
            holder.rope_deltas = None


def merge_vision_embeds(embeds, input_ids, config, features: dict):
    """Put merged vision features into the text embeddings at their placeholder tokens (Qwen-VL): ``(embeds, masks)``.

    ``features``: ``{"image": [N_img, D], "video": [N_vid, D]}`` in sequence order; ``masks``: the bool ``[B, S]``
    positions of each kind. What ``Qwen*VLModel.forward`` does inside itself (``masked_scatter`` at
    ``config.image_token_id`` / ``video_token_id``; 5.x names it ``get_placeholder_mask``), for callers that feed the
    text model ``inputs_embeds`` themselves (``portvlm.distributed`` runs the tower once per rank, then its slice).
    A count mismatch raises, naming both counts (never a partial scatter).
    """
    masks = {}
    for kind, token in (("image", config.image_token_id), ("video", config.video_token_id)):
        mask = input_ids == token
        n = int(mask.sum())
        if n != features[kind].shape[0]:
            raise ValueError(f"the row has {n} {kind} tokens but its {kind} grids give {features[kind].shape[0]} "
                             "merged features")
        if n:
            embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), features[kind].to(embeds.dtype))
        masks[kind] = mask
    return embeds, masks


def deepstack_kwargs(visual_pos_masks, deepstack_visual_embeds) -> dict:
    """The keyword arguments Qwen3-VL's text model takes its deepstack features by.

    Upstream: ``Qwen3VLTextModel.forward(visual_pos_masks=, deepstack_visual_embeds=)`` (4.57.1+; the names are a
    drift anchor, ``Family.anchors["model_io"]`` of qwen3_vl, so a rename shows in the drift lane's signature diff).
    """
    return {"visual_pos_masks": visual_pos_masks, "deepstack_visual_embeds": deepstack_visual_embeds}
