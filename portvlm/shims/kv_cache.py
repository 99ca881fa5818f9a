"""One accessor over every transformers KV-cache layout, and a sink + window streaming cache built on it.

Shim ``kv_cache`` answers three upstream changes (../shared/research/transformers-breakpoints.md §5):

- ≤4.53: ``DynamicCache.key_cache`` / ``value_cache`` are lists of ``[B, H_kv, S, D]`` tensors.
- 4.54.0 ("layered cache"): ``cache.layers[i].keys`` / ``.values``;
  ``key_cache`` became a deprecated property and was removed in 4.56.0.
- 5.0.0: no legacy tuples, no ``cache[i]``; 5.15.0 reversed the meaning of ``Cache.crop``'s argument
  (``crop(max_length)`` → ``crop(tokens_to_remove)``, which must be negative). A *negative* argument means
  "remove that many tokens" in every version from 4.49 to 5.24, so the view crops with a negative count.
- 5.24.0 renamed the cache argument and output field ``past_key_values`` → ``cache`` in the Qwen2-VL, Qwen2.5-VL,
  Qwen3-VL and LLaVA forwards (``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")``, a
  ``FutureWarning``; ``outputs.past_key_values`` is a property that logs a deprecation), and attention calls
  ``cache.update(k, v, layer_idx, kwargs=kwargs)``. ``cache_argument`` / ``cache_kwargs`` / ``output_cache`` probe
  the forward's parameters and the output's fields for the name; ``update_cache`` probes ``Cache.update`` for the
  ``cache_kwargs`` dict it took until 5.3. Every portvlm caller goes through them, so 5.24 sees no deprecated name
  and 4.50 no new one.

The view probes the cache object (``layers`` first, then ``key_cache`` lists); it never branches on the version.
Peers wrote ``self.key_cache`` / ``self._seen_tokens`` directly (StreamingVLM, VLM-MLA) and broke on 4.54 and v5;
``SinkWindowCache`` only goes through the view.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields, is_dataclass

import torch

SEQ_DIM = -2  # every layout stores [batch, kv_heads, seq, head_dim]; a latent cache keeps seq at -2 too


@dataclass(frozen=True)
class CacheLayout:
    """Which storage a cache object uses, found by probing it."""

    name: str  # "layers" | "lists"
    answers: str


LAYERS = CacheLayout("layers", "transformers 4.54.0+: Cache.layers[i].keys/.values (layered cache refactor)")
LISTS = CacheLayout("lists", "transformers <=4.53: DynamicCache.key_cache / value_cache lists")


def layout_reasons(cache) -> list[str]:
    """Why ``CacheView`` cannot read this cache (empty: it can)."""
    if isinstance(getattr(cache, "layers", None), list):
        return []
    if isinstance(vars(cache).get("key_cache"), list) and isinstance(vars(cache).get("value_cache"), list):
        return []
    return [
        f"{type(cache).__name__} has neither a `layers` list (transformers 4.54+) nor `key_cache`/`value_cache` "
        "lists (<=4.53); kv_cache shim does not know this cache layout"
    ]


def layout_of(cache) -> CacheLayout:
    """The storage layout of ``cache``; raises ``TypeError`` naming what was found when it is neither."""
    reasons = layout_reasons(cache)
    if reasons:
        raise TypeError(reasons[0])
    return LAYERS if isinstance(getattr(cache, "layers", None), list) else LISTS


def _is_empty(t) -> bool:
    # <=4.53 fills skipped layers with [] ; 4.54-4.57 layers start with keys=None; 5.x with an empty tensor.
    return t is None or not isinstance(t, torch.Tensor) or t.numel() == 0


class CacheView:
    """Read/write one cache's keys and values per layer, whatever the transformers version stores them as."""

    def __init__(self, cache):
        self.cache = cache
        self.layout = layout_of(cache)

    @property
    def num_layers(self) -> int:
        if self.layout is LAYERS:
            return len(self.cache.layers)
        return len(vars(self.cache)["key_cache"])

    def keys(self, i: int) -> torch.Tensor | None:
        """Keys of layer ``i`` (``[B, H_kv, S, D]``), ``None`` when the layer holds nothing yet."""
        t = self.cache.layers[i].keys if self.layout is LAYERS else vars(self.cache)["key_cache"][i]
        return None if _is_empty(t) else t

    def values(self, i: int) -> torch.Tensor | None:
        """Values of layer ``i``, ``None`` when the layer holds nothing yet."""
        t = self.cache.layers[i].values if self.layout is LAYERS else vars(self.cache)["value_cache"][i]
        return None if _is_empty(t) else t

    def set(self, i: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace layer ``i``'s keys and values (the layer must exist)."""
        if self.layout is LAYERS:
            layer = self.cache.layers[i]
            old = layer.keys
            layer.keys, layer.values = keys, values
            # 5.x layers initialise lazily (dtype/device/is_initialized); a layer that held nothing is now live.
            if hasattr(layer, "is_initialized"):
                layer.is_initialized = True
            for attr in ("dtype", "device"):
                if hasattr(layer, attr):
                    setattr(layer, attr, getattr(keys, attr))
            # Sliding layers count what they have seen; keep that count in step with what we removed/added.
            if isinstance(getattr(layer, "cumulative_length", None), int):
                layer.cumulative_length += keys.shape[SEQ_DIM] - (0 if _is_empty(old) else old.shape[SEQ_DIM])
        else:
            vars(self.cache)["key_cache"][i] = keys
            vars(self.cache)["value_cache"][i] = values

    def seq_length(self, i: int = 0) -> int:
        """Number of tokens layer ``i`` holds."""
        k = self.keys(i) if i < self.num_layers else None
        return 0 if k is None else int(k.shape[SEQ_DIM])

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens in every layer, whatever the version's ``Cache.crop`` means."""
        if max_length < 0:
            raise ValueError(f"crop(max_length) wants a length >= 0, got {max_length}")
        remove = self.seq_length() - max_length
        if remove <= 0:
            return
        # A negative argument means "remove that many tokens" both for crop(max_length) (<=5.14) and
        # crop(tokens_to_remove) (5.15+), so this one call is right on every version.
        self.cache.crop(-remove)

    def evict(self, start: int, end: int) -> None:
        """Drop tokens ``[start, end)`` from every layer (what a sink + window streaming cache needs)."""
        if not 0 <= start <= end:
            raise ValueError(f"evict wants 0 <= start <= end, got [{start}, {end})")
        for i in range(self.num_layers):
            k, v = self.keys(i), self.values(i)
            if k is None or start >= k.shape[SEQ_DIM] or start == end:
                continue
            self.set(i, _drop(k, start, end), _drop(v, start, end))


def _drop(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    n = t.shape[SEQ_DIM]
    end = min(end, n)
    return torch.cat((t.narrow(SEQ_DIM, 0, start), t.narrow(SEQ_DIM, end, n - end)), dim=SEQ_DIM)


# The names a forward takes its KV cache under, newest first: ``cache`` (5.24.0+), ``past_key_values`` (4.x–5.23).
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument_reasons(model) -> list[str]:
    """Why portvlm cannot tell how to pass a KV cache to ``model`` (empty: it can)."""
    params = _forward_parameters(model)
    if params is None:
        return [f"{type(model).__name__} has no inspectable forward; kv_cache shim cannot name its cache argument"]
    if not any(name in params for name in CACHE_ARGUMENTS):
        return [f"{type(model).__name__}.forward takes none of {', '.join(CACHE_ARGUMENTS)} "
                f"(parameters: {', '.join(params)}); kv_cache shim does not know this cache argument"]
    return []


def cache_argument(model) -> str:
    """``"cache"`` (transformers 5.24.0+) or ``"past_key_values"``: the name ``model``'s forward takes its cache under.

    Probes the forward's signature (``inspect.signature`` follows ``@deprecate_kwarg``'s ``functools.wraps`` to the
    real parameters); raises ``TypeError`` naming what was found when the forward takes neither.
    """
    params = _forward_parameters(model) or ()
    name = next((n for n in CACHE_ARGUMENTS if n in params), None)
    if name is None:
        raise TypeError(cache_argument_reasons(model)[0])
    return name


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` to pass ``cache`` to ``model`` under the name its forward takes (no deprecation on 5.24)."""
    return {cache_argument(model): cache}


def output_cache(outputs):
    """The KV cache a model output carries (``.cache`` on 5.24.0+, ``.past_key_values`` before), read without
    touching 5.24's deprecated ``past_key_values`` property (``None`` when that field is empty); ``TypeError`` naming
    the fields when the output has neither."""
    names = {f.name for f in fields(outputs)} if is_dataclass(outputs) else set()
    for name in CACHE_ARGUMENTS:
        if name in names:
            return getattr(outputs, name)
    raise TypeError(f"{type(outputs).__name__} has no field among {', '.join(CACHE_ARGUMENTS)} "
                    f"(fields: {', '.join(sorted(names)) or 'none: not a ModelOutput dataclass'}); "
                    "kv_cache shim cannot read the cache from it")


def _forward_parameters(model) -> tuple[str, ...] | None:
    forward = getattr(model if isinstance(model, type) else type(model), "forward", None)
    return _parameters(forward) if forward is not None else None


@functools.cache
def _parameters(fn) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def takes_cache_kwargs(cache) -> bool:
    """Whether transformers' ``update`` of this cache takes the positional ``cache_kwargs`` dict (<=5.3).

    Subclasses (``SinkWindowCache``, the latent caches) forward ``*args, **kwargs``, so the probe reads the first
    ``update`` defined by transformers itself in the class's MRO.
    """
    return _takes_cache_kwargs(type(cache))


@functools.cache
def _takes_cache_kwargs(cls) -> bool:
    for klass in cls.__mro__:
        if "update" in vars(klass) and klass.__module__.startswith("transformers"):
            return "cache_kwargs" in (_parameters(vars(klass)["update"]) or ())
    return False


def update_cache(cache, key_states, value_states, layer_idx: int, cache_kwargs: dict, kwargs: dict | None = None):
    """``cache.update`` called the way this transformers calls it from an attention layer.

    <=5.3: ``update(k, v, layer_idx, cache_kwargs)``; 5.4–5.23: ``update(k, v, layer_idx)`` (extra keywords are
    accepted and ignored); 5.24.0+: ``update(k, v, layer_idx, kwargs=kwargs)`` with the attention call's kwargs.
    """
    if takes_cache_kwargs(cache):
        return cache.update(key_states, value_states, layer_idx, cache_kwargs)
    return cache.update(key_states, value_states, layer_idx, kwargs={} if kwargs is None else kwargs)


def _dynamic_cache_class():
    from transformers import DynamicCache

    return DynamicCache


def _make_sink_window_cache():
    DynamicCache = _dynamic_cache_class()

    class SinkWindowCache(DynamicCache):
        """A ``DynamicCache`` keeping the first ``sink`` tokens and the last ``window`` tokens of every layer.

        Attention at each step sees everything cached plus the new tokens; afterwards the layer is trimmed, so the
        cache holds at most ``sink + window`` tokens. Subclasses override ``evict_layer`` (which tokens to drop) or
        ``pack``/``unpack`` (what a layer stores, e.g. an MLA-style latent in place of values); everything goes
        through ``CacheView``, so it works on ``key_cache`` lists (<=4.53), ``layers`` (4.54+) and 5.x.
        """

        def __init__(self, sink: int = 4, window: int = 1024, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if sink < 0 or window < 1:
                raise ValueError(f"SinkWindowCache wants sink >= 0 and window >= 1, got sink={sink}, window={window}")
            self.sink = sink
            self.window = window
            self.tokens_seen = 0  # tokens ever written to the first KV layer (positions keep growing; the cache not)
            self._first_kv = None  # that layer's index: 0, or a hybrid cache's first attention layer (Qwen3.5: 1)

        @property
        def view(self) -> CacheView:
            return CacheView(self)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            # *args/**kwargs: <=5.3 pass cache_kwargs positionally, 5.4+ pass nothing (Cache.update(k, v, i, *a, **kw)).
            if self._first_kv is None:
                self._first_kv = layer_idx
            if layer_idx == self._first_kv:
                self.tokens_seen += key_states.shape[SEQ_DIM]
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            self.evict_layer(layer_idx)
            return keys, values  # this step attends over everything; only what is *kept* is bounded

        def evict_layer(self, layer_idx: int) -> None:
            """Trim layer ``layer_idx`` to its sink and its window."""
            view = self.view
            k, v = view.keys(layer_idx), view.values(layer_idx)
            if k is None:
                return
            n = k.shape[SEQ_DIM]
            if n > self.sink + self.window:
                view.set(layer_idx, _drop(k, self.sink, n - self.window), _drop(v, self.sink, n - self.window))

    return SinkWindowCache


_SINK_WINDOW_CACHE = None


def __getattr__(name: str):
    # SinkWindowCache subclasses transformers' DynamicCache, which is only imported when first asked for.
    global _SINK_WINDOW_CACHE
    if name == "SinkWindowCache":
        if _SINK_WINDOW_CACHE is None:
            _SINK_WINDOW_CACHE = _make_sink_window_cache()
        return _SINK_WINDOW_CACHE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
