"""Packed rows through Qwen3.5's Gated DeltaNet layers (linear attention) without flash-linear-attention.

Qwen3.5 (``qwen3_5``, ``qwen3_5_moe``) interleaves full attention with Gated DeltaNet layers. Their fast path is
flash-linear-attention (``chunk_gated_delta_rule``) and causal-conv1d: Triton/CUDA kernels with no Volta build. Without
them transformers runs the plain-torch fallbacks of ``models/qwen3_5/modeling_qwen3_5.py``:

- ``causal_conv1d_fn`` takes the packed row's ``cu_seq_lens_q`` in ``**kwargs`` and never reads it: each sample's
  convolution window reaches back into the previous sample's last ``kernel - 1`` tokens (5.10-5.24, read in the
  wheels). The causal-conv1d kernel does not help either: it keeps samples apart only through ``seq_idx``, which the
  layer never passes.
- ``torch_chunk_gated_delta_rule`` gets ``cu_seqlens=`` and ignores it, so the recurrent state runs from one sample
  into the next. Up to 5.17 that mixing is silent; from 5.23 the hub-kernels wrapper
  (``integrations/hub_kernels.use_kernel_func_from_hub_with_fallback``) refuses instead: ``ValueError:
  `chunk_gated_delta_rule` can't keep packed sequences apart without `flash-linear-attention```.

So on a V100 (and wherever those kernels lack the device) Qwen3.5 cannot train on packed rows. portvlm provides the
packed path the fallback lacks, in plain torch (../shared/research/families.md, "Qwen3.5's linear-attention
fallbacks ignore packing"):

- the convolution: each output position sums only the window taps that lie in its own sample (one masked
  depthwise sum over the ``kernel`` shifts, fp32 accumulation, no host sync), so every sample's window starts from
  zeros at its ``cu_seqlens`` boundary, exactly as the sample alone would;
- the delta rule: upstream's own torch function, once per sample, the recurrent state fresh (zeros) at each
  boundary and fp32 inside as the fallback keeps it; the first sample continues a cached state (a prefill that
  continues a stream) and the last sample's state is what the cache keeps.

How it is installed (``Shim("linear_attention_packed")`` in ``portvlm.shims.patch``): the DeltaNet class's ``forward``
gets portvlm's shared per-owner dispatcher (``portvlm.shims.dispatch``), which, for modules a live patch owns,
declares the row's ``cu_seq_lens_q`` in a context variable for the forward's duration; the modeling module's two
functions get dispatchers (same ``dispatch.acquire`` bookkeeping, so the last revert restores them) that take the
packed path only inside such a declaration and run upstream's function otherwise. Another model of the class, an
unpacked row, and single-token decode (``torch_recurrent_gated_delta_rule``, untouched) run upstream's code.
When flash-linear-attention really serves the delta rule (its kernel reads ``cu_seqlens``), portvlm leaves the
delta rule to it and still fixes the convolution.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys

from portvlm.errors import UnsupportedError
from portvlm.shims import dispatch

CONV_FN = "causal_conv1d_fn"
DELTA_FN = "torch_chunk_gated_delta_rule"
FUNCTIONS = (CONV_FN, DELTA_FN)
MODULE_ATTRS = ("conv1d", "in_proj_qkv", "A_log", "dt_bias", "layer_idx")  # what identifies a Gated DeltaNet layer
FORWARD_PARAMS = ("hidden_states", "attention_mask")

# (cu_seqlens tensor or None) while an owned DeltaNet layer runs: the declaration the module functions read.
_PACKED: contextvars.ContextVar = contextvars.ContextVar("portvlm_linear_packed", default=None)


def is_linear_attention(module) -> bool:
    """Whether ``module`` looks like a Gated DeltaNet layer (Qwen3.5's ``linear_attn``)."""
    return all(hasattr(module, attr) for attr in MODULE_ATTRS)


def modeling_module(cls):
    """The module that defines ``cls`` (where its forward looks the two functions up)."""
    return sys.modules.get(cls.__module__)


def torch_function(fn):
    """Upstream's plain-torch function under the hub-kernels wrappers (``functools.wraps`` chains)."""
    return inspect.unwrap(fn)


def kernel_serves_delta(fn) -> bool:
    """Whether the wrapped delta rule runs a real kernel (flash-linear-attention), not the torch fallback.

    The wrapper keeps its choice in a closure (``implementation``); no closure found means the torch function.
    """
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    names = code.co_freevars if code is not None else ()
    chosen = dict(zip(names, (c.cell_contents for c in cells), strict=False)).get("implementation")
    return chosen is not None and chosen is not torch_function(fn)


def module_reasons(module) -> list[str]:
    """Why portvlm's packed path cannot serve this linear-attention module (empty: it can)."""
    cls = type(module)
    reasons = [f"{cls.__name__} has no `{a}` (not a Gated DeltaNet layer)" for a in MODULE_ATTRS
               if not hasattr(module, a)]
    params = inspect.signature(cls.forward).parameters
    missing = [p for p in FORWARD_PARAMS if p not in params]
    if missing or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        reasons.append(f"{cls.__name__}.forward takes no {', '.join(missing) or '**kwargs'} "
                       "(the packed row's cu_seq_lens_q cannot reach it)")
    mod = modeling_module(cls)
    for name in FUNCTIONS:
        fn = getattr(mod, name, None)
        if not callable(fn):
            reasons.append(f"{cls.__module__} defines no `{name}` (the forward portvlm wraps calls it)")
        elif name == DELTA_FN:
            sig = inspect.signature(torch_function(fn)).parameters
            need = ("query", "key", "value", "g", "beta", "initial_state", "output_final_state")
            if any(p not in sig for p in need):
                reasons.append(f"{cls.__module__}.{name} no longer takes {', '.join(p for p in need if p not in sig)}")
    return reasons


@contextlib.contextmanager
def packed_linear(cu_seqlens):
    """Declare the linear-attention calls inside as running over one packed row with boundaries ``cu_seqlens``."""
    token = _PACKED.set(cu_seqlens)
    try:
        yield
    finally:
        _PACKED.reset(token)


# -- the packed computations (plain torch) ------------------------------------------------------------------------


def packed_causal_conv1d(x, weight, bias, activation, cu_seqlens):
    """Depthwise causal conv over a packed row ``x [1, C, L]``: no window crosses a ``cu_seqlens`` boundary.

    ``L`` may exceed ``cu_seqlens[-1]`` by a cached prefix (``Cache.update_conv_state`` prepends the stream's last
    ``kernel - 1`` inputs); the prefix belongs to the first sample. fp32 accumulation, result in ``x``'s dtype.
    """
    import torch
    from transformers.activations import ACT2FN

    from portvlm.backends import kernels

    if x.shape[0] != 1:
        raise UnsupportedError(f"packed rows are batch 1 (one row of samples with cu_seq_lens_q); got batch {x.shape[0]}")
    total, taps = x.shape[-1], weight.shape[-1]
    offset = total - int(cu_seqlens[-1]) if not torch.compiler.is_compiling() else 0
    seg = kernels.segment_ids(cu_seqlens.to(torch.long), total - offset)
    seg = torch.cat([seg.new_zeros(offset), seg]) if offset > 0 else seg
    xf = x.float()
    wf = weight.float()
    out = xf * wf[:, -1:]  # tap 0: the position itself
    for shift in range(1, taps):  # tap `shift` reads x[t - shift], only inside t's own sample
        same = torch.zeros_like(seg, dtype=torch.bool)
        same[shift:] = seg[shift:] == seg[:-shift]
        shifted = torch.nn.functional.pad(xf[..., :-shift], (shift, 0))
        out = out + shifted * same.to(xf.dtype) * wf[:, taps - 1 - shift: taps - shift]
    if bias is not None:
        out = out + bias.float()[:, None]
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(x.dtype)


def packed_delta_rule(delta, query, key, value, g, beta, cu_seqlens, initial_state=None, output_final_state=False,
                      **kwargs):
    """Upstream's torch delta rule once per sample of a packed row ``[1, L, H, D]``: fresh state at each boundary."""
    import torch

    from portvlm.backends import kernels

    if query.shape[0] != 1:
        raise UnsupportedError(f"packed rows are batch 1; got batch {query.shape[0]}")
    bounds = kernels.host_cu_seqlens(cu_seqlens)  # one host sync per tensor object, cached
    outs, state = [], None
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=False)):
        if b <= a:
            continue
        out, state = delta(query[:, a:b], key[:, a:b], value[:, a:b], g=g[:, a:b], beta=beta[:, a:b],
                           initial_state=initial_state if i == 0 else None,
                           output_final_state=output_final_state, **kwargs)
        outs.append(out)
    if bounds[-1] < query.shape[1]:  # positions after the last boundary (padding): one more fresh segment
        out, state = delta(query[:, bounds[-1]:], key[:, bounds[-1]:], value[:, bounds[-1]:], g=g[:, bounds[-1]:],
                           beta=beta[:, bounds[-1]:], initial_state=None, output_final_state=output_final_state,
                           **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), state if output_final_state else None


# -- dispatchers ---------------------------------------------------------------------------------------------------


def _forward_impl(state, fallback, self, *args, **kwargs):
    with packed_linear(kwargs.get("cu_seq_lens_q")):
        state.calls["linear"] += 1
        if kwargs.get("cu_seq_lens_q") is not None:
            state.calls["linear_packed"] += 1
        return fallback(self, *args, **kwargs)


def forward_dispatcher(fallback):
    """Class-level ``forward`` for Gated DeltaNet layers: owned modules declare their packed row (``_PACKED``)."""
    return dispatch.by_owner(_forward_impl, fallback, "linear_attention_packed")


def _strip(kwargs):
    return {k: v for k, v in kwargs.items() if k not in ("cu_seqlens", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k",
                                                         "max_length_q", "max_length_k")}


def conv_dispatcher(fallback):
    """Module-level ``causal_conv1d_fn``: the packed conv inside a declaration, upstream's function otherwise."""

    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        cu = _PACKED.get()
        if cu is None:
            return fallback(hidden_states, weight, bias, activation=activation, **kwargs)
        return packed_causal_conv1d(hidden_states, weight, bias, activation, cu)

    causal_conv1d_fn.__portvlm__ = "linear_attention_packed"
    causal_conv1d_fn.__wrapped__ = fallback
    return causal_conv1d_fn


def delta_dispatcher(fallback):
    """Module-level chunked delta rule: per-sample torch runs inside a declaration, upstream's function otherwise."""
    serves = kernel_serves_delta(fallback)
    delta = torch_function(fallback)

    def torch_chunk_gated_delta_rule(query, key, value, g, beta, *args, **kwargs):
        cu = _PACKED.get()
        if cu is None or serves:  # not packed, or flash-linear-attention reads cu_seqlens itself
            return fallback(query, key, value, g, beta, *args, **kwargs)
        if args:
            raise UnsupportedError("portvlm's packed delta rule takes chunk_size and the rest by name")
        return packed_delta_rule(delta, query, key, value, g, beta, cu, **_strip(kwargs))

    torch_chunk_gated_delta_rule.__portvlm__ = "linear_attention_packed"
    torch_chunk_gated_delta_rule.__wrapped__ = fallback
    return torch_chunk_gated_delta_rule


def linear_modules(model) -> dict[type, list]:
    """The model's Gated DeltaNet modules (decoder layers' ``linear_attn``), grouped by class."""
    groups: dict[type, list] = {}
    for module in model.modules():
        if is_linear_attention(module):
            groups.setdefault(type(module), []).append(module)
    return groups


def install(claim, model) -> list[str]:
    """Hook the DeltaNet forward(s) and their modeling module's two functions; returns the report's targets."""
    targets = []
    for cls, mods in linear_modules(model).items():
        claim(cls, "forward", forward_dispatcher)
        targets.append(f"{cls.__module__}.{cls.__qualname__}.forward ({len(mods)} layer(s): packed rows declared)")
        module = modeling_module(cls)
        hook = claim(module, CONV_FN, conv_dispatcher)
        targets.append(f"{module.__name__}.{CONV_FN} (per-sample windows on packed rows)")
        hook = claim(module, DELTA_FN, delta_dispatcher)
        how = ("left to flash-linear-attention (it reads cu_seqlens)" if kernel_serves_delta(hook.fallback)
               else "fresh fp32 state per sample on packed rows")
        targets.append(f"{module.__name__}.{DELTA_FN} ({how})")
    return targets
