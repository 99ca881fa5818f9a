"""The suites themselves, run per cell venv: tiny models, tolerance table, and all three suites on every model.

    .portvlm/envs/py3.11-torch2.13.0cpu-tf5.23.0/bin/python -m pytest tests/torch/test_suites.py -q -p no:cacheprovider
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _stacks import newest_only  # noqa: E402

import portvlm  # noqa: E402
from portvlm.models import inputs as model_inputs  # noqa: E402
from portvlm.models import tiny  # noqa: E402
from portvlm.suites import SuiteContext, run_suite, run_suites  # noqa: E402
from portvlm.testing import tolerances  # noqa: E402


def _declared(params, *, xfail: bool):
    """Each model's expected outcome on the installed stack, read from matrix.yaml (cpu arch): excluded -> skip and
    (for the suites) xfail -> strict xfail, each with its declared reason; no list of models here."""
    import transformers

    from portvlm.matrix.expand import expected_on
    from portvlm.policy import packaged_matrix

    out = []
    for p in params:
        outcome, reason = expected_on(packaged_matrix(), "cpu", p.values[0], transformers.__version__, torch.__version__)
        marks = tuple(p.marks)
        if outcome == "excluded":
            marks += (pytest.mark.skip(reason=f"matrix.yaml excludes this cell: {reason}"),)
        elif outcome == "xfail" and xfail:
            marks += (pytest.mark.xfail(reason=f"matrix.yaml expects a failure: {reason}", strict=True),)
        out.append(pytest.param(*p.values, marks=marks, id=p.id))
    return out


_BUILDABLE = [pytest.param(m, marks=pytest.mark.skipif(bool(tiny.is_available(m)), reason="; ".join(tiny.is_available(m)) or "-"), id=m)
              for m in tiny.model_ids()]
MODELS = _declared(_BUILDABLE, xfail=False)
CELLS = _declared(_BUILDABLE, xfail=True)


@pytest.mark.parametrize("model_id", MODELS)
def test_tiny_builds_are_reproducible_and_shaped(model_id):
    a, b = tiny.build(model_id, seed=3), tiny.build(model_id, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = tiny.build(model_id, seed=4)
    assert any(not torch.equal(sa[k], v) for k, v in c.state_dict().items() if v.is_floating_point())
    text = a.config.get_text_config()
    assert text.num_attention_heads > text.num_key_value_heads  # GQA, as in the real models
    for kind in model_inputs.KINDS:
        inp = model_inputs.build(model_id, kind)
        with torch.no_grad():
            out = a(**inp, use_cache=False)
        assert torch.isfinite(out.logits).all()
        assert out.logits.shape[:2] == inp["input_ids"].shape


def test_tiny_builds_every_model_the_matrix_declares():
    """matrix.yaml's model ids are the one id space: tiny builds exactly those."""
    from portvlm.policy import packaged_matrix

    assert tuple(m.id for m in packaged_matrix().models) == tiny.model_ids()


@pytest.mark.parametrize("model_id", MODELS)
def test_tiny_input_geometry_keeps_the_shapes_that_matter(model_id):
    """The tiny geometry (read from the tiny config, as portvlm.check reads a user's) keeps the real shapes' traits."""
    geo = tiny.geometry(model_id)
    assert geo == model_inputs.geometry(tiny.config(model_id))
    assert max(geo.special()) < geo.vocab and geo.pad == tiny.PAD and geo.bos == tiny.BOS
    if geo.layout == "images":
        assert (geo.image, geo.image_tokens, geo.window) == (tiny.LLAVA_IMG, 16, None)
    else:
        # GLM-4.xV / GLM-OCR frames use the image token (their video has no token of its own)
        video = tiny.IMG if model_id in ("glm4v", "glm4v_moe", "glm_ocr") else tiny.VID
        assert (geo.image, geo.video, geo.vstart, geo.vend, geo.merge, geo.temporal) == (
            tiny.IMG, video, tiny.VSTART, tiny.VEND, 2, 2)
        # Qwen2.5-VL: 8×8-patch windows, so the packed 16×16 image spans 4; Qwen3-VL: frames apart, no windows;
        # Qwen2-VL: no windows, frames not apart
        if model_id in ("qwen2_5vl", "qwen3vl", "qwen2vl"):
            assert (geo.window, geo.frames_apart) == {
                "qwen2_5vl": (8, False), "qwen3vl": (None, True), "qwen2vl": (None, False)}[model_id]


def test_qwen25_packed_input_spans_windows_and_full_blocks():
    if tiny.is_available("qwen2_5vl"):
        pytest.skip("qwen2_5vl unavailable")
    cfg = tiny.config("qwen2_5vl").vision_config
    assert cfg.fullatt_block_indexes and len(cfg.fullatt_block_indexes) < cfg.depth
    grids = [*model_inputs.PACKED_IMAGES, model_inputs.PACKED_VIDEO]
    assert len(model_inputs.PACKED_IMAGES) >= 3 and len(set(model_inputs.PACKED_IMAGES)) == len(model_inputs.PACKED_IMAGES)
    assert model_inputs.PACKED_VIDEO[0] >= 2
    assert max(model_inputs.num_windows(g, cfg.window_size // cfg.patch_size) for g in grids) > 1
    items = model_inputs.vision_items("qwen2_5vl")
    assert len(items) == 4 and sum(i["pixel_values"].shape[0] for i in items) == model_inputs.vision_batch("qwen2_5vl")["pixel_values"].shape[0]


def test_tolerance_table_lookup_and_fallbacks():
    assert tolerances.tolerance("cpu", torch.float32, "sdpa_masked", "fwd") == (1e-5, 1e-4)
    assert tolerances.tolerance("cpu", "float32", None, "bwd")[0] > tolerances.tolerance("cpu", "float32", None, "fwd")[0]
    assert tolerances.tolerance("gfx9", "bfloat16", "efficient_varlen", "fwd") == tolerances.tolerance("sm80+", "bfloat16", None, "fwd")
    for fp16 in ("float16", torch.float16, "fp16"):
        assert tolerances.tolerance("sm70", fp16, "efficient_varlen", "fwd")[0] >= 5e-3
    with pytest.raises(KeyError):
        tolerances.tolerance("tpu", "float32", None, "fwd")
    with pytest.raises(KeyError):
        tolerances.tolerance("cpu", "float32", None, "sideways")
    assert tolerances.device_kind("sm70", "cuda") == "sm70" and tolerances.device_kind("sm90", "cuda") == "sm80+"
    assert tolerances.device_kind("gfx942", "cuda") == "gfx9" and tolerances.device_kind("sm90", "cpu") == "cpu"


def test_a_crashing_suite_is_error_and_an_unavailable_model_is_skipped(monkeypatch):
    from portvlm.suites import parity

    def boom(ctx):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(parity, "run", boom)
    r = run_suite(SuiteContext("llava", "cpu"), "parity")
    assert r.status == "error" and "kaboom" in r.error
    monkeypatch.setattr(tiny, "is_available", lambda m: ["not here"])
    r = run_suite(SuiteContext("llava", "cpu"), "parity")
    assert r.status == "skipped" and r.reason == "not here"
    with pytest.raises(KeyError):
        run_suites(SuiteContext("llava", "cpu"), names=("nope",))


@pytest.mark.parametrize("model_id", CELLS)
def test_every_suite_passes(model_id):
    results = run_suites(SuiteContext(model_id, "cpu", fast=True, checker=portvlm.check))
    for name, r in results.items():
        assert r.status == "pass", (name, r.status, r.reason, r.error, [c for c in r.checks if not c.ok])
        assert r.checks and all(c.ok for c in r.checks)
    par, trn, stm = results["parity"].figures, results["training"].figures, results["streaming"].figures
    if "from_pretrained" in results:  # the model loaded the way users load it, beside _from_config's
        fpl = results["from_pretrained"].figures
        assert fpl["from_pretrained"]["dtype"] == "float32" and isinstance(fpl["differences"], list)
    assert par["max_abs_err"] <= par["atol"] * 10 and par["packed_vs_alone_err"] is not None
    assert trn["losses"][-1] < trn["losses"][0]
    assert stm["cache_sizes"][-1] == stm["sink"] + stm["window"]
    assert trn["skipped"]["fsdp2"].startswith("fast=True")


def test_fsdp2_over_two_gloo_processes_matches_single_process():
    """The cell's fsdp2 check goes through ``portvlm.distributed.parallelize`` (what users call), not FSDP by hand."""
    from portvlm.shims.layer_paths import resolve
    from portvlm.suites import training

    ctx = SuiteContext("llava", "cpu")
    ref = tiny.build("llava")
    got = training.fsdp_losses(ctx, ref.state_dict(), steps=2)
    single = tiny.clone(ref, attn_implementation="sdpa", model_id="llava").train()
    from portvlm.suites._common import patched

    with patched(single, ctx):
        want, _ = training.train_steps(single, training.batch("llava", torch.float32), 2, torch.float32)
    paths = resolve(ref)
    assert got["wrapped"] == len(paths.vision_blocks) + len(paths.text_layers), got  # parallelize's blocks, not a hand list
    assert got["classes"] == ["CLIPEncoderLayer", "LlamaDecoderLayer"], got
    assert torch.allclose(torch.tensor(got["losses"]), torch.tensor(want), atol=1e-5, rtol=1e-5), (got, want)


@newest_only("the suite's handling of a failed spawn is transformers-independent")
def test_ranks_that_fail_fail_their_gloo_check_and_keep_the_suites_other_checks(monkeypatch):
    """A rank that died or hung (``RankError``, named by the spawn harness) fails the fsdp2 / sp check with its words;
    the training suite's other checks, already measured, stay in the result."""
    from portvlm.suites import training
    from portvlm.testing.distributed import RankError

    def dead(*_a, **_k):
        raise RankError("steps_worker (llava, 2 gloo ranks): rank 1 of 2 died without a Python exception (exit code 3)", [1])

    monkeypatch.setattr(training, "fsdp_losses", dead)
    monkeypatch.setattr(training, "_sp_check", dead)
    result = training.run(SuiteContext("llava", "cpu"))
    checks = {c.name: c for c in result.checks}
    for name in ("fsdp2.loss_equals_single_process", "sp.dp2_equals_union"):
        assert not checks[name].ok and "rank 1 of 2 died" in checks[name].detail, checks[name]
    assert result.status == "fail"
    assert checks["grads.match_reference"].ok and checks["steps.loss_falls"].ok  # measured before: kept


def test_a_broken_portvlm_patch_is_an_error_never_a_skip(monkeypatch):
    """A broken install (portvlm.patch missing) must not read as "skipped": the suite reports an error."""
    import sys

    # None in sys.modules makes `import portvlm.shims.patch` raise ImportError, as a broken install does.
    monkeypatch.setitem(sys.modules, "portvlm.shims.patch", None)

    def missing(*args, **kwargs):  # suites call portvlm.patch directly: a broken install fails there
        raise ImportError("cannot import portvlm.shims.patch (broken install)")

    monkeypatch.setattr(portvlm, "patch", missing)
    result = run_suite(SuiteContext(model_id="qwen2_5vl", arch_id="cpu", fast=True), "parity")
    assert result.status == "error" and "patch" in result.error, (result.status, result.reason)
