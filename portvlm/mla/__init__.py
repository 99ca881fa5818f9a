"""Multi-head latent attention for LLaVA (MHA2MLA / VLM-MLA), ported so it survives every transformers cache API.

The seed (bonginn/vlm-mla @ d8a8584, ../shared/research/scale-out.md §3) pins transformers 4.46.3: it overrides
``LlamaSdpaAttention.forward`` (gone in 4.48), finds ``layer_idx`` by walking stack frames, and stores its latent in
``DynamicCache.key_cache`` / ``value_cache`` (deprecated in 4.54, removed in 4.56). portvlm's version:

- ``convert`` (``portvlm.mla.conversion``): an MHA LLaVA becomes MLA in place. Partial RoPE keeps ``rope_dims`` dims
  per KV head as ``k_rope``, picked by a 2-norm ranking of the q/k weights or uniformly over the frequencies; the
  rest of W_k ("nope") and W_v are factored by ONE joint SVD into ``kv_down`` (hidden -> rank·n_kv latent) and
  ``k_up`` / ``v_up``. At full rank the factorisation is exact.
- ``MLAAttention`` (``portvlm.mla.attention``): a module in place of each decoder layer's ``self_attn``. It caches
  ``(k_rope, latent)``, rebuilds full K/V from the cached latent, and calls the attention function the model's
  config names in transformers' registry (portvlm's when ``portvlm.patch`` is active), eager otherwise.
- ``LatentCache`` / ``LatentSinkWindowCache`` (``portvlm.mla.cache``): ``DynamicCache`` / ``SinkWindowCache`` that
  validate the latent layout; everything they read or write goes through ``portvlm.shims.kv_cache.CacheView``.

Nothing here imports torch until it is used.
"""

from __future__ import annotations

__all__ = [
    "MLASpec",
    "convert",
    "full_rank",
    "kv_bytes_per_token",
    "LatentCache",
    "LatentSinkWindowCache",
    "MLAAttention",
]


def __getattr__(name: str):
    if name in ("MLASpec", "convert", "full_rank", "kv_bytes_per_token", "mha_kv_bytes_per_token", "spec_of"):
        from portvlm.mla import conversion as _convert

        return getattr(_convert, name)
    if name == "MLAAttention":
        from portvlm.mla.attention import MLAAttention

        return MLAAttention
    if name in ("LatentCache", "LatentSinkWindowCache"):
        from portvlm.mla import cache as _cache

        return getattr(_cache, name)
    raise AttributeError(f"module 'portvlm.mla' has no attribute {name!r}")
