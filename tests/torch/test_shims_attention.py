"""vision_varlen / text_registry shims: packed == alone, logits == fp32 eager, one call per layer, <=1 sync,
packed text rows, and flash-attn never reached — for the cpu, sm70 and gfx942 policies (emulated on this CPU)."""

from __future__ import annotations

import sys
import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _tiny  # noqa: E402

import portvlm  # noqa: E402
from portvlm.backends import kernels  # noqa: E402
from portvlm.shims import layer_paths  # noqa: E402

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


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_text_rows_equal_separate_rows(models, arch):
    """Two samples in one row (lmms-engine rmpad style: cu_seq_lens_q/k + per-sample position_ids), no flash."""
    _, model = models["llava"]
    lengths = (5, 7)
    rows = [torch.arange(10, 10 + n)[None] for n in lengths]
    with portvlm.patch(model, arch=arch) as handle:
        if "text_registry" not in handle.report.shim_names():
            pytest.skip("packed text rows need the registry path (transformers >= 4.53): " + "; ".join(
                r for n in handle.report.not_applied if n.shim == "text_registry" for r in n.reasons))
        cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        ids = torch.cat(rows, dim=1)
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                           max_length_q=7, max_length_k=7).logits
            alone = [model(input_ids=r).logits for r in rows]
        assert handle.state.calls["text_packed"] > 0
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=ATOL, rtol=RTOL)
    ERRORS[("packed_text", "llava", arch)] = (packed - torch.cat(alone, dim=1)).abs().max().item()


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
