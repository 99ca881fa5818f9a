"""portvlm.patch: revert leaves no trace, fails loudly, records the dtype policy and every reason."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _tiny  # noqa: E402

import portvlm  # noqa: E402
from portvlm.errors import UnsupportedError  # noqa: E402
from portvlm.shims import attention, versions  # noqa: E402
from portvlm.shims.patch import Patcher  # noqa: E402


def _registries():
    """Every registry dict portvlm could touch, copied."""
    out = {}
    for name in ("AttentionInterface", "AttentionMaskInterface"):
        interface = getattr(transformers, name, None)
        if interface is not None:
            out[name] = dict(interface._global_mapping)
    from transformers import modeling_utils

    funcs = modeling_utils.ALL_ATTENTION_FUNCTIONS
    out["ALL_ATTENTION_FUNCTIONS"] = dict(getattr(funcs, "_global_mapping", funcs))
    out["ALL_ATTENTION_FUNCTIONS.local"] = dict(getattr(funcs, "_local_mapping", {}))
    return out


def _snapshot(model):
    classes = {c for m in model.modules() for c in type(m).__mro__ if c is not object}
    return {
        "classes": {c: dict(vars(c)) for c in classes},
        "configs": {id(c): dict(vars(c)) for c in attention.configs_of(model)},
        "registries": _registries(),
        "modules": {id(m): dict(vars(m)) for m in model.modules()},
    }


@pytest.mark.parametrize("arch", ("cpu", "sm70", "gfx942"))
@pytest.mark.parametrize("family", _tiny.FAMILIES)
def test_revert_leaves_no_trace(family, arch):
    if _tiny.available(family):
        pytest.skip(_tiny.available(family)[0])
    model = _tiny.build(family, "sdpa")
    with torch.no_grad():
        model(**_tiny.inputs(family))  # a first forward installs transformers' own lazy hooks (5.x output capturing)
    before = _snapshot(model)
    handle = portvlm.patch(model, arch=arch)
    if not handle.touched:  # nothing to change (LLaVA <=4.52): never silent — the report must say why
        skipped = {n.shim for n in handle.report.not_applied}
        assert {"vision_varlen", "text_registry"} <= skipped, handle.report
    touched_classes = {obj for obj, _ in handle.touched if isinstance(obj, type)}
    with torch.no_grad():
        model(**_tiny.inputs(family))
    handle.revert()
    after = _snapshot(model)
    for cls in touched_classes | set(before["classes"]):
        assert vars(cls) == before["classes"].get(cls, vars(cls)), f"{cls.__qualname__} not restored"
    assert after["configs"] == before["configs"]
    assert after["registries"] == before["registries"]
    assert after["modules"].keys() == before["modules"].keys()
    for key, attrs in before["modules"].items():
        assert after["modules"][key].keys() == attrs.keys()
    handle.revert()  # idempotent


def test_context_manager_reverts_on_error():
    model = _tiny.build("qwen2_5_vl", "sdpa")
    before = _registries()
    attn_cls = type(model.get_submodule(_tiny_first_vision_attn(model)))
    forward = vars(attn_cls)["forward"]
    with pytest.raises(RuntimeError, match="boom"), portvlm.patch(model, arch="cpu"):
        assert vars(attn_cls)["forward"] is not forward
        raise RuntimeError("boom")
    assert vars(attn_cls)["forward"] is forward
    assert _registries() == before


def _tiny_first_vision_attn(model):
    from portvlm.shims import layer_paths

    path = layer_paths.resolve(model).paths["vision_blocks"]
    return f"{path}.0.attn"


def test_patcher_restores_absent_and_present_entries_in_reverse():
    class C:
        a = 1

    mapping = {"x": 1}
    p = Patcher()
    p.set_attr(C, "a", 2)
    p.set_attr(C, "b", 3)
    p.set_attr(C, "a", 4)
    p.set_item(mapping, "x", 2)
    p.set_item(mapping, "y", 3)
    p.restore()
    assert C.a == 1 and not hasattr(C, "b") and mapping == {"x": 1}


def test_report_lists_applied_and_not_applied_with_reasons():
    model = _tiny.build("qwen2_5_vl", "sdpa")
    with portvlm.patch(model, arch="sm70") as handle:
        report = handle.report
    assert report.dtype == "float16" and handle.dtype == torch.float16
    assert "no bf16" in report.dtype_why
    assert report.emulation and "sm70" in report.emulation and "cpu" in report.emulation
    assert report.vision_backend.name == "sdpa_masked"
    assert "efficient_varlen" in report.vision_backend.lost  # why the sm70 favourite lost on this CPU
    assert "vision_varlen" in report.shim_names() and "layer_paths" in report.shim_names()
    for item in report.not_applied:
        assert item.reasons and all(isinstance(r, str) and r for r in item.reasons)
    text = str(report)
    assert "applied:" in text and "not applied:" in text and "sdpa_masked" in text
    assert report.to_dict()["arch"] == "sm70"


@pytest.mark.parametrize("arch, dtype", [("cpu", "float32"), ("sm70", "float16"), ("gfx942", "bfloat16")])
def test_dtype_policy(arch, dtype):
    with portvlm.patch(None, arch=arch) as handle:
        assert handle.report.dtype == dtype


def test_bf16_on_sm70_is_refused_with_the_reason():
    with pytest.raises(UnsupportedError, match="capability >= 8.0"):
        portvlm.patch(None, arch="sm70", dtype="bfloat16")


def test_unknown_arch_names_the_known_ones():
    with pytest.raises(UnsupportedError, match="sm70"):
        portvlm.patch(None, arch="sm61")


def test_unverified_version_raises_naming_the_range(monkeypatch):
    monkeypatch.delenv(versions.ALLOW_UNVERIFIED_ENV, raising=False)
    with pytest.raises(UnsupportedError, match=r"4\.49\.0"):
        versions.check_transformers(versions.parse("4.40.0"))
    with pytest.raises(UnsupportedError, match=r"5\.23"):
        versions.check_transformers(versions.parse("5.30.0"))
    gate = versions.check_transformers(versions.parse("5.30.0"), environ={versions.ALLOW_UNVERIFIED_ENV: "1"})
    assert not gate.verified and "unverified" in gate.warning


def test_unverified_version_is_a_recorded_warning_when_allowed(monkeypatch):
    monkeypatch.setenv(versions.ALLOW_UNVERIFIED_ENV, "1")
    monkeypatch.setattr(versions, "VERIFIED_TRANSFORMERS", versions.SpecifierSet("<4.0"))
    with pytest.warns(UserWarning, match="unverified"):
        handle = portvlm.patch(None, arch="cpu")
    assert any("unverified" in w for w in handle.report.warnings)
    handle.revert()


def test_unsupported_model_raises_naming_supported_families():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedError, match="qwen2_5_vl.*llava"):
        portvlm.patch(model, arch="cpu")


def test_custom_attention_name_is_safe_for_transformers():
    name = attention.ATTN_NAME
    assert "flash" not in name and "/" not in name and ":" not in name


@pytest.mark.parametrize("family", ("qwen2_5_vl", "llava"))
def test_packed_rows_then_revert_leaves_no_trace(family):
    """A packed-row forward (<=4.52: text_classes / text_registry_legacy; 4.53+: text_registry), then revert: the
    classes, configs, registries, the model forward's signature and portvlm's packed-row context are as before."""
    import inspect

    model = _tiny.build(family, "sdpa")
    before = _snapshot(model)
    signature = inspect.signature(model.forward)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    pos = torch.cat([torch.arange(3), torch.arange(4)])[None]
    with portvlm.patch(model, arch="cpu") as handle, torch.no_grad():
        if "text_classes" in handle.report.shim_names():  # the model forward now takes the packed kwargs by name
            assert "cu_seq_lens_q" in inspect.signature(model.forward).parameters
        ids = torch.arange(10, 17)[None]  # all-ones mask: 4.53 infers packing from positions otherwise (and crashes)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
              max_length_q=4, max_length_k=4, use_cache=False)
        assert handle.state.calls["text_packed"] > 0
    after = _snapshot(model)
    for cls, attrs in before["classes"].items():
        assert vars(cls) == attrs, f"{cls.__qualname__} not restored"
    assert after["configs"] == before["configs"] and after["registries"] == before["registries"]
    assert inspect.signature(model.forward) == signature
    assert attention._PACKED.get() is None
