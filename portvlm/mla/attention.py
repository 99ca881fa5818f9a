"""``MLAAttention``: the decoder layer's ``self_attn`` after MHA2MLA conversion.

Per token it computes the query (all heads), a decoupled RoPE key ``k_rope`` (``rope_dims`` per KV head, rotated
with the model's own cos/sin at the dims ``rope_index`` names) and a latent ``c_kv`` (``rank · n_kv`` values, one
vector shared by every KV head). The cache holds ``(k_rope, c_kv)``; full K/V are rebuilt from the cached latent with
``k_up`` / ``v_up`` and handed, with the query in the same dim order, to the attention function the model's config
names — looked up in transformers' ``ALL_ATTENTION_FUNCTIONS`` at call time, so ``portvlm.patch`` (which registers
its function and renames ``config._attn_implementation``) reaches MLA exactly as it reaches MHA, with masks, packed
rows (``cu_seq_lens_q``) and padding unchanged. Dot products do not depend on the order of dims, so the query is
gathered into the key's order (rope dims first, then nope dims) and no weight is permuted.

Call conventions answered here (../shared/research/transformers-breakpoints.md §5): the decoder layer passes the
cache as ``past_key_value`` (<=4.55), ``past_key_values`` (4.56–5.23) or ``cache`` (5.24.0, with
``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")``); ``update`` took ``cache_kwargs`` until 5.3,
5.4–5.23 pass nothing and 5.24.0 passes ``kwargs=kwargs`` (the attention call's kwargs): ``kv_cache.update_cache``
probes ``Cache.update`` and calls it the way the installed version's own attention does. Every version from 4.48 unpacks two
return values ``(attn_output, attn_weights)``; before (the per-backend ``*_ATTENTION_CLASSES`` era, e.g. the
seed's 4.46.3) three, ``(attn_output, attn_weights, present_key_value)`` — ``returns_cache``, probed by ``convert``.

``latent=False`` gives the oracle for partial RoPE at full rank: the same partial RoPE, with ``k_nope`` and ``v``
projected directly (plain MHA + partial RoPE); it caches full ``(k, v)``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from portvlm.shims.kv_cache import update_cache


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]``: pairs dim ``j`` with ``j + d/2`` (HF's RoPE layout; ``rope_index`` keeps pairs in that order)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """fp32-softmax eager attention for a name no registry knows (transformers without ALL_ATTENTION_FUNCTIONS)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    # Scale q before the product: q·kᵀ of fp16 activations can pass 65504 before a later ×1/√d would bring it back
    # (the eager-QKᵀ overflow site of ../shared/research/fp16.md §1a; a fused SDPA kernel scales first too).
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query * scale, key.transpose(2, 3))
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    elif query.shape[2] > 1:
        q_len, k_len = query.shape[2], key.shape[2]
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class MLAAttention(nn.Module):
    """Multi-head latent attention with a decoupled partial-RoPE key (MHA2MLA), for a Llama-style backbone."""

    def __init__(self, config, layer_idx: int, *, num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int,
                 rank: int, rope_index: torch.Tensor, bias: bool, eager_module: str | None, latent: bool = True,
                 returns_cache: bool = False):
        super().__init__()
        rope_dims = rope_index.shape[-1]
        nope_dims = head_dim - rope_dims
        self.config = config  # the text config: portvlm.patch renames its _attn_implementation
        self.layer_idx = layer_idx
        self.num_heads, self.num_key_value_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_key_value_groups = num_heads // num_kv_heads  # transformers' attention functions read these
        self.scaling = head_dim**-0.5
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.is_causal = True
        self.rope_dims, self.nope_dims, self.rank, self.latent = rope_dims, nope_dims, rank, latent
        self.eager_module = eager_module  # where the backbone's own eager_attention_forward lives
        self.last_attention: str | None = None
        self.returns_cache = returns_cache  # <4.48 decoder layers unpack (output, weights, present_key_value)
        # Dims of each KV head's key that are RoPE'd (k_rope), then the rest (nope); queries follow their KV head.
        nope_index = torch.stack([_complement(row, head_dim) for row in rope_index])
        self.register_buffer("rope_index", rope_index.clone().long(), persistent=True)
        self.register_buffer("nope_index", nope_index.long(), persistent=True)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_rope_proj = nn.Linear(hidden_size, num_kv_heads * rope_dims, bias=bias)
        if latent:
            self.kv_down = nn.Linear(hidden_size, rank * num_kv_heads, bias=False)
            self.k_up = nn.Linear(rank * num_kv_heads, num_kv_heads * nope_dims, bias=bias)
            self.v_up = nn.Linear(rank * num_kv_heads, num_kv_heads * head_dim, bias=bias)
        else:
            self.k_nope_proj = nn.Linear(hidden_size, num_kv_heads * nope_dims, bias=bias)
            self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    @property
    def latent_dim(self) -> int:
        return self.rank * self.num_key_value_heads

    def attention_function(self):
        """The function ``config._attn_implementation`` names, read at call time (portvlm's while patched)."""
        name = getattr(self.config, "_attn_implementation", None) or "eager"
        eager = getattr(sys.modules.get(self.eager_module or ""), "eager_attention_forward", None) or eager_attention
        if name == "eager":
            return eager
        from transformers import modeling_utils

        registry = getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)
        if registry is None:  # <4.48: no registry; the class itself is the attention path
            return eager_attention if name == "eager" else _sdpa_attention
        if hasattr(registry, "get_interface"):  # 5.1+
            return registry.get_interface(name, eager)
        if name not in registry:
            raise KeyError(f"attention implementation {name!r} is not in ALL_ATTENTION_FUNCTIONS ({', '.join(registry)})")
        return registry[name]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x`` ([B, heads, S, rope_dims]) at the dims ``index`` ([heads, rope_dims]) of the full cos/sin."""
        c = cos[:, :, index].permute(0, 2, 1, 3).to(x.dtype)  # [B, S, heads, r] -> [B, heads, S, r]
        s = sin[:, :, index].permute(0, 2, 1, 3).to(x.dtype)
        return x * c + rotate_half(x) * s

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_value=None,
                cache_position=None, past_key_values=None, cache=None, **kwargs):
        cache = next((c for c in (cache, past_key_values, past_key_value) if c is not None), None)
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        kwargs.pop("output_attentions", None)
        if position_embeddings is None:
            raise ValueError("MLAAttention needs position_embeddings (cos, sin) from the backbone (transformers >= 4.48)")
        bsz, q_len, _ = hidden_states.shape
        cos, sin = position_embeddings
        if cos.dim() == 2:  # some versions hand [S, D]
            cos, sin = cos[None], sin[None]
        groups = self.num_key_value_groups
        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        q_rope_index = self.rope_index.repeat_interleave(groups, 0)
        q_nope_index = self.nope_index.repeat_interleave(groups, 0)
        q_rope = _take(q, q_rope_index)
        q_nope = _take(q, q_nope_index)
        q_rope = self._rope(q_rope, cos, sin, q_rope_index)
        k_rope = self.k_rope_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.rope_dims).transpose(1, 2)
        k_rope = self._rope(k_rope, cos, sin, self.rope_index)

        if self.latent:
            c_kv = self.kv_down(hidden_states)[:, None]  # [B, 1, S, rank·n_kv]: one latent "head" (see cache.py)
            if cache is not None:
                k_rope, c_kv = update_cache(cache, k_rope, c_kv, self.layer_idx,
                                            {"sin": sin, "cos": cos, "cache_position": cache_position}, kwargs)
            k_nope, value = self.expand(c_kv)
            key = torch.cat((k_rope, k_nope), dim=-1)
        else:
            kv_len = q_len
            k_nope = self.k_nope_proj(hidden_states).view(bsz, kv_len, self.num_key_value_heads, self.nope_dims).transpose(1, 2)
            value = self.v_proj(hidden_states).view(bsz, kv_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
            key = torch.cat((k_rope, k_nope), dim=-1)
            if cache is not None:
                key, value = update_cache(cache, key, value, self.layer_idx,
                                          {"sin": sin, "cos": cos, "cache_position": cache_position}, kwargs)
        query = torch.cat((q_rope, q_nope), dim=-1)
        fn = self.attention_function()
        self.last_attention = f"{fn.__module__}.{fn.__qualname__}"  # which path ran (checks read it)
        out, weights = fn(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        out = self.o_proj(out.reshape(bsz, q_len, -1).contiguous())
        return (out, weights, cache) if self.returns_cache else (out, weights)

    def expand(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_nope, v)`` ([B, n_kv, S, ·]) rebuilt from a latent ``[B, 1, S, rank·n_kv]``."""
        bsz, _, kv_len, _ = c_kv.shape
        latent = c_kv[:, 0]
        k_nope = self.k_up(latent).view(bsz, kv_len, self.num_key_value_heads, self.nope_dims).transpose(1, 2)
        value = self.v_up(latent).view(bsz, kv_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        return k_nope, value


def _sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    causal = mask is None and query.shape[2] > 1
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                     scale=scaling, is_causal=causal)
    return out.transpose(1, 2).contiguous(), None


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, h, s, index[h]]``: per-head dims of ``x`` ([B, H, S, D]) in the order ``index`` ([H, d]) gives."""
    bsz, heads, seq, _ = x.shape
    return torch.gather(x, -1, index[None, :, None, :].expand(bsz, heads, seq, index.shape[-1]))


def _complement(row: torch.Tensor, head_dim: int) -> torch.Tensor:
    keep = torch.ones(head_dim, dtype=torch.bool)
    keep[row.long()] = False
    return torch.arange(head_dim)[keep]



def __getattr__(name: str):
    # Declared like a modeling_* module: this module dispatches through transformers' ALL_ATTENTION_FUNCTIONS
    # (portvlm.patch's <=4.52 text_registry_legacy shim probes the attention class's module for it). Lazy, so
    # importing portvlm.mla.attention imports no transformers.
    if name == "ALL_ATTENTION_FUNCTIONS":
        from transformers import modeling_utils

        return modeling_utils.ALL_ATTENTION_FUNCTIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
