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
with "/" or ":" are hub kernels: ``ATTN_NAME`` has neither. Before 4.53 there is no ``AttentionMaskInterface``, and
the text side splits in two (breakpoints §3, §4):

- shim ``text_registry_legacy`` (4.49–4.52): backbones that already call ``ALL_ATTENTION_FUNCTIONS[...]`` (LLaVA's
  llama/qwen2/mistral; a plain dict in 4.49/4.50, ``AttentionInterface`` from 4.51) get the same function under
  ``ATTN_NAME``, set on the text backbone's configs only (the tower keeps its own). The mask is the model's own:
  ``_update_causal_mask`` short-cuts only for "flash_attention_2", "flex_attention" and "sdpa", so any other name
  gets the eager-style 4-D float additive causal mask (padding included) — which the function adds as it is.
  Packed rows arrive as ``cu_seq_lens_q`` kwargs: these models pass ``**kwargs`` down to the attention.
- shim ``text_classes`` (4.49–4.52, Qwen2.5-VL): the text attention class is picked from
  ``QWEN2_5_VL_ATTENTION_CLASSES[config._attn_implementation]`` at build time (a custom name raises KeyError), and
  no forward from the model down passes extra kwargs. So the sdpa and eager classes' ``forward`` are replaced
  (class-level, through the Patcher) by one that runs the original unchanged unless a packed row is declared;
  then it runs q/k/v, the module's ``apply_multimodal_rotary_pos_emb`` and ONE ``varlen_attention(causal=True)``.
  A packed row is declared by ``cu_seq_lens_q`` (+ ``max_length_q``) passed to the patched model's forward, which
  the shim makes accept them (they are taken out before the original forward runs), or by ``packed_rows(cu)``
  around any call. The declaration is also remembered for the forward's rotary tensor (a new object every model
  forward, handed unchanged to gradient-checkpoint recomputation), so a checkpointed layer recomputed during
  backward, outside the ``with``, takes the same packed path.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import sys
import weakref
from dataclasses import dataclass, field

from portvlm.shims import dispatch

# Each handle registers its own name, ATTN_NAME + "_<n>" (two models under two policies must not share one entry).
# 5.x routes names containing "flash" to the flash path and treats names with "/" or ":" as hub kernels: none here.
ATTN_NAME = "portvlm"
assert "flash" not in ATTN_NAME and "/" not in ATTN_NAME and ":" not in ATTN_NAME


@dataclass
class AttentionState:
    """What the installed forwards read at call time (one per ``patch``)."""

    name: str = ATTN_NAME  # the handle's registered attention name (ATTN_NAME + "_<n>")
    vision_backend: str = "sdpa_masked"
    text_backend: str = "sdpa_masked"
    # vision attention module -> a static upper bound on its segment length (window layers); absent = full layer
    bounds: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    rotary: dict = field(default_factory=dict)  # vision attention class -> apply_rotary_pos_emb_vision
    calls: dict = field(default_factory=lambda: {"vision": 0, "text": 0, "text_packed": 0, "linear": 0,
                                                 "linear_packed": 0})
    # <=4.52 class-patched text: id(rotary cos tensor) -> (weakref to it, (cu_seq_lens, max_length)); see packed_of
    packed_by_rope: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------------------------

ROTARY_FN = "apply_rotary_pos_emb_vision"
VISION_FORWARD_PARAMS = ("hidden_states", "cu_seqlens")  # what every version's caller passes by name or position
# The submodules portvlm's vision forward applies: qkv, proj, and the per-head RMS norms GLM-OCR / dots3 / GLM-5
# apply to q and k before rotary (transformers 5.x modeling_glm_ocr.py GlmOcrVisionAttention.forward).
# PaddleOCR-VL / VideoLLaMA3 / Kimi-K2.5 / SigLIP-style towers project q, k, v separately and out through
# `out_proj` (PaddleOCRVisionAttention.forward, transformers 5.x): the same math with other names.
SPLIT_QKV = ("q_proj", "k_proj", "v_proj")
OUT_PROJ = ("proj", "out_proj")
VISION_CHILDREN = ("qkv", "proj", "q_norm", "k_norm", *SPLIT_QKV, "out_proj")


def vision_module_reasons(module) -> list[str]:
    """Why portvlm's vision forward cannot replace this attention module's (empty: it can)."""
    cls = type(module)
    reasons = []
    if not (hasattr(module, "qkv") or all(hasattr(module, a) for a in SPLIT_QKV)):
        reasons.append(f"{cls.__name__} has neither `qkv` nor `q_proj`/`k_proj`/`v_proj` (portvlm's vision forward "
                       "computes q/k/v with them)")
    if not any(hasattr(module, a) for a in OUT_PROJ):
        reasons.append(f"{cls.__name__} has no `proj` / `out_proj` (portvlm's vision forward projects out with it)")
    if not hasattr(module, "num_heads"):
        reasons.append(f"{cls.__name__} has no `num_heads`")
    unknown = sorted(set(dict(module.named_children())) - set(VISION_CHILDREN))
    if unknown:
        # a submodule portvlm's forward would skip changes the math (GLM-OCR's q_norm/k_norm did, before they were
        # known): refuse rather than run a forward that drops it
        reasons.append(f"{cls.__name__} has submodules portvlm's vision forward does not apply: {', '.join(unknown)}")
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


def vision_forward(
    state: AttentionState,
    fallback,
    self,
    hidden_states,
    cu_seqlens,
    rotary_pos_emb=None,
    position_embeddings=None,
    max_seqlen=None,
    **kwargs,  # attention_mask (4.53: dense mask, ignored: cu_seqlens says the same), output flags, …
):
    """portvlm's forward for every version's vision attention class: rotary, then ONE block-diagonal varlen call."""
    import torch

    from portvlm.backends import kernels

    seq_length = hidden_states.shape[0]
    if getattr(self, "qkv", None) is not None:
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    else:
        q, k, v = (getattr(self, name)(hidden_states).reshape(seq_length, self.num_heads, -1) for name in SPLIT_QKV)
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    if q_norm is not None:  # per-head norms before rotary, in upstream's order (GLM-OCR, dots3, GLM-5)
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
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
        backend=state.vision_backend, scale=getattr(self, "scaling", None) or 1.0 / math.sqrt(q.shape[-1]),
        causal=False,
    )
    proj = getattr(self, "proj", None) or self.out_proj
    out = proj(out.reshape(seq_length, -1))
    # towers whose attention returns (output, weights) unpack two values (PaddleOCR-VL's encoder layer)
    return (out, None) if returns_pair(type(self)) else out


def returns_pair(cls) -> bool:
    """Whether ``cls.forward`` is annotated to return ``(output, attention weights)`` rather than a tensor."""
    ret = inspect.signature(cls.forward).return_annotation
    return ret is not inspect.Signature.empty and str(ret).replace(" ", "").lower().startswith(("tuple", "typing.tuple"))


def vision_dispatcher(fallback):
    """The class-level vision forward: portvlm's for modules a live patch owns, ``fallback`` for the others."""
    return dispatch.by_owner(vision_forward, fallback, "vision_varlen")


def no_dense_mask(state: AttentionState, fallback, self, inputs_tensor, cu_seqlens):
    """portvlm: the vision attention reads ``cu_seqlens``; the dense ``[1,1,S,S]`` mask (and its loop) is not built."""
    return None


def dense_mask_dispatcher(fallback):
    return dispatch.by_owner(no_dense_mask, fallback, "vision_dense_mask")




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
            scores = kernels.scaled_scores(query, key, scale)
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
    """Register the text function (+ sdpa mask) under ``state.name`` and switch ``model`` to it; returns targets."""
    import transformers

    name = state.name
    fn = make_text_attention(state)
    attn_map = transformers.AttentionInterface._global_mapping
    mask_map = transformers.AttentionMaskInterface._global_mapping
    patcher.record_item(attn_map, name)
    transformers.AttentionInterface.register(name, fn)
    patcher.record_item(mask_map, name)
    transformers.AttentionMaskInterface.register(name, mask_map["sdpa"])
    targets = [f"AttentionInterface[{name!r}]", f"AttentionMaskInterface[{name!r}] = sdpa mask"]
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
        model.set_attn_implementation(name)
        for o in owners:
            for attr in sorted(set(vars(o)) - before[id(o)]):
                patcher.record_added(o, attr)
        how = "model.set_attn_implementation"
    else:  # 4.53: the config property's setter writes _attn_implementation_internal
        for cfg in configs:
            cfg._attn_implementation = name
        how = "config._attn_implementation"
    targets.append(f"{how}({name!r}) on {len(configs)} config(s)")
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


# --------------------------------------------------------------------------------------------------------------
# Text, <=4.52: registry without masks (LLaVA backbones) and per-backend classes (Qwen2.5-VL)
# --------------------------------------------------------------------------------------------------------------

PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # FlashAttentionKwargs names
ROPE_FN = "apply_multimodal_rotary_pos_emb"
# What <=4.52's decoder layers pass the Qwen2.5-VL text attention (all by name); the replacement mirrors it.
TEXT_FORWARD_PARAMS = ("hidden_states", "attention_mask", "position_ids", "past_key_value", "output_attentions",
                       "use_cache", "cache_position", "position_embeddings")
_PACKED: contextvars.ContextVar = contextvars.ContextVar("portvlm_packed_rows", default=None)


@contextlib.contextmanager
def packed_rows(cu_seqlens, max_length: int | None = None):
    """Declare the batch-1 row of calls inside as packed samples ``cu_seqlens`` (<=4.52 class-patched text)."""
    token = _PACKED.set((cu_seqlens, max_length))
    try:
        yield
    finally:
        _PACKED.reset(token)


def packed_of(state: AttentionState, position_embeddings):
    """``(cu_seqlens, max_length)`` declared for this call, or ``None``: the context, else the rotary tensor's record."""
    cos = position_embeddings[0] if isinstance(position_embeddings, (tuple, list)) and position_embeddings else None
    active = _PACKED.get()
    store = state.packed_by_rope
    if active is not None:
        key = id(cos)
        if cos is not None and key not in store:

            def _drop(_ref, key=key):
                store.pop(key, None)

            store[key] = (weakref.ref(cos, _drop), active)
        return active
    hit = store.get(id(cos)) if cos is not None else None
    return hit[1] if hit is not None and hit[0]() is cos else None


def attention_table_of(cls):
    """``(name, table)`` of the ``*_ATTENTION_CLASSES`` dict (not the vision one) that holds ``cls``, or ``None``."""
    module = sys.modules.get(cls.__module__)
    for name, value in sorted(vars(module).items()) if module is not None else ():
        is_text_table = name.endswith("_ATTENTION_CLASSES") and "VISION" not in name and isinstance(value, dict)
        if is_text_table and cls in value.values():
            return name, value
    return None


def text_class_reasons(module) -> list[str]:
    """Why portvlm's <=4.52 text forward cannot replace this attention module's class's (empty: it can)."""
    cls = type(module)
    found = attention_table_of(cls)
    if found is None:
        return [f"{cls.__name__} is not picked from a *_ATTENTION_CLASSES table (nothing to patch per backend)"]
    name, table = found
    key = next(k for k, v in table.items() if v is cls)
    reasons = []
    if key not in ("sdpa", "eager"):
        reasons.append(f"text attention built as {key!r} ({cls.__name__}); portvlm patches only the sdpa/eager classes")
    for attr in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "rope_scaling", "layer_idx"):
        if not hasattr(module, attr):
            reasons.append(f"{cls.__name__} has no `{attr}` (portvlm's packed text forward uses it)")
    params = list(inspect.signature(cls.forward).parameters)[1:]
    if tuple(params[: len(TEXT_FORWARD_PARAMS)]) != TEXT_FORWARD_PARAMS:
        reasons.append(f"{cls.__name__}.forward takes {params}, not the <=4.52 {list(TEXT_FORWARD_PARAMS)}")
    if not callable(getattr(sys.modules.get(cls.__module__), ROPE_FN, None)):
        reasons.append(f"{cls.__module__} defines no `{ROPE_FN}`")
    return reasons


def text_class_forward(state: AttentionState, original, self, hidden_states, attention_mask=None, position_ids=None,
                       past_key_value=None, output_attentions=False, use_cache=False, cache_position=None,
                       position_embeddings=None):
    """<=4.52 text attention forward: ``original`` unless a packed row is declared, else ONE causal varlen call."""
    import torch

    from portvlm.backends import kernels
    from portvlm.errors import UnsupportedError

    packed = packed_of(state, position_embeddings)
    bsz, q_len, _ = hidden_states.shape
    cached = past_key_value.get_seq_length(self.layer_idx) if past_key_value is not None else 0
    if packed is None or bsz != 1 or position_embeddings is None or cached:
        return original(self, hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_value=past_key_value, output_attentions=output_attentions, use_cache=use_cache,
                        cache_position=cache_position, position_embeddings=position_embeddings)
    if self.training and getattr(self, "attention_dropout", 0.0):
        raise UnsupportedError(f"packed rows: portvlm's varlen attention has no dropout; {type(self).__name__} "
                               f"has attention_dropout={self.attention_dropout} in training")
    # Packed row (several samples in one row): the mask is ignored, the segments say who attends whom.
    cu, bound = packed
    rope = getattr(sys.modules[type(self).__module__], ROPE_FN)
    q, k, v = (proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin, self.rope_scaling["mrope_section"])
    if past_key_value is not None:  # an empty cache (checked above) is filled as the original would
        k, v = past_key_value.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
    state.calls["text_packed"] += 1
    max_len = int(bound) if bound is not None else kernels.max_seqlen(cu)
    out = kernels.varlen_attention(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu.to(torch.int32), max_len,
        backend=state.text_backend, scale=1.0 / math.sqrt(self.head_dim), causal=True,
    )
    return self.o_proj(out.reshape(bsz, q_len, -1)), None, past_key_value


def accepts_packed_kwargs(fn) -> bool:
    """Whether ``fn`` takes ``cu_seq_lens_q`` (by name or through ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    return "cu_seq_lens_q" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def packed_kwargs_forward(state: AttentionState, original, self, *args, cu_seq_lens_q=None, cu_seq_lens_k=None,
                          max_length_q=None, max_length_k=None, **kwargs):
    """A model forward that also takes ``PACKED_KWARGS``, declaring ``packed_rows`` for the original's duration."""
    # Self-attention packing: k segments are q's (lmms-engine passes the same tensor twice).
    if cu_seq_lens_q is None:
        return original(self, *args, **kwargs)
    with packed_rows(cu_seq_lens_q, max_length_q):
        return original(self, *args, **kwargs)


def packed_kwargs_dispatcher(original):
    forward = dispatch.by_owner(packed_kwargs_forward, original, "text_classes")
    sig = inspect.signature(original)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in PACKED_KWARGS]
    forward.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # Trainer keeps the columns
    return forward


def text_class_dispatcher(original):
    return dispatch.by_owner(text_class_forward, original, "text_classes")


def install_text_classes(claim, model, text_attn_classes) -> list[str]:
    """Claim the sdpa/eager text classes of each table (and the model's forward for ``PACKED_KWARGS``); targets.

    ``claim(cls, attr, make_dispatcher)`` installs (once per class) a dispatcher that runs portvlm's forward for
    the claiming handle's modules only.
    """
    targets = []
    patched = set()
    for cls in text_attn_classes:
        _, table = attention_table_of(cls)
        for key in ("sdpa", "eager"):  # sdpa falls back to eager (super().forward) for output_attentions
            target = table.get(key)
            if target is None or target in patched:
                continue
            claim(target, "forward", text_class_dispatcher)
            patched.add(target)
            targets.append(f"{target.__module__}.{target.__qualname__}.forward ({key}; packed rows -> varlen, causal)")
    top = type(model)
    hooked = dispatch.HOOKS.get((top, "forward"))
    if not accepts_packed_kwargs(hooked.fallback if hooked is not None else top.forward):
        claim(top, "forward", packed_kwargs_dispatcher)
        targets.append(f"{top.__qualname__}.forward takes {', '.join(PACKED_KWARGS)} (-> packed_rows)")
    return targets


def legacy_registry():
    """``(mapping, label)``: where ``ALL_ATTENTION_FUNCTIONS`` keeps its global entries (dict <=4.50, interface 4.51+)."""
    from transformers import modeling_utils

    funcs = modeling_utils.ALL_ATTENTION_FUNCTIONS
    mapping = getattr(funcs, "_global_mapping", funcs)
    label = "ALL_ATTENTION_FUNCTIONS" + (" (AttentionInterface)" if mapping is not funcs else " (dict)")
    return mapping, label


def text_model_of(model, text_layers):
    """The module whose ``.layers`` are ``text_layers`` (the text backbone that builds the causal mask)."""
    return next((m for m in model.modules() if getattr(m, "layers", None) is text_layers), None)


def install_text_legacy(patcher, model, text_model, state: AttentionState) -> list[str]:
    """<=4.52: register the text function under ``state.name`` and set it on the text backbone's configs; targets."""
    mapping, label = legacy_registry()
    name = state.name
    patcher.set_item(mapping, name, make_text_attention(state))
    configs = {id(m.config): m.config for m in text_model.modules() if hasattr(getattr(m, "config", None), "to_dict")}
    for cfg in configs.values():
        patcher.record_attr(cfg, "_attn_implementation_internal")
        cfg._attn_implementation = name
    return [
        f"{label}[{name!r}]",
        f"config._attn_implementation({name!r}) on {len(configs)} text config(s); the tower keeps its own",
        f"mask: {type(text_model).__name__}._update_causal_mask builds the 4-D float causal mask for a name other than "
        "sdpa/flash/flex (no AttentionMaskInterface before 4.53)",
    ]
