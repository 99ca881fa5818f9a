"""Drift guards: each shim's upstream anchors still exist on this transformers version. A failure names the shim,
the version and what changed, so CI turns red before users hit the break."""

from __future__ import annotations

import inspect
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _tiny  # noqa: E402

from portvlm.shims import attention, kv_cache, layer_paths, versions  # noqa: E402

V = transformers.__version__


def drift(shim: str, what: str) -> str:
    return f"shim {shim!r} on transformers {V}: upstream changed — {what}"


def _real_cache():
    model = _tiny.build("qwen2_5_vl", "sdpa")
    ids = torch.arange(2, 10)[None]
    pos = torch.arange(8)
    with torch.no_grad():
        return kv_cache.output_cache(model(input_ids=ids, use_cache=True, cache_position=pos,
                                           position_ids=pos.view(1, 1, -1).expand(3, 1, -1)))


def test_kv_cache_layout_is_known():
    cache = _real_cache()
    assert not kv_cache.layout_reasons(cache), drift("kv_cache", kv_cache.layout_reasons(cache)[0])
    view = kv_cache.CacheView(cache)
    k = view.keys(0)
    assert k is not None and k.dim() == 4 and k.shape[-2] == 8, drift(
        "kv_cache", f"layer keys are no longer [B, H_kv, S, D] with S at dim -2 (got {None if k is None else tuple(k.shape)})")


def test_kv_cache_negative_crop_removes_tokens():
    """The view crops with a negative count: 'remove N' for crop(max_length) (<=5.14) and crop(tokens_to_remove)."""
    cache = _real_cache()
    params = list(inspect.signature(type(cache).crop).parameters)
    cache.crop(-3)
    assert cache.get_seq_length() == 5, drift(
        "kv_cache", f"Cache.crop({params[1:]}) with a negative value no longer removes that many tokens")


def test_kv_cache_update_signature():
    params = list(inspect.signature(transformers.DynamicCache.update).parameters)
    assert params[:4] == ["self", "key_states", "value_states", "layer_idx"], drift(
        "kv_cache", f"DynamicCache.update parameters are {params} (SinkWindowCache overrides update(k, v, layer_idx, ...))")


@pytest.mark.parametrize("family", _tiny.FAMILIES)
def test_kv_cache_argument_is_known(family):
    """The forward takes its cache under a name the shim knows (5.24.0 renamed past_key_values -> cache)."""
    if _tiny.available(family):
        pytest.skip(_tiny.available(family)[0])
    reasons = kv_cache.cache_argument_reasons(_tiny.build(family))
    assert not reasons, drift("kv_cache", reasons[0])


@pytest.mark.parametrize("family", _tiny.FAMILIES)
def test_layer_paths_resolve_to_a_declared_candidate(family):
    if _tiny.available(family):
        pytest.skip(_tiny.available(family)[0])
    model = _tiny.build(family)
    try:
        lp = layer_paths.resolve(model)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(drift("layer_paths", f"{family}: {exc}"))
    assert lp.paths["text_layers"] in layer_paths.TEXT_LAYERS, drift("layer_paths", f"{family} text layers moved")


@pytest.mark.parametrize("family", ("qwen2_5_vl", "qwen3_vl"))
def test_vision_attention_anchors(family):
    if _tiny.available(family):
        pytest.skip(_tiny.available(family)[0])
    model = _tiny.build(family, "sdpa")
    lp = layer_paths.resolve(model)
    attn = getattr(lp.vision_blocks[0], "attn", None)
    assert attn is not None, drift("vision_varlen", f"{family} vision blocks have no `.attn`")
    reasons = attention.vision_module_reasons(attn)
    assert not reasons, drift("vision_varlen", "; ".join(reasons))
    # the rotary the shim borrows keeps its contract: (q, k, cos, sin) on [S, H, D] -> (q, k)
    rope = attention.rotary_of(type(attn))
    params = list(inspect.signature(rope).parameters)
    assert params[:4] == ["q", "k", "cos", "sin"], drift("vision_varlen", f"{attention.ROTARY_FN}{params}")
    q = torch.randn(5, 2, 16)
    out = rope(q, q, torch.ones(5, 16), torch.zeros(5, 16))
    assert torch.equal(out[0], q), drift("vision_varlen", f"{attention.ROTARY_FN} no longer rotates [S, H, D] as before")


def test_vision_window_bound_inputs_exist():
    """The no-sync max_seqlen bound of Qwen2.5-VL window layers reads window/patch/merge sizes and full blocks."""
    model = _tiny.build("qwen2_5_vl", "sdpa")
    tower = layer_paths.resolve(model).vision_tower
    assert attention.window_bound(tower) == 64, drift(
        "vision_varlen", "Qwen2.5-VL tower no longer exposes window_size/patch_size/spatial_merge_size")
    assert list(attention.full_block_indexes(tower)) == [1, 3], drift(  # models.qwen: blocks 1 and 3 full
        "vision_varlen", "Qwen2.5-VL tower no longer exposes fullatt_block_indexes")


def test_vision_dense_mask_anchor():
    """4.53.1-4.53.x build a dense vision mask through `_prepare_attention_mask(inputs_tensor, cu_seqlens)`."""
    model = _tiny.build("qwen2_5_vl", "sdpa")
    cls = type(layer_paths.resolve(model).vision_tower)
    method = getattr(cls, "_prepare_attention_mask", None)
    if versions.in_range(">=4.53.1,<4.54"):
        assert method is not None, drift("vision_dense_mask", f"{cls.__name__}._prepare_attention_mask is gone")
        params = list(inspect.signature(method).parameters)
        assert params == ["self", "inputs_tensor", "cu_seqlens"], drift("vision_dense_mask", f"signature {params}")
    elif method is not None:
        pytest.fail(drift("vision_dense_mask", f"{cls.__name__}._prepare_attention_mask exists outside 4.53.x; "
                          "check whether the shim should apply"))


def test_text_registry_anchors():
    reasons = attention.registry_reasons()
    if versions.in_range(">=4.53.0"):
        assert not reasons, drift("text_registry", "; ".join(reasons))
        mask_fn = transformers.AttentionMaskInterface._global_mapping["sdpa"]
        params = inspect.signature(mask_fn).parameters
        assert "batch_size" in params and "cache_position" in params or "q_length" in params, drift(
            "text_registry", f"the sdpa mask function's parameters changed: {list(params)}")
    else:
        assert reasons, drift("text_registry", "registries exist before 4.53; the shim could apply earlier")


def test_flash_in_a_name_still_means_flash_in_5x():
    """Why portvlm's name avoids "flash": 5.x routes any name containing it to the flash path."""
    generic = sys.modules.get("transformers.utils.generic")
    fn = getattr(generic, "is_flash_attention_requested", None)
    if fn is None:
        pytest.skip(f"transformers {V} has no is_flash_attention_requested (4.x compares == 'flash_attention_2')")
    try:
        routed = fn(requested_attention_implementation="my_flash_like")
        ours = fn(requested_attention_implementation=attention.ATTN_NAME)
    except TypeError as exc:
        pytest.fail(drift("text_registry", f"is_flash_attention_requested signature changed ({exc})"))
    assert routed, drift("text_registry", "'flash' in a name no longer selects the flash path (the rule may be relaxed)")
    assert not ours, drift("text_registry", f"{attention.ATTN_NAME!r} is treated as a flash implementation")
