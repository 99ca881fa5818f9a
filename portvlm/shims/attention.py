"""portvlm's attention inside transformers models: vision (block-diagonal, one call per layer) and text (sdpa/eager
with padding masks, packed rows through ``cu_seq_lens_q``).

Vision — shim ``vision_varlen`` answers how upstream runs non-flash vision attention
(../shared/research/transformers-breakpoints.md §3):

- 4.49–4.52: per-backend classes (``*_VISION_ATTENTION_CLASSES``); the sdpa/eager classes build a ``[S, S]`` mask
  with a Python loop over ``cu_seqlens`` (one host sync per segment per layer).
- 4.53.x: one class through ``ALL_ATTENTION_FUNCTIONS``; the tower's ``_prepare_attention_mask`` builds a dense
  ``[1, 1, S, S]`` mask with the same loop (shim ``vision_dense_mask``).
- 4.54.0+: anything but flash runs one call per segment (``torch.split(..., lengths.tolist())``): a host sync and a
  Python loop per layer. 5.x: "flash" in the implementation name selects the varlen path.

So portvlm replaces the vision attention class's ``forward`` (class-level, recorded and restored by the Patcher)
with ONE forward that accepts every version's signature, applies rotary with the modeling module's public
``apply_rotary_pos_emb_vision``, and calls ``portvlm.backends.varlen_attention`` once. ``max_seqlen``: an upper bound
for Qwen2.5-VL window layers (no sync), ``max_seqlen(cu_seqlens)`` (one cached sync per tensor) for full layers.

Text — shim ``text_registry`` (4.53.0+: ``AttentionInterface`` + ``AttentionMaskInterface``) registers ONE function
under ``ATTN_NAME`` and points the model at it. Names containing "flash" are routed to the flash path in 5.x, names
with "/" or ":" are hub kernels: ``ATTN_NAME`` has neither.
"""

from __future__ import annotations

import inspect
import math
import sys
import weakref
from dataclasses import dataclass, field

ATTN_NAME = "portvlm"
assert "flash" not in ATTN_NAME and "/" not in ATTN_NAME and ":" not in ATTN_NAME


@dataclass
class AttentionState:
    """What the installed forwards read at call time (one per ``patch``)."""

    vision_backend: str = "sdpa_masked"
    text_backend: str = "sdpa_masked"
    # vision attention module -> a static upper bound on its segment length (window layers); absent = full layer
    bounds: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    rotary: dict = field(default_factory=dict)  # vision attention class -> apply_rotary_pos_emb_vision
    calls: dict = field(default_factory=lambda: {"vision": 0, "text": 0, "text_packed": 0})


# --------------------------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------------------------

ROTARY_FN = "apply_rotary_pos_emb_vision"
VISION_FORWARD_PARAMS = ("hidden_states", "cu_seqlens")  # what every version's caller passes by name or position


def vision_module_reasons(module) -> list[str]:
    """Why portvlm's vision forward cannot replace this attention module's (empty: it can)."""
    cls = type(module)
    reasons = []
    for attr in ("qkv", "proj", "num_heads"):
        if not hasattr(module, attr):
            reasons.append(f"{cls.__name__} has no `{attr}` (portvlm's vision forward computes q/k/v with it)")
    params = inspect.signature(cls.forward).parameters
    missing = [p for p in VISION_FORWARD_PARAMS if p not in params]
    if missing:
        reasons.append(f"{cls.__name__}.forward takes no {', '.join(missing)} (not a packed varlen vision attention)")
    if rotary_of(cls) is None:
        reasons.append(f"{cls.__module__} defines no public `{ROTARY_FN}`")
    return reasons


def rotary_of(cls):
    """The public ``apply_rotary_pos_emb_vision`` of the module ``cls`` is defined in (probed, never imported)."""
    module = sys.modules.get(cls.__module__)
    fn = getattr(module, ROTARY_FN, None) if module is not None else None
    return fn if callable(fn) else None


def window_bound(tower) -> int | None:
    """Upper bound on a Qwen2.5-VL window segment (patches): ``(window_size // patch_size)²``; ``None`` if unwindowed."""
    cfg = getattr(tower, "config", None)

    def get(name):
        value = getattr(tower, name, None)
        return value if value is not None else getattr(cfg, name, None)

    window, patch, merge = get("window_size"), get("patch_size"), get("spatial_merge_size")
    if not (window and patch and merge):
        return None
    side = window // merge // patch  # the tower's vit_merger_window_size, in merged tokens
    return side * side * merge * merge


def full_block_indexes(tower):
    cfg = getattr(tower, "config", None)
    value = getattr(tower, "fullatt_block_indexes", None)
    return value if value is not None else getattr(cfg, "fullatt_block_indexes", None)


def make_vision_forward(state: AttentionState):
    """One forward for every version's vision attention class: rotary, then ONE block-diagonal varlen call."""
    import torch

    from portvlm.backends import kernels

    def forward(
        self,
        hidden_states,
        cu_seqlens,
        rotary_pos_emb=None,
        position_embeddings=None,
        max_seqlen=None,
        **kwargs,  # attention_mask (4.53: dense mask, ignored: cu_seqlens says the same), output flags, …
    ):
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        if position_embeddings is None:
            if rotary_pos_emb is None:
                raise ValueError("portvlm vision attention needs position_embeddings (cos, sin) or rotary_pos_emb")
            emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)  # <=4.56 callers may still pass raw angles
            position_embeddings = (emb.cos(), emb.sin())
        cos, sin = position_embeddings
        rope = state.rotary.get(type(self)) or rotary_of(type(self))
        q, k = rope(q, k, cos, sin)
        if max_seqlen is None:
            max_seqlen = state.bounds.get(self)
        if max_seqlen is None:
            max_seqlen = kernels.max_seqlen(cu_seqlens)  # cached per tensor: one sync per forward for full layers
        state.calls["vision"] += 1
        out = kernels.varlen_attention(
            q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen),
            backend=state.vision_backend, scale=1.0 / math.sqrt(q.shape[-1]), causal=False,
        )
        return self.proj(out.reshape(seq_length, -1))

    forward.__portvlm__ = "vision_varlen"
    return forward


def _no_dense_mask(self, inputs_tensor, cu_seqlens):
    """portvlm: the vision attention reads ``cu_seqlens``; the dense ``[1,1,S,S]`` mask (and its loop) is not built."""
    return None


_no_dense_mask.__portvlm__ = "vision_dense_mask"


# --------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------


def make_text_attention(state: AttentionState):
    """The function registered as ``ATTN_NAME``: ``fn(module, q, k, v, attention_mask, ...) -> ([B,S,H,D], None)``."""
    import torch
    import torch.nn.functional as F

    from portvlm.backends import kernels

    def portvlm_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
            # Packed row (several samples in one row, lmms-engine's rmpad): block-diagonal causal, one call.
            state.calls["text_packed"] += 1
            bound = kwargs.get("max_length_q")
            max_len = int(bound) if bound is not None else kernels.max_seqlen(cu)
            out = kernels.varlen_attention(
                query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                cu.to(torch.int32), max_len, backend=state.text_backend, scale=scaling, causal=causal,
            )
            return out[None], None
        state.calls["text"] += 1
        groups = query.shape[1] // key.shape[1]
        if groups > 1:  # GQA: module.num_key_value_groups in transformers; derived from shapes here
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            mask = mask[:, :, :, : key.shape[-2]]
        causal = bool(causal and mask is None and query.shape[2] > 1)
        p = dropout if module.training else 0.0
        if state.text_backend == "eager":
            scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            scores = torch.matmul(query, key.transpose(2, 3)) * scale
            if causal:
                q_len, k_len = query.shape[2], key.shape[2]
                keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
                mask = keep
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            probs = F.dropout(probs, p=p, training=module.training)
            out = torch.matmul(probs, value)
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=p, scale=scaling, is_causal=causal
            )
        return out.transpose(1, 2).contiguous(), None

    portvlm_attention.__portvlm__ = "text_registry"
    return portvlm_attention


def registry_reasons() -> list[str]:
    """Why the text function cannot go through transformers' registries (empty: it can)."""
    import transformers

    reasons = []
    for name in ("AttentionInterface", "AttentionMaskInterface"):
        interface = getattr(transformers, name, None)
        if interface is None:
            first = "4.51.0" if name == "AttentionInterface" else "4.53.0"
            reasons.append(f"transformers {transformers.__version__} has no public {name} (first in {first})")
        elif not isinstance(getattr(interface, "_global_mapping", None), dict) or not hasattr(interface, "register"):
            reasons.append(f"transformers.{name} has no `register` / `_global_mapping` dict (upstream changed the registry)")
    if not reasons and "sdpa" not in transformers.AttentionMaskInterface._global_mapping:
        reasons.append("AttentionMaskInterface has no 'sdpa' mask function to reuse for portvlm's name")
    return reasons


def install_text(patcher, model, state: AttentionState) -> list[str]:
    """Register the text function (+ sdpa mask) under ``ATTN_NAME`` and switch ``model`` to it; returns targets."""
    import transformers

    fn = make_text_attention(state)
    attn_map = transformers.AttentionInterface._global_mapping
    mask_map = transformers.AttentionMaskInterface._global_mapping
    patcher.record_item(attn_map, ATTN_NAME)
    transformers.AttentionInterface.register(ATTN_NAME, fn)
    patcher.record_item(mask_map, ATTN_NAME)
    transformers.AttentionMaskInterface.register(ATTN_NAME, mask_map["sdpa"])
    targets = [f"AttentionInterface[{ATTN_NAME!r}]", f"AttentionMaskInterface[{ATTN_NAME!r}] = sdpa mask"]
    if model is None:
        return targets
    configs = configs_of(model)
    for cfg in configs:
        patcher.record_attr(cfg, "_attn_implementation_internal")
    if callable(getattr(model, "set_attn_implementation", None)):  # 4.54+
        # set_attn_implementation also memoises on classes/modules (5.x: `_can_set_attn_implementation_cached_value`);
        # whatever it adds is recorded as "was absent" so revert leaves no trace.
        owners = {c for m in model.modules() for c in type(m).__mro__ if c is not object} | set(model.modules())
        before = {id(o): set(vars(o)) for o in owners}
        model.set_attn_implementation(ATTN_NAME)
        for o in owners:
            for name in sorted(set(vars(o)) - before[id(o)]):
                patcher.record_added(o, name)
        how = "model.set_attn_implementation"
    else:  # 4.53: the config property's setter writes _attn_implementation_internal
        for cfg in configs:
            cfg._attn_implementation = ATTN_NAME
        how = "config._attn_implementation"
    targets.append(f"{how}({ATTN_NAME!r}) on {len(configs)} config(s)")
    return targets


def configs_of(model) -> list:
    """Every config object a model's modules read ``_attn_implementation`` from (top, sub-configs, submodules)."""
    seen: dict[int, object] = {}
    stack = [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "to_dict"):
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return list(seen.values())
