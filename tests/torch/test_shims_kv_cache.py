"""kv_cache shim: CacheView read/write/crop/evict on real caches from a forward; SinkWindowCache stays bounded."""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _tiny  # noqa: E402

from portvlm.shims import kv_cache  # noqa: E402
from portvlm.shims.kv_cache import CacheView  # noqa: E402

V = transformers.__version__


@pytest.fixture(scope="module")
def text_model():
    return _tiny.build("qwen2_5_vl", "sdpa")


def _forward(model, ids, cache=None):
    # Explicit text-only mrope positions: 4.55's Qwen2.5-VL decode path otherwise adds in place to an expanded view,
    # which torch 2.13 refuses (upstream, not the shim).
    past = 0 if cache is None else cache.get_seq_length()
    pos = torch.arange(past, past + ids.shape[1])
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, cache_position=pos, **kv_cache.cache_kwargs(model, cache),
                     position_ids=pos.view(1, 1, -1).expand(3, 1, -1))


def _cache(model, n=10):
    ids = torch.arange(2, 2 + n)[None]
    return kv_cache.output_cache(_forward(model, ids))


def test_view_reads_a_real_cache(text_model):
    cache = _cache(text_model, 10)
    view = CacheView(cache)
    assert view.num_layers == 2
    assert view.seq_length() == 10 == cache.get_seq_length()
    k, v = view.keys(1), view.values(1)
    assert k.shape == (1, 2, 10, 16) and v.shape == (1, 2, 10, 16)  # [B, H_kv, S, D]


def test_view_write_then_read(text_model):
    view = CacheView(_cache(text_model, 6))
    k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    view.set(0, k, v)
    assert torch.equal(view.keys(0), k) and torch.equal(view.values(0), v)
    assert view.seq_length(0) == 4
    assert view.cache.get_seq_length(0) == 4


def test_crop_keeps_first_tokens_on_every_version(text_model):
    cache = _cache(text_model, 10)
    view = CacheView(cache)
    before = view.keys(0).clone()
    view.crop(7)
    assert view.seq_length() == 7 and cache.get_seq_length() == 7
    assert torch.equal(view.keys(0), before[:, :, :7])
    view.crop(7)  # no-op
    assert view.seq_length() == 7


def test_evict_drops_a_range_in_every_layer(text_model):
    view = CacheView(_cache(text_model, 10))
    before = [view.keys(i).clone() for i in range(view.num_layers)]
    view.evict(2, 5)
    for i in range(view.num_layers):
        want = torch.cat((before[i][:, :, :2], before[i][:, :, 5:]), dim=2)
        assert torch.equal(view.keys(i), want)
    assert view.seq_length() == 7


def test_cropped_cache_continues_like_a_shorter_prefix(text_model):
    """Crop, then decode one token: logits equal decoding after a forward over the shorter prefix."""
    ids = torch.arange(2, 12)[None]
    cache = kv_cache.output_cache(_forward(text_model, ids))
    CacheView(cache).crop(6)
    nxt = torch.tensor([[40]])
    got = _forward(text_model, nxt, cache).logits
    ref_cache = kv_cache.output_cache(_forward(text_model, ids[:, :6]))
    want = _forward(text_model, nxt, ref_cache).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sink_window_cache_is_bounded_through_generation_steps(text_model):
    cache = kv_cache.SinkWindowCache(sink=2, window=5)
    ids = torch.arange(2, 10)[None]  # 8-token prefill
    _forward(text_model, ids, cache)
    view = CacheView(cache)
    assert view.seq_length() == 7  # 2 sink + 5 window
    sink = view.keys(0)[:, :, :2].clone()
    for step in range(4):
        _forward(text_model, torch.tensor([[30 + step]]), cache)
        assert all(view.seq_length(i) == 7 for i in range(view.num_layers))
    assert torch.equal(view.keys(0)[:, :, :2], sink)  # sink tokens kept
    assert cache.tokens_seen == 12


def test_sink_window_cache_is_subclassable_latent_style(text_model):
    """A latent/MLA-style cache fits the same interface: override evict_layer, keep using the view."""

    class KeepNewest(kv_cache.SinkWindowCache):
        def evict_layer(self, layer_idx):
            view = self.view
            k, v = view.keys(layer_idx), view.values(layer_idx)
            if k is not None and k.shape[-2] > self.window:
                view.set(layer_idx, k[..., -self.window :, :], v[..., -self.window :, :])

    cache = KeepNewest(sink=0, window=3)
    _forward(text_model, torch.arange(2, 8)[None], cache)
    view = CacheView(cache)
    assert [view.seq_length(i) for i in range(view.num_layers)] == [3, 3]
    # a latent cache stores another shape under "values" (e.g. a compressed c_kv): the view does not care
    view.set(0, torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 4))
    assert view.values(0).shape[-1] == 4 and view.seq_length(0) == 3


def test_layout_probe_names_what_was_found():
    class Odd:
        pass

    reasons = kv_cache.layout_reasons(Odd())
    assert reasons and "Odd" in reasons[0] and "layers" in reasons[0]
    with pytest.raises(TypeError, match="kv_cache shim"):
        CacheView(Odd())


# ---------------------------------------------------------------------------------------------------------------
# The cache's name: `cache` (5.24.0+) or `past_key_values`, probed from the forward and the output
# ---------------------------------------------------------------------------------------------------------------


class _CacheDeprecation(AssertionError):
    """What the guard raises in place of 5.24's `past_key_values` deprecation (a FutureWarning or a log line)."""


@pytest.fixture
def no_cache_deprecation(monkeypatch):
    """Turn 5.24's `past_key_values` deprecations into errors: ``@deprecate_kwarg``'s FutureWarning and the
    ``logger.warning_once`` of the output property / ``_rename_kwargs_for_bc`` (patched on the class, so the
    once-per-process cache cannot hide a second occurrence)."""
    original = logging.Logger.warning_once if hasattr(logging.Logger, "warning_once") else None

    def strict(self, msg, *args, **kwargs):
        if "past_key_values" in str(msg):
            raise _CacheDeprecation(str(msg))
        if original is not None:
            return original(self, msg, *args, **kwargs)

    monkeypatch.setattr(logging.Logger, "warning_once", strict, raising=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        yield


def test_cache_argument_is_a_parameter_of_the_forward(text_model):
    name = kv_cache.cache_argument(text_model)
    params = inspect.signature(type(text_model).forward).parameters
    assert name in params
    # the newest name wins: "cache" exactly where the forward takes it (5.24.0+), else past_key_values
    assert name == ("cache" if "cache" in params else "past_key_values")


def test_cache_round_trips_through_the_shim_without_deprecation(text_model, no_cache_deprecation):
    cache = transformers.DynamicCache()
    out = _forward(text_model, torch.arange(2, 8)[None], cache)
    assert kv_cache.output_cache(out) is cache
    assert cache.get_seq_length() == 6


def test_the_deprecation_guard_has_teeth(text_model, no_cache_deprecation):
    """Where the forward takes `cache`, the old name must trip the guard (else the guard proves nothing)."""
    if kv_cache.cache_argument(text_model) != "cache":
        assert "cache" not in inspect.signature(type(text_model).forward).parameters
        return
    pos = torch.arange(4)
    kw = dict(input_ids=torch.arange(2, 6)[None], use_cache=True, cache_position=pos,
              position_ids=pos.view(1, 1, -1).expand(3, 1, -1))
    with pytest.raises((FutureWarning, _CacheDeprecation), match="past_key_values"), torch.no_grad():
        text_model(**kw, past_key_values=transformers.DynamicCache())
    with torch.no_grad():
        out = text_model(**kw)
    with pytest.raises(_CacheDeprecation, match="past_key_values"):
        out.past_key_values  # noqa: B018 - the deprecated property logs


@pytest.mark.parametrize("model_id", ["qwen2_5vl", "llava_mla"])
def test_streaming_passes_with_cache_deprecations_as_errors(model_id, no_cache_deprecation):
    """The streaming suite (SinkWindowCache; llava_mla: the latent cache through MLAAttention) never uses the
    deprecated name: on 5.24 any use raises inside the stream and fails `*.stream_completes`."""
    from portvlm.models import tiny
    from portvlm.suites import SuiteContext, run_suite

    if tiny.is_available(model_id):
        pytest.skip("; ".join(tiny.is_available(model_id)))
    r = run_suite(SuiteContext(model_id, "cpu", fast=True), "streaming")
    assert r.status == "pass", [(c.name, c.detail[:300]) for c in r.checks if not c.ok]


def test_cache_argument_reasons_name_what_was_found():
    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    reasons = kv_cache.cache_argument_reasons(NoCache())
    assert reasons and "NoCache.forward" in reasons[0] and "input_ids, attention_mask" in reasons[0]
    with pytest.raises(TypeError, match="kv_cache shim"):
        kv_cache.cache_argument(NoCache())


def test_output_cache_rejects_what_is_not_a_model_output():
    with pytest.raises(TypeError, match="not a ModelOutput"):
        kv_cache.output_cache((torch.zeros(1),))


def test_update_cache_fills_a_dynamic_cache():
    """update_cache calls Cache.update as the installed version's attention does (<=5.3 a positional
    cache_kwargs dict, then kwargs=...); either way the layer stores exactly what was given."""
    cache = transformers.DynamicCache()
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    got = kv_cache.update_cache(cache, k, v, 0, {"cache_position": torch.arange(3)}, {"position_ids": None})
    assert torch.equal(got[0], k) and torch.equal(got[1], v) and cache.get_seq_length() == 3
    params = inspect.signature(transformers.DynamicCache.update).parameters
    assert kv_cache.takes_cache_kwargs(cache) == ("cache_kwargs" in params)
    assert kv_cache.takes_cache_kwargs(kv_cache.SinkWindowCache()) == ("cache_kwargs" in params)  # MRO probe
