"""portvlm.mla (the llava_mla family): full-rank oracles, cached decoding, gradients, the latent cache on every
layout, and negative controls (a wrong up-projection fails the oracle; a cache that loses k_rope fails streaming)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from portvlm.mla import conversion  # noqa: E402
from portvlm.mla.conversion import Geometry, MLASpec, convert, full_rank  # noqa: E402
from portvlm.models import inputs as model_inputs  # noqa: E402
from portvlm.models import tiny  # noqa: E402
from portvlm.shims.kv_cache import CacheView  # noqa: E402
from portvlm.suites import SuiteContext  # noqa: E402
from portvlm.suites import mla_checks as checks  # noqa: E402
from portvlm.testing.decode import greedy_cached, greedy_full  # noqa: E402

FP32 = dict(atol=1e-5, rtol=1e-4)  # portvlm.testing.tolerances: ("cpu", "float32", *, "fwd")


@pytest.fixture(scope="module")
def base():
    """The tiny LLaVA the llava_mla family converts (unconverted MHA, fp32 eager)."""
    return tiny.build("llava", attn_implementation="eager")


@pytest.fixture(scope="module")
def geo(base):
    return Geometry.of(base.config)


def _clone(model, attn="eager"):
    return tiny.clone(model, attn_implementation=attn, model_id="llava")


def _logits(model, inp):
    with torch.no_grad():
        return model(**inp, use_cache=False).logits


@pytest.fixture(scope="module")
def inp():
    return model_inputs.build("llava", "image")


@pytest.mark.parametrize("name", ["all_rope", "uniform", "2-norm"])
def test_full_rank_conversion_equals_its_oracle(base, geo, inp, name):
    spec = checks.oracle_specs(geo)[name]
    expected = checks.oracle_logits(base, spec, name, inp, _clone)
    got = _logits(convert(_clone(base, "sdpa"), spec), inp)
    torch.testing.assert_close(got, expected, **FP32)


def test_all_rope_oracle_is_the_original_model(base, inp):
    # The all-RoPE oracle is the unconverted model itself; partial RoPE really changes the function.
    spec = checks.oracle_specs(Geometry.of(base.config))["uniform"]
    assert (checks.oracle_logits(base, spec, "uniform", inp, _clone) - _logits(base, inp)).abs().max() > 1e-2


def test_wrong_up_projection_fails_the_full_rank_oracle(base, geo, inp, monkeypatch):
    """Negative control: up = U (the √S forgotten on one side) must be far outside the fp32 tolerance."""
    right = conversion.joint_svd

    def forgets_root(k_nope, v, latent_dim, method="full"):
        low = right(k_nope, v, latent_dim, method)
        root = low.singular_values.sqrt()
        return conversion.LowRankKV(low.down, low.k_up / root, low.v_up / root, low.singular_values)

    monkeypatch.setattr(conversion, "joint_svd", forgets_root)
    spec = checks.oracle_specs(geo)["all_rope"]
    err = (_logits(convert(_clone(base), spec), inp) - _logits(base, inp)).abs().max()
    assert err > 100 * FP32["atol"], f"a wrong up-projection passed the oracle (max err {err:.2e})"


def test_gram_svd_is_the_same_truncation_as_the_full_svd():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(24, 64, generator=g), torch.randn(32, 64, generator=g)
    full, gram = (conversion.joint_svd(k, v, 16, m) for m in ("full", "gram"))
    for a, b in ((full.k_up @ full.down, gram.k_up @ gram.down), (full.v_up @ full.down, gram.v_up @ gram.down)):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)
    exact = conversion.joint_svd(k, v, 56, "gram")  # full rank: [k; v] itself
    torch.testing.assert_close(torch.cat((exact.k_up, exact.v_up)) @ exact.down, torch.cat((k, v)).double(), atol=1e-9, rtol=1e-9)


def test_reduced_rank_cached_decoding_equals_full_forward():
    from portvlm.mla.cache import LatentCache

    model = tiny.build("llava_mla", attn_implementation="sdpa")
    assert conversion.spec_of(model).rank < full_rank(Geometry.of(model.config), conversion.spec_of(model).rope_dims)
    inp = model_inputs.build("llava_mla", "image")
    inp.pop("position_ids")
    cache = LatentCache()
    tokens, logits = greedy_cached(model, inp, 6, cache)
    ref_tokens, ref_logits = greedy_full(model, inp, 6)
    assert tokens == ref_tokens
    torch.testing.assert_close(torch.cat(logits), torch.cat(ref_logits), **FP32)
    assert cache.get_seq_length() == inp["input_ids"].shape[1] + 5
    view = CacheView(cache)  # k_rope in the key slot, the one-head latent in the value slot
    spec, geo = conversion.spec_of(model), Geometry.of(model.config)
    assert view.keys(0).shape[1:] == (geo.kv_heads, cache.get_seq_length(), spec.rope_dims)
    assert view.values(0).shape[1:] == (1, cache.get_seq_length(), spec.rank * geo.kv_heads)


def test_full_rank_gradients_equal_the_mha_reference_and_loss_falls(base, geo):
    """All-RoPE full rank is the original function: every shared parameter's gradient must match MHA's."""
    from portvlm.suites.training import batch

    data = batch("llava", torch.float32)
    ref = _clone(base).train()
    mla = convert(_clone(base, "sdpa"), checks.oracle_specs(geo)["all_rope"]).train()
    for m in (ref, mla):
        m(**data, use_cache=False).loss.backward()
    shared = {n: p.grad for n, p in ref.named_parameters() if "self_attn" not in n and p.grad is not None}
    got = {n: p.grad for n, p in mla.named_parameters() if n in shared}
    assert set(got) == set(shared)
    for n, g in shared.items():
        torch.testing.assert_close(got[n], g, atol=1e-4, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")
    q = {n: p.grad for n, p in mla.named_parameters() if "q_proj" in n}
    torch.testing.assert_close(q, {n: p.grad for n, p in ref.named_parameters() if "q_proj" in n}, atol=1e-4, rtol=1e-3)

    model = tiny.build("llava_mla").train()  # reduced rank: the latent projections train
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss = model(**data, use_cache=False).loss
        loss.backward()
        assert model.get_submodule(_first_attn(model)).kv_down.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _first_attn(model):
    return next(n for n, m in model.named_modules() if type(m).__name__ == "MLAAttention")


# ---------------------------------------------------------------------------------------------------------------
# The latent cache on this version's layout: get_seq_length, crop, eviction
# ---------------------------------------------------------------------------------------------------------------


def _filled(cache_cls, n=10, layers=2, **kw):
    cache = cache_cls(**kw)
    for i in range(layers):
        cache.update(torch.randn(1, 2, n, 4), torch.randn(1, 1, n, 16), i, {})
    return cache


def test_latent_cache_seq_length_crop_and_bytes():
    from portvlm.mla.cache import LatentCache, stored_bytes

    cache = _filled(LatentCache)
    view = CacheView(cache)
    assert cache.get_seq_length() == view.seq_length(0) == 10
    k, c = cache.k_rope(1).clone(), cache.latent(1).clone()
    view.crop(7)  # the view's crop is right on crop(max_length) and 5.15+'s crop(tokens_to_remove)
    assert cache.get_seq_length() == 7
    assert torch.equal(cache.k_rope(1), k[..., :7, :]) and torch.equal(cache.latent(1), c[..., :7, :])
    assert stored_bytes(cache) == 2 * 7 * (2 * 4 + 16) * 4
    view.evict(2, 5)  # what a streaming cache drops: both slots, every layer
    assert cache.get_seq_length() == 4
    assert torch.equal(cache.k_rope(1), k[..., [0, 1, 5, 6], :]) and torch.equal(cache.latent(1), c[..., [0, 1, 5, 6], :])


def test_latent_sink_window_evicts_k_rope_and_latent_together():
    from portvlm.mla.cache import LatentSinkWindowCache

    cache = LatentSinkWindowCache(sink=2, window=5)
    ks, cs = [], []
    for _ in range(4):
        k, c = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 16)
        ks.append(k)
        cs.append(c)
        cache.update(k, c, 0, {})
    k_all, c_all = torch.cat(ks, -2), torch.cat(cs, -2)
    assert cache.get_seq_length() == 7 and cache.tokens_seen == 12
    keep = list(range(2)) + list(range(7, 12))
    assert torch.equal(cache.k_rope(0), k_all[..., keep, :])
    assert torch.equal(cache.latent(0), c_all[..., keep, :])


@pytest.mark.parametrize("cls_name", ["LatentCache", "LatentSinkWindowCache"])
def test_latent_caches_take_every_update_convention(cls_name):
    """The latent caches accept update(k, v, i, cache_kwargs) (<=5.3) and, where Cache.update takes **kwargs
    (5.x), 5.24's update(k, v, i, kwargs=kwargs); both store the same k_rope and latent."""
    from portvlm.mla import cache as mla_cache
    from portvlm.shims import kv_cache

    cls = getattr(mla_cache, cls_name)
    k, c = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 16)
    calls = [((0, {}), {})] + ([] if kv_cache.takes_cache_kwargs(cls()) else [((0,), {"kwargs": {"position_ids": None}})])
    for args, kwargs in calls:
        cache = cls()
        cache.update(k, c, *args, **kwargs)
        assert torch.equal(cache.k_rope(0), k) and torch.equal(cache.latent(0), c), (args, kwargs)
        got = kv_cache.update_cache(cache, k, c, 0, {}, {"position_ids": None})
        assert got[0].shape[-2] == 6 and cache.get_seq_length() == 6


def test_latent_cache_rejects_the_3d_vlm_mla_latent():
    from portvlm.mla.cache import LatentCache

    with pytest.raises(ValueError, match=r"c_kv\[:, None\]"):
        LatentCache().update(torch.randn(1, 2, 3, 4), torch.randn(1, 3, 16), 0, {})


# ---------------------------------------------------------------------------------------------------------------
# Streaming: a latent cache that loses k_rope on eviction must fail
# ---------------------------------------------------------------------------------------------------------------


def test_cache_dropping_k_rope_on_eviction_fails_streaming():
    from portvlm.mla.cache import LatentSinkWindowCache
    from portvlm.suites import streaming

    class DropsKRope(LatentSinkWindowCache):
        """Evicts like the latent holds everything (it does not: k_rope is decoupled) and zeroes k_rope."""

        def evict_layer(self, layer_idx):
            view = self.view
            before = view.seq_length(layer_idx)
            super().evict_layer(layer_idx)
            if view.seq_length(layer_idx) < before:
                view.set(layer_idx, torch.zeros_like(view.keys(layer_idx)), view.values(layer_idx))

    ctx = SuiteContext(model_id="llava_mla", arch_id="cpu")
    model = tiny.build("llava_mla", attn_implementation="sdpa")
    good, good_problems = streaming._run_stream(ctx, model, torch.float32, 4, 24, 3)
    bad, bad_problems = streaming._run_stream(ctx, model, torch.float32, 4, 24, 3, cache_cls=DropsKRope)
    assert good.cache.get_seq_length() == bad.cache.get_seq_length() == 28  # both bounded to sink + window
    assert not good_problems
    assert any("attention-sink keys changed" in p for p in bad_problems), bad_problems


# ---------------------------------------------------------------------------------------------------------------
# The attention path, spec errors, figures
# ---------------------------------------------------------------------------------------------------------------


def test_patched_mla_reaches_portvlm_attention():
    import portvlm

    model = tiny.build("llava_mla", attn_implementation="sdpa")
    inp = model_inputs.build("llava_mla", "text")
    with portvlm.patch(model, arch="cpu"):
        _logits(model, inp)
    paths = {m.last_attention for m in model.modules() if type(m).__name__ == "MLAAttention"}
    assert paths and all(p.startswith("portvlm.shims.") for p in paths), paths
    _logits(model, inp)  # reverted: back to the function the config names (sdpa)
    assert all(m.last_attention.startswith("transformers.") for m in model.modules() if type(m).__name__ == "MLAAttention")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (MLASpec(rank=8, rope_dims=3), "rope_dims must be even"),
        (MLASpec(rank=99, rope_dims=4), r"rank must be in \[1, 28\]"),
        (MLASpec(rank=8, rope_dims=6, selection="uniform"), "uniform selection needs"),
        (MLASpec(rank=8, rope_dims=4, selection="high"), "selection 'high'"),
    ],
)
def test_bad_spec_names_the_problem(base, spec, match):
    with pytest.raises(ValueError, match=match):
        convert(_clone(base), spec)


def test_kv_bytes_per_token_llava_1_5_7b():
    geo = Geometry(layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128)
    figures = conversion.kv_figures(geo, MLASpec(rank=32, rope_dims=32), element_size=2)
    assert figures["mha"] == 524_288  # 2 · 32 layers · 32 heads · 128 · 2 B
    assert figures["mla"] == 131_072  # 32 layers · (32 · 32 k_rope + 32 · 32 latent) · 2 B
    assert tiny.family_figures("llava_mla", "float32")["kv_bytes_per_token"]["mla"] == 192


def test_return_arity_is_probed_from_the_backbone_module():
    """<4.48 Llama (LLAMA_ATTENTION_CLASSES, no registry) unpacks 3 values from self_attn; 4.48+ two."""
    import types

    old = types.SimpleNamespace(LLAMA_ATTENTION_CLASSES={}, QWEN2_5_VL_VISION_ATTENTION_CLASSES={})
    new = types.SimpleNamespace(ALL_ATTENTION_FUNCTIONS={}, eager_attention_forward=None)
    assert conversion.returns_cache(old) is True
    assert conversion.returns_cache(new) is False
    assert conversion.returns_cache(types.SimpleNamespace(X_ATTENTION_CLASSES={}, ALL_ATTENTION_FUNCTIONS={})) is False
