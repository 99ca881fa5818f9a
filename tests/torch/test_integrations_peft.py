"""PEFT LoRA with the real library, in both orders; the wrappers users hold (PEFT, DDP, torch.compile, their own).

Issue #27: ``get_peft_model`` then ``portvlm.patch(peft_model)`` (the order most scripts use) was refused as
"upstream moved it", and ``portvlm.check`` on a LoRA model raised a raw ``RuntimeError`` from ``load_state_dict``.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import _integrations  # noqa: E402
import _tiny  # noqa: E402
from test_shims_patch import _assert_restored, _snapshot  # noqa: E402

import portvlm  # noqa: E402
from portvlm import checker  # noqa: E402
from portvlm.errors import UnsupportedError  # noqa: E402
from portvlm.models import inputs as model_inputs  # noqa: E402

peft = _integrations.need("peft")

FAMILY = "qwen2_5_vl"
# LoRA on the vision attention (qkv / proj, inside the class portvlm's dispatcher owns) and the text q/v projections.
TARGETS = ["qkv", "attn.proj", "q_proj", "v_proj"]


def _lora(model, **kw):
    # init_lora_weights=False: B is random, not zero, so the adapters change the output from the first step
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **kw)
    return peft.get_peft_model(model, cfg)


def _packed():
    inp = model_inputs.build(_tiny.model_id(FAMILY), "packed")
    return dict(inp, labels=inp["input_ids"])


def _train(model, steps=3):
    """A few AdamW steps on the packed row (several images, block-diagonal vision); the losses."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    inp, losses = _packed(), []
    for _ in range(steps):
        loss = model(**inp).loss
        assert torch.isfinite(loss), f"non-finite loss {loss}"
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _lora_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def _frozen(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_lora_trains_matches_the_reference_reverts_and_merges(order):
    base = _tiny.build(FAMILY, "sdpa")
    before = _snapshot(base)
    if order == "patch_then_peft":
        handle = portvlm.patch(base, arch="cpu")
        model = _lora(base)
    else:
        model = _lora(base)
        handle = portvlm.patch(model, arch="cpu")
        assert handle.report.wrappers == ["PEFT PeftModel (get_base_model())"]
        assert "found inside: PEFT PeftModel" in str(handle.report)
    assert "vision_varlen" in handle.report.shim_names() and "text_registry" in handle.report.shim_names()
    frozen, lora0 = _frozen(model), _lora_weights(model)

    calls = dict(handle.state.calls)
    losses = _train(model)
    assert handle.state.calls["vision"] > calls["vision"] and handle.state.calls["text"] > calls["text"]
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in frozen.items()), "a frozen weight moved"
    assert any(not torch.equal(v, dict(model.named_parameters())[k]) for k, v in lora0.items()), "LoRA did not train"

    report = portvlm.check(model)  # packed block-diagonal vision + logits vs fp32 eager with the adapters merged
    assert report.ok, report
    assert report.reference.startswith("the base weights with PEFT adapter(s) 'default' merged in fp32"), report.reference
    assert report.runs["Qwen2_5_VLVisionAttention.forward"] == f"portvlm ({handle.attn_name})"

    with torch.no_grad():
        patched = model(**_packed()).logits
    handle.revert()
    with torch.no_grad():
        upstream = model(**_packed()).logits
    torch.testing.assert_close(patched, upstream, atol=1e-5, rtol=1e-4)  # portvlm's attention == transformers' sdpa
    merged = model.merge_and_unload()  # after revert: the plain transformers model, adapters folded in
    assert not any("lora_" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**_packed()).logits, upstream, atol=1e-5, rtol=1e-4)
    _assert_restored(before, merged, f"not restored ({order})")


def test_check_on_lora_models_base_model_builds_the_reference_with_the_adapters():
    """The issue's raw RuntimeError (LoRA keys in load_state_dict): the reference is built with the adapters."""
    model = _lora(_tiny.build(FAMILY, "sdpa"))
    inner = model.get_base_model()
    ref, notes, source = checker.reference_from(inner)
    assert not notes and "merged in fp32" in source
    inp = model_inputs.build(_tiny.model_id(FAMILY), "image")
    with torch.no_grad():
        got = ref(**inp).logits
        want = model(**inp).logits  # unpatched: transformers' own attention, unmerged adapters
        with model.disable_adapter():
            base_only = model(**inp).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # The negative control: the adapters matter far beyond the tolerance, so a reference without them would fail.
    assert (base_only - want).abs().max() > 100 * 1e-5
    with model.disable_adapter():
        _, _, source = checker.reference_from(inner)
    assert source == "the base weights (the model's PEFT adapters 'default' are disabled)"


def test_unknown_wrapper_is_named_not_blamed_on_upstream():
    class Holder(torch.nn.Module):  # lmms-engine / LLaMA-Factory style: the model is a child
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.config = model.config

    with pytest.raises(UnsupportedError) as err:
        portvlm.patch(Holder(_tiny.build(FAMILY)), arch="cpu")
    text = str(err.value)
    assert "is not a transformers model but a wrapper portvlm does not know" in text
    assert "(a transformers model sits at .model)" in text and "upstream moved" not in text


def test_torch_compile_and_ddp_are_looked_through(tmp_path):
    import torch.distributed as dist

    model = _tiny.build(FAMILY, "sdpa")
    compiled = torch.compile(model, backend="eager")  # eager backend: dynamo only, no C++ toolchain needed
    with pytest.warns(UserWarning, match="torch.compile: a graph compiled before the patch"):
        handle = portvlm.patch(compiled, arch="cpu")
    with handle:
        assert handle.report.wrappers == ["torch.compile OptimizedModule (._orig_mod)"]
        with torch.no_grad():
            compiled(**model_inputs.build(_tiny.model_id(FAMILY), "text"))  # text only: dynamo traces the least
        assert handle.state.calls["text"] > 0
    torch._dynamo.reset()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        with portvlm.patch(ddp, arch="cpu") as handle:
            assert handle.report.wrappers == ["DistributedDataParallel (.module)"]
            from portvlm.distributed import parallelize

            with pytest.raises(UnsupportedError, match="already inside DistributedDataParallel; parallelize shards"):
                parallelize(ddp, handle, mesh=None)
    finally:
        dist.destroy_process_group()


def test_a_copy_of_a_patched_model_gets_its_own_patch_and_outlives_the_original():
    """A model built from a patched model's config names the other handle's attention (TRL's reference model)."""
    policy = _tiny.build(FAMILY, "sdpa")
    h_policy = portvlm.patch(policy, arch="cpu")
    ref = copy.deepcopy(policy)  # config and all: _attn_implementation == h_policy's name
    assert ref.config._attn_implementation == h_policy.attn_name
    h_ref = portvlm.patch(ref, arch="cpu")
    assert any("inherited" in w for w in h_ref.report.warnings)
    h_policy.revert()
    inp = model_inputs.build(_tiny.model_id(FAMILY), "packed")
    with torch.no_grad():
        ref(**inp)  # still runs: its own name is registered
    assert h_ref.state.calls["vision"] > 0 and h_ref.state.calls["text"] > 0
    h_ref.revert()
    assert ref.config._attn_implementation == "sdpa"  # what the policy's patch replaced, not its dead name
    with torch.no_grad():
        ref(**inp)


def test_check_cli_never_lets_a_raw_exception_out(monkeypatch, capsys):
    monkeypatch.setattr(checker, "load_factory", lambda spec: lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert checker.main(["pkg:build"]) == 2
    assert "cannot build the model with pkg:build: RuntimeError: boom" in capsys.readouterr().err
    monkeypatch.setattr(checker, "load_factory", lambda spec: lambda: _tiny.build(FAMILY))

    def broken(model, arch=None, **kwargs):
        raise KeyError("portvlm bug")

    monkeypatch.setattr(checker, "check", broken)
    assert checker.main(["pkg:build"]) == 3
    err = capsys.readouterr().err
    assert "portvlm check failed on Qwen2_5_VLForConditionalGeneration with KeyError" in err and "Traceback" not in err


@pytest.mark.parametrize(("site", "targets"), [("text_down_proj", ["o_proj", "down_proj"]),
                                               ("vision_down_proj", ["attn.proj", "mlp.down_proj"])])
def test_lora_on_rescaled_writers_under_the_calibrated_fp16_policy(site, targets):
    """LoRA first, then the calibrated sm70 patch: each LoRA layer on a stream writer is scaled part by part (its
    base layer, bias included, and each adapter), so fp16 logits match the fp32 LoRA model; LoRA after the patch
    would add the adapters' output unscaled, and is refused at the next forward."""
    from test_fp16 import ATOL, RTOL, _half, _logits, _planted

    from portvlm.testing import compare

    model, batch, _ = _planted("qwen2_5vl", site, 1.2e5)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    lora = peft.get_peft_model(copy.deepcopy(model), cfg)
    ref = _logits(lora.base_model.model, batch)
    l16 = copy.deepcopy(lora).half()
    with portvlm.patch(l16, arch="sm70", calibration=batch, guard=False) as handle:
        assert any("a LoRA layer" in c.why for c in handle.report.fp16), handle.report
        c = compare(_logits(l16.base_model.model, _half(batch)), ref, ATOL, RTOL)
        assert c.ok, f"max_abs={c.max_abs_err:.3g} vs atol={ATOL} rtol={RTOL}"

    m16 = copy.deepcopy(model).half()
    with portvlm.patch(m16, arch="sm70", calibration=batch, guard=False):
        late = peft.get_peft_model(m16, cfg)
        with pytest.raises(UnsupportedError, match="was wrapped .*wrap first"):
            _logits(late.base_model.model, _half(batch))
