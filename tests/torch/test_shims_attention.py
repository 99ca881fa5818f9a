"""vision_varlen / text shims: packed == alone, logits == fp32 eager, one call per layer, <=1 sync, packed text
rows (4.53+ registry; <=4.52 registry without masks, or per-backend classes), and flash-attn never reached — for
the cpu, sm70 and gfx942 policies (emulated on this CPU)."""

from __future__ import annotations

import sys
import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _tiny  # noqa: E402

import portvlm  # noqa: E402
from portvlm.backends import kernels  # noqa: E402
from portvlm.distributed import enable_activation_checkpointing  # noqa: E402
from portvlm.shims import layer_paths, versions  # noqa: E402

ARCHS = ("cpu", "sm70", "gfx942")
# fp32 on CPU whatever the policy dtype (casting is the caller's choice): the fp32 row of the tolerance table.
ATOL, RTOL = 1e-5, 1e-4
ERRORS: dict = {}  # (test, family, arch) -> max abs error; printed by the last test for the report


def _skip_unavailable(family):
    why = _tiny.available(family)
    if why:
        pytest.skip(why[0])


@pytest.fixture(scope="module")
def models():
    built = {}
    for family in _tiny.FAMILIES:
        if not _tiny.available(family):
            built[family] = (_tiny.build(family, "eager"), _tiny.build(family, "sdpa"))
    return built


def _features(family, model, pv, grid):
    tower = layer_paths.resolve(model).vision_tower
    with torch.no_grad():
        return _tiny.vision_features(family, tower, pv, grid)


def _each(family, pv, grid, grids):
    """The packed pixels cut back into one ``(pixels, grid)`` per image/video."""
    if family == "llava":
        return [(pv[i : i + 1], None) for i in range(len(grids))]
    rows = [t * h * w for t, h, w in grids]
    return [(p, grid[i : i + 1]) for i, p in enumerate(torch.split(pv, rows))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", _tiny.FAMILIES)
def test_vision_packed_equals_alone_and_eager(models, family, arch):
    _skip_unavailable(family)
    ref, model = models[family]
    grids = _tiny.GRIDS
    pv, grid = _tiny.pixels(family, grids)
    with portvlm.patch(model, arch=arch):
        packed = torch.split(_features(family, model, pv, grid), _tiny.vision_tokens(family, grids))
        alone = [_features(family, model, p, g) for p, g in _each(family, pv, grid, grids)]
    oracle = [_features(family, ref, p, g) for p, g in _each(family, pv, grid, grids)]  # fp32 eager, one at a time
    err = 0.0
    for p, a, o in zip(packed, alone, oracle, strict=True):
        torch.testing.assert_close(p, a, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(p, o, atol=ATOL, rtol=RTOL)
        err = max(err, (p - a).abs().max().item(), (p - o).abs().max().item())
    ERRORS[("vision", family, arch)] = err


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", _tiny.FAMILIES)
def test_logits_match_fp32_eager(models, family, arch):
    _skip_unavailable(family)
    ref, model = models[family]
    inputs = _tiny.inputs(family)
    with torch.no_grad():
        want = ref(**inputs).logits
        with portvlm.patch(model, arch=arch) as handle:
            got = model(**inputs).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    ERRORS[("logits", family, arch)] = (got - want).abs().max().item()
    assert handle.report.arch == arch


@pytest.mark.parametrize("family", ("qwen2_5_vl", "qwen3_vl"))
def test_vision_one_call_per_layer_and_at_most_one_host_sync(models, family):
    _skip_unavailable(family)
    _, model = models[family]
    blocks = len(layer_paths.resolve(model).vision_blocks)
    with portvlm.patch(model, arch="sm70") as handle:
        kernels.reset_sync_count()
        _features(family, model, *_tiny.pixels(family, _tiny.GRIDS))
        syncs = kernels.sync_count()
    assert handle.state.calls["vision"] == blocks, "one varlen call per vision layer, no loop over segments"
    assert syncs <= 1, f"{syncs} host syncs in one vision forward (want <= 1)"


def test_report_says_why_llava_vision_is_not_varlen(models):
    _, model = models["llava"]
    with portvlm.patch(model, arch="cpu") as handle:
        pass
    skipped = {n.shim: n.reasons for n in handle.report.not_applied}
    assert "vision_varlen" in skipped and "no packed varlen attention" in skipped["vision_varlen"][0]


TEXT_SHIMS = ("text_registry", "text_registry_legacy", "text_classes")  # 4.53+; <=4.52 registry; <=4.52 classes
PACKED_LENGTHS = (5, 7)


def _packed_rows(family):
    """Two text samples in one row, lmms-engine rmpad style: ids, per-sample reset positions, cu_seq_lens, and the
    separate rows with their own positions (3-D mrope ids for Qwen, as the model builds them for text)."""
    rows = [torch.arange(10, 10 + n)[None] for n in PACKED_LENGTHS]

    def pos(n):
        p = torch.arange(n)[None]
        return p[None].expand(3, 1, n) if family != "llava" else p

    cu = torch.tensor([0, *torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    # An all-ones mask, as the training suite sends: 4.53's packed-sequence detection (attention_mask=None) expands
    # 3-D mrope position ids and crashes; the segments travel as cu_seq_lens.
    ids = torch.cat(rows, dim=1)
    packed = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  position_ids=torch.cat([pos(n) for n in PACKED_LENGTHS], -1),
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(PACKED_LENGTHS), max_length_k=max(PACKED_LENGTHS))
    alone = [dict(input_ids=r, attention_mask=torch.ones_like(r), position_ids=pos(r.shape[1])) for r in rows]
    return packed, alone


def _skip_without_text_shim(handle):
    if not handle.report.shim_names() & set(TEXT_SHIMS):
        pytest.skip("no text shim applied: " + "; ".join(
            f"{n.shim}: {'; '.join(n.reasons)}" for n in handle.report.not_applied if n.shim in TEXT_SHIMS))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", ("llava", "qwen2_5_vl"))
def test_packed_text_rows_equal_separate_rows(models, family, arch):
    """Two samples in one row (lmms-engine rmpad style: cu_seq_lens_q/k + per-sample position_ids), no flash.
    <=4.52: LLaVA through ALL_ATTENTION_FUNCTIONS (text_registry_legacy), Qwen2.5-VL through its classes."""
    _, model = models[family]
    packed_kwargs, rows = _packed_rows(family)
    with portvlm.patch(model, arch=arch) as handle:
        _skip_without_text_shim(handle)
        with torch.no_grad():
            packed = model(**packed_kwargs, use_cache=False).logits
            alone = [model(**r, use_cache=False).logits for r in rows]
        assert handle.state.calls["text_packed"] == len(layer_paths.resolve(model).text_layers), "one call per layer"
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=ATOL, rtol=RTOL)
    ERRORS[("packed_text", family, arch)] = (packed - torch.cat(alone, dim=1)).abs().max().item()


@pytest.mark.parametrize("reentrant", (False, True))
def test_packed_text_rows_survive_gradient_checkpointing(reentrant):
    """Recomputation in backward runs outside the forward's `packed_rows` context (<=4.52 classes): the gradients of
    a packed row must still equal the separate rows' — the packed declaration is kept for the forward's rotary tensor."""
    model = _tiny.build("qwen2_5_vl", "sdpa").train()
    packed_kwargs, rows = _packed_rows("qwen2_5_vl")
    weights = torch.randn(1, sum(PACKED_LENGTHS), model.config.get_text_config().vocab_size,
                          generator=torch.Generator().manual_seed(0))

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with portvlm.patch(model, arch="cpu") as handle:
        _skip_without_text_shim(handle)
        enable_activation_checkpointing(model, use_reentrant=reentrant)
        try:
            got = grads((model(**packed_kwargs, use_cache=False).logits * weights).sum())
            parts = torch.split(weights, list(PACKED_LENGTHS), dim=1)
            want = grads(sum((model(**r, use_cache=False).logits * w).sum() for r, w in zip(rows, parts, strict=True)))
        finally:  # 5.23 renamed it activation_checkpointing_disable (the old name warns)
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    assert got.keys() == want.keys() and got
    err = max((got[n] - want[n]).abs().max().item() for n in got)
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    ERRORS[("packed_text_ckpt_grads", "qwen2_5_vl", f"reentrant={reentrant}")] = err


def test_text_classes_leave_unpacked_calls_exactly_as_before(models):
    """<=4.52 Qwen2.5-VL: without a packed row the patched classes run transformers' own forward, bit for bit
    (text only — the vision shim changes the tower's kernel — with left padding, so the mask path runs too)."""
    _, model = models["qwen2_5_vl"]
    ids = torch.arange(10, 28).view(2, 9)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([0, 1]), 0) * 1)
    inputs["attention_mask"][0] = 1  # row 0 unpadded, row 1 left-padded by 2
    with torch.no_grad():
        before = model(**inputs).logits
        with portvlm.patch(model, arch="cpu") as handle:
            if "text_classes" not in handle.report.shim_names():
                pytest.skip("text_classes is for <=4.52: " + "; ".join(
                    r for n in handle.report.not_applied if n.shim == "text_classes" for r in n.reasons))
            got = model(**inputs).logits
            assert handle.state.calls["text_packed"] == 0
    assert torch.equal(got, before)


def test_old_versions_report_which_text_shim_applied_and_why_not_the_other(models):
    """<=4.52: LLaVA's llama backbone goes through the registry, Qwen2.5-VL through its classes; each says why not
    the other. 4.53+: text_registry for both, the two older shims out of their range."""
    names = {}
    for family in ("llava", "qwen2_5_vl"):
        with portvlm.patch(models[family][1], arch="cpu") as handle:
            names[family] = (handle.report.shim_names(), {n.shim: n.reasons for n in handle.report.not_applied})
    if versions.in_range(">=4.53.0"):
        for applied, skipped in names.values():
            assert "text_registry" in applied and {"text_registry_legacy", "text_classes"} <= skipped.keys()
        return
    (llava, llava_not), (qwen, qwen_not) = names["llava"], names["qwen2_5_vl"]
    assert "text_registry_legacy" in llava and "text_classes" in llava_not
    assert "text_classes" in qwen and "QWEN2_5_VL_ATTENTION_CLASSES" in qwen_not["text_registry_legacy"][0]


def _raise(*args, **kwargs):
    raise AssertionError("flash-attn was reached although the selected backend is not flash")


@pytest.fixture
def raising_flash_attn(monkeypatch):
    """A flash_attn that raises, in sys.modules and wherever transformers holds a flash entry point."""
    fake = types.ModuleType("flash_attn")
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"):
        setattr(fake, name, _raise)
    fake.__version__ = "2.8.3"
    for mod in ("flash_attn", "flash_attn.flash_attn_interface", "flash_attn_interface"):
        monkeypatch.setitem(sys.modules, mod, fake)
    names = ("flash_attn_func", "flash_attn_varlen_func", "_flash_attention_forward", "flash_attention_forward",
             "apply_rotary_pos_emb_flashatt")
    for modname, mod in list(sys.modules.items()):
        if modname.startswith("transformers") and mod is not None:
            for name in names:
                if name in getattr(mod, "__dict__", {}):
                    monkeypatch.setattr(mod, name, _raise)
    for key in ("flash_attention_2", "flash_attention_3"):
        for registry in ("AttentionInterface",):
            interface = getattr(transformers, registry, None)
            if interface is not None and key in getattr(interface, "_global_mapping", {}):
                monkeypatch.setitem(interface._global_mapping, key, _raise)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", _tiny.FAMILIES)
def test_flash_attn_never_reached(models, family, arch, raising_flash_attn):
    _skip_unavailable(family)
    _, model = models[family]
    with portvlm.patch(model, arch=arch) as handle, torch.no_grad():
        model(**_tiny.inputs(family))
    assert "flash" not in handle.report.vision_backend.name and "flash" not in handle.report.text_backend.name


def test_zz_print_errors():
    """Not a check: prints the max errors this run saw (collected by the tests above) for the report."""
    for key, err in sorted(ERRORS.items()):
        print("max-error", transformers.__version__, *key, f"{err:.3e}")
