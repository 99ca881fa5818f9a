"""Latent KV caches for ``MLAAttention``, on every transformers cache layout through ``CacheView``.

Layout: ``k_rope`` ``[B, n_kv, S, rope_dims]`` (after RoPE) in the key slot, the latent ``c_kv`` as
``[B, 1, S, rank·n_kv]`` in the value slot. VLM-MLA stored the latent 3-D (``[B, S, d]``), which only works while
every cache operation happens to touch ``dim=-2`` alone. Giving it one "head" (the latent is shared by all KV heads,
like an MQA head) keeps the ``[batch, heads, seq, dim]`` contract every upstream cache operation is written for:
``crop`` / eviction on ``-2``, ``batch_repeat_interleave`` / ``batch_select_indices`` / beam ``reorder_cache`` on
``0``, 5.x layers' lazy initialisation and ``get_mask_sizes`` (which read the key slot), offloading. Sequence length
is read from ``k_rope``, so ``get_seq_length`` is right on key_cache lists (<=4.53), ``DynamicLayer`` (4.54+) and 5.x.

``LatentCache`` (a ``DynamicCache``) and ``LatentSinkWindowCache`` (a ``SinkWindowCache``: attention sinks + a
window, evicting ``k_rope`` and the latent together) both check every update's layout and read back only through
``portvlm.shims.kv_cache.CacheView``, never ``key_cache`` or ``layers`` directly.
"""

from __future__ import annotations

import torch

from portvlm.shims.kv_cache import SEQ_DIM, CacheView


def latent_layout_reasons(k_rope, c_kv) -> list[str]:
    """Why ``(k_rope, c_kv)`` is not the latent layout (empty: it is)."""
    reasons = []
    if not isinstance(k_rope, torch.Tensor) or k_rope.dim() != 4:
        reasons.append(f"k_rope must be [B, n_kv, S, rope_dims], got {_shape(k_rope)}")
    if not isinstance(c_kv, torch.Tensor) or c_kv.dim() != 4 or c_kv.shape[1] != 1:
        reasons.append(f"the latent must be [B, 1, S, rank·n_kv] (one latent head), got {_shape(c_kv)}; "
                       "a 3-D VLM-MLA latent needs c_kv[:, None]")
    if not reasons and (k_rope.shape[0] != c_kv.shape[0] or k_rope.shape[SEQ_DIM] != c_kv.shape[SEQ_DIM]):
        reasons.append(f"k_rope {tuple(k_rope.shape)} and latent {tuple(c_kv.shape)} disagree on batch or tokens")
    return reasons


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


class LatentLayout:
    """Mixin for a ``DynamicCache`` subclass: validate each update, read k_rope / latent through ``CacheView``."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        reasons = latent_layout_reasons(key_states, value_states)
        if reasons:
            raise ValueError(f"{type(self).__name__}.update(layer {layer_idx}): " + "; ".join(reasons))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def k_rope(self, layer_idx: int) -> torch.Tensor | None:
        return CacheView(self).keys(layer_idx)

    def latent(self, layer_idx: int) -> torch.Tensor | None:
        return CacheView(self).values(layer_idx)

    def stored_bytes(self) -> int:
        """Bytes held now over all layers (k_rope + latent)."""
        view = CacheView(self)
        total = 0
        for i in range(view.num_layers):
            for t in (view.keys(i), view.values(i)):
                total += 0 if t is None else t.numel() * t.element_size()
        return total


def stored_bytes(cache) -> int:
    """Bytes any cache CacheView can read holds now (an MHA DynamicCache or a latent one)."""
    return LatentLayout.stored_bytes(cache)


_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    if not _CLASSES:
        from transformers import DynamicCache

        from portvlm.shims.kv_cache import SinkWindowCache

        class LatentCache(LatentLayout, DynamicCache):
            """A ``DynamicCache`` holding ``(k_rope, latent)`` per layer for ``MLAAttention``."""

        class LatentSinkWindowCache(LatentLayout, SinkWindowCache):
            """``SinkWindowCache`` over ``(k_rope, latent)``: sinks + window, both slots evicted together."""

        _CLASSES.update(LatentCache=LatentCache, LatentSinkWindowCache=LatentSinkWindowCache)
    return _CLASSES


def __getattr__(name: str):
    # The classes subclass transformers' DynamicCache, imported only when first asked for.
    if name in ("LatentCache", "LatentSinkWindowCache"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
