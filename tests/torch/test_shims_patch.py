"""portvlm.patch: revert leaves no trace, fails loudly, records the dtype policy and every reason."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _tiny  # noqa: E402

import portvlm  # noqa: E402
from portvlm.errors import UnsupportedError  # noqa: E402
from portvlm.shims import attention, dispatch, versions  # noqa: E402
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


def _classes_near(model) -> set[type]:
    """Every class portvlm could touch for ``model``: its modules' MROs and every class of their modeling modules
    (the <=4.52 per-backend tables hold classes the model never instantiates)."""
    import inspect
    import sys

    classes = {c for m in model.modules() for c in type(m).__mro__ if c is not object}
    for module_name in {c.__module__ for c in classes}:
        module = sys.modules.get(module_name)
        classes |= {v for v in vars(module).values() if inspect.isclass(v) and v.__module__ == module_name}
    return classes


def _snapshot(model):
    classes = _classes_near(model)
    return {
        "classes": {c: dict(vars(c)) for c in classes},
        "configs": {id(c): dict(vars(c)) for c in attention.configs_of(model)},
        "registries": _registries(),
        "modules": {id(m): dict(vars(m)) for m in model.modules()},
    }


def _assert_restored(before, model, what="not restored"):
    """Every class, config and registry ``_snapshot`` saw is as it was in ``before``."""
    after = _snapshot(model)
    for cls, attrs in before["classes"].items():
        assert vars(cls) == attrs, f"{cls.__qualname__} {what}"
    assert after["configs"] == before["configs"]
    assert after["registries"] == before["registries"]
    return after


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
    # every class the patch touched was snapshotted, so the comparison below can fail for each of them
    assert touched_classes <= set(before["classes"]), touched_classes - set(before["classes"])
    with torch.no_grad():
        model(**_tiny.inputs(family))
    handle.revert()
    after = _assert_restored(before, model)
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


def _cpu_host():
    from portvlm.platform import detect

    return detect().device == "cpu"


@pytest.mark.skipif(not _cpu_host(), reason="asserts what the sm70 policy selects when emulated on a CPU host")
def test_report_lists_applied_and_not_applied_with_reasons():
    model = _tiny.build("qwen2_5_vl", "sdpa")
    with portvlm.patch(model, arch="sm70") as handle:
        report = handle.report
    assert report.dtype == "float16" and handle.dtype == torch.float16
    assert "no bf16" in report.dtype_why
    # CPU host only: the sm70 policy is emulated, its mem-efficient favourite needs CUDA, so masked SDPA wins
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
    with pytest.raises(UnsupportedError, match=r"<=5\.25\.x.*pip install 'transformers==5\.25\.0'"):
        versions.check_transformers(versions.parse("5.30.0"))
    with pytest.raises(UnsupportedError, match=r"5\.26\.0 is outside"):  # the first release past the verified range
        versions.check_transformers(versions.parse("5.26.0"))
    assert versions.check_transformers(versions.parse("5.25.9")).verified
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
    with portvlm.patch(None, arch="cpu") as a, portvlm.patch(None, arch="cpu") as b:
        assert a.attn_name != b.attn_name and all(n.startswith(name + "_") for n in (a.attn_name, b.attn_name))
        assert not any(c in a.attn_name for c in ("flash", "/", ":"))


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
    _assert_restored(before, model)
    assert inspect.signature(model.forward) == signature
    assert attention._PACKED.get() is None


# --------------------------------------------------------------------------------------------------------------
# Many models in one process: patches belong to their model
# --------------------------------------------------------------------------------------------------------------


def _warm(family="qwen2_5_vl", seed=0):
    model = _tiny.build(family, "sdpa", seed=seed)
    with torch.no_grad():
        model(**_tiny.inputs(family))  # transformers' own lazy hooks first (5.x output capturing), then snapshots
    return model


def _logits(model, family="qwen2_5_vl"):
    with torch.no_grad():
        return model(**_tiny.inputs(family)).logits


def _runs_portvlm(model, handle, family="qwen2_5_vl") -> bool:
    """Whether a forward of ``model`` ran ``handle``'s vision and text code (its own state's counters moved)."""
    before = dict(handle.state.calls)
    _logits(model, family)
    return handle.state.calls["vision"] > before["vision"]


def test_policy_and_reference_pair_of_one_class_each_run_their_own_policy():
    """RL: a policy model trains under sm70 while a reference model of the same class generates under gfx942."""
    family = "qwen2_5_vl"
    policy, ref = _warm(family), _warm(family, seed=1)
    inputs = _tiny.inputs(family)
    with torch.no_grad():
        expected = ref.generate(**inputs, max_new_tokens=4, do_sample=False)
    with portvlm.patch(policy, arch="sm70") as h_policy, portvlm.patch(ref, arch="gfx942") as h_ref:
        assert (h_policy.report.arch, h_policy.report.dtype) == ("sm70", "float16")
        assert (h_ref.report.arch, h_ref.report.dtype) == ("gfx942", "bfloat16")
        assert h_policy.attn_name != h_ref.attn_name
        h_ref.state.vision_backend = "eager"  # make the two policies' kernels differ on this host as on GPUs
        policy.train()
        opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
        ref_calls = dict(h_ref.state.calls)
        logits = policy(**inputs).logits  # loss by hand: 4.52-4.56 read vocab_size off the top-level config
        ids = inputs["input_ids"]
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert h_policy.state.calls["vision"] > 0 and h_ref.state.calls == ref_calls  # the step ran policy's only
        policy_calls = dict(h_policy.state.calls)
        with torch.no_grad():
            got = ref.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert h_ref.state.calls["vision"] > 0 and h_policy.state.calls == policy_calls
        assert torch.equal(got, expected)  # the reference's own policy, the same tokens as unpatched
        assert f"{h_policy.attn_name}" in repr(h_policy) and str(h_ref.report)


@pytest.mark.parametrize("order", ["first_first", "last_first"])
def test_revert_in_any_order_leaves_the_other_patch_working_and_the_last_leaves_no_trace(order):
    family = "qwen2_5_vl"
    m1, m2 = _warm(family), _warm(family, seed=1)
    before = {id(m): _snapshot(m) for m in (m1, m2)}
    expected = {id(m): _logits(m) for m in (m1, m2)}
    h1 = portvlm.patch(m1, arch="sm70")
    h2 = portvlm.patch(m2, arch="gfx942")
    first, second = (h1, h2) if order == "first_first" else (h2, h1)
    still = m2 if first is h1 else m1
    gone = m1 if first is h1 else m2
    first.revert()
    assert _runs_portvlm(still, second), "the live patch stopped running after the other was reverted"
    assert not _runs_portvlm(gone, first)
    for m in (m1, m2):  # the reverted model runs upstream, the live one portvlm: both still match fp32 sdpa
        torch.testing.assert_close(_logits(m), expected[id(m)], atol=1e-5, rtol=1e-4)
    second.revert()
    for m in (m1, m2):
        _assert_restored(before[id(m)], m, f"not restored ({order})")
    fresh = _tiny.build(family, "sdpa")
    assert not any(m in dispatch.OWNERS for m in fresh.modules()) and not dispatch.HOOKS


def test_interleaved_patches_and_reverts():
    """patch a, patch b, revert a, patch c, revert b, patch a again, revert c, revert a: each live one keeps working."""
    family = "qwen2_5_vl"
    a, b, c = _warm(family), _warm(family, seed=1), _warm(family, seed=2)
    before = _snapshot(a)
    ha = portvlm.patch(a, arch="sm70")
    hb = portvlm.patch(b, arch="gfx942")
    ha.revert()
    hc = portvlm.patch(c, arch="cpu")
    assert _runs_portvlm(b, hb) and _runs_portvlm(c, hc)
    hb.revert()
    ha2 = portvlm.patch(a, arch="gfx942")
    assert _runs_portvlm(c, hc) and _runs_portvlm(a, ha2) and not _runs_portvlm(b, hb)
    hc.revert()
    assert _runs_portvlm(a, ha2)
    ha2.revert()
    _assert_restored(before, a)


def test_patching_a_patched_model_is_an_error_and_changes_nothing():
    model = _warm()
    with portvlm.patch(model, arch="sm70") as handle:
        touched = handle.touched
        with pytest.raises(UnsupportedError, match="already patched.*revert"):
            portvlm.patch(model, arch="gfx942")
        from portvlm.shims import layer_paths

        with pytest.raises(UnsupportedError, match="already patched"):  # a part of it (its vision tower) as well
            portvlm.patch(layer_paths.resolve(model).vision_tower, arch="sm70")
        assert handle.touched == touched and _runs_portvlm(model, handle)
    with portvlm.patch(model, arch="gfx942") as again:  # after revert, patching again is fine
        assert _runs_portvlm(model, again)


def users_own_vision_forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kw):
    """A user's port of the vision attention (here: it simply fails if it ever runs under portvlm)."""
    raise AssertionError("the user's forward ran although portvlm owns this model")


def _vision_cls(model):
    return type(model.get_submodule(_tiny_first_vision_attn(model)))


@pytest.fixture
def user_ported():
    """A warm model whose vision attention class carries a user's own forward; upstream's is put back afterwards."""
    model = _warm()
    cls = _vision_cls(model)
    upstream = vars(cls)["forward"]
    cls.forward = users_own_vision_forward
    try:
        yield model, cls
    finally:
        cls.forward = upstream


def test_user_replaced_forward_is_named_warned_and_put_back(user_ported):
    model, cls = user_ported
    before = _snapshot(model)
    with pytest.warns(UserWarning, match="not transformers' own.*test_shims_patch"):
        handle = portvlm.patch(model, arch="cpu")
    replaced = {r.target: r.origin for r in handle.report.replaced}
    target = f"{cls.__module__}.{cls.__qualname__}.forward"
    assert target in replaced and "test_shims_patch.users_own_vision_forward" in replaced[target]
    assert "replaced (not transformers' own)" in str(handle.report)
    assert _runs_portvlm(model, handle)  # portvlm runs for this model, the user's forward does not
    other = _tiny.build("qwen2_5_vl", "sdpa", seed=1)  # another model of the class, unpatched: the user's forward
    with pytest.raises(AssertionError, match="user's forward ran"):
        _logits(other)
    handle.revert()
    assert vars(cls)["forward"] is users_own_vision_forward  # exactly what was there
    _assert_restored(before, model)


def test_user_replaced_forward_refused_on_request_leaves_nothing(user_ported):
    model, _ = user_ported
    before = _snapshot(model)
    with pytest.raises(UnsupportedError, match="test_shims_patch.users_own_vision_forward.*refuse"):
        portvlm.patch(model, arch="cpu", foreign="refuse")
    _assert_restored(before, model, "changed by a refused patch")
    with pytest.warns(UserWarning, match="not transformers' own"), portvlm.patch(model, arch="cpu") as handle:
        assert handle.report.replaced  # nothing of the refused patch is left to get in the way


def test_unknown_foreign_policy_is_refused():
    with pytest.raises(ValueError, match="foreign="):
        portvlm.patch(None, foreign="ignore")


def test_instance_forward_override_is_foreign_too():
    model = _warm()
    attn = model.get_submodule(_tiny_first_vision_attn(model))
    attn.forward = users_own_vision_forward.__get__(attn)
    own = vars(attn)["forward"]
    with pytest.warns(UserWarning, match="instance attribute"):
        handle = portvlm.patch(model, arch="cpu")
    assert _runs_portvlm(model, handle)
    handle.revert()
    assert vars(attn)["forward"] is own


def test_patch_reads_no_matrix_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "matrix.yaml").write_text("archs: [this is not a matrix\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORTVLM_MATRIX", str(tmp_path / "matrix.yaml"))
    with portvlm.patch(None, arch="sm70") as handle:  # the packaged matrix, not ./matrix.yaml nor $PORTVLM_MATRIX
        assert handle.report.dtype == "float16"
    from portvlm.errors import MatrixError

    with pytest.raises(MatrixError):  # a matrix passed explicitly is read, and its errors are not hidden
        portvlm.patch(None, arch="sm70", matrix=tmp_path / "matrix.yaml")


def test_patch_of_a_model_ignores_a_broken_portvlm_matrix_and_honours_its_own_matrix(tmp_path, monkeypatch):
    """The family minimums come from the matrix patch is handed, else the packaged one: never $PORTVLM_MATRIX."""
    import dataclasses

    from portvlm.policy import packaged_matrix

    (tmp_path / "broken.yaml").write_text("archs: [this is not a matrix\n")
    monkeypatch.setenv("PORTVLM_MATRIX", str(tmp_path / "broken.yaml"))
    model = _tiny.build("llava")
    with portvlm.patch(model, arch="cpu") as handle:
        assert handle.report.family == "llava" and "layer_paths" in handle.report.shim_names()
    m = packaged_matrix()
    newer = dataclasses.replace(m, models=tuple(dataclasses.replace(x, min_transformers="99.0") if x.family == "llava"
                                                else x for x in m.models))
    with pytest.raises(UnsupportedError, match="llava needs transformers >=99.0"):
        portvlm.patch(model, arch="cpu", matrix=newer)


@pytest.mark.parametrize("arch", ["cpu", "sm70"])  # sm70: the fp16 guard's hooks and its record of the last call
def test_a_reverted_model_is_freed_while_its_handle_lives(arch):
    """A patched-then-reverted model must be collectable: the handle registry is weak-keyed by the model, and a
    handle that refers to its model (the fp16 guard did) kept the entry, the model and every weight alive for the
    life of the process: a benchmark that closed a model after each out-of-memory probe grew by a model each time."""
    import gc
    import weakref

    from portvlm.models import inputs as model_inputs
    from portvlm.models import tiny

    model = tiny.build("qwen2_5vl")
    batch = model_inputs.build("qwen2_5vl", "text", torch.float32)
    with portvlm.patch(model, arch=arch) as handle:
        model(**batch, use_cache=False)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]
    assert handle.reverted  # the handle (its report) is still the caller's to read
