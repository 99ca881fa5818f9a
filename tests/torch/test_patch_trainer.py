"""portvlm.patch_trainer without a trainer library: any object holding ``model`` / ``ref_model`` (what TRL's trainers
hold) gets one handle per unpatched model; shared, missing and already-patched models are skipped with the reason."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import _tiny  # noqa: E402

import portvlm  # noqa: E402
from portvlm.errors import UnsupportedError  # noqa: E402

FAMILY = "qwen2_5_vl"


def _runs(model, handle) -> bool:
    before = handle.state.calls["vision"]
    with torch.no_grad():
        model(**_tiny.inputs(FAMILY))
    return handle.state.calls["vision"] > before


def test_patches_policy_and_reference_each_with_its_own_handle_and_reverts_both():
    trainer = types.SimpleNamespace(model=_tiny.build(FAMILY, "sdpa"), ref_model=_tiny.build(FAMILY, "sdpa", seed=1))
    with portvlm.patch_trainer(trainer, arch="cpu") as patched:
        assert set(patched.handles) == {"model", "ref_model"} and not patched.skipped
        policy, ref = patched.handles["model"], patched.handles["ref_model"]
        assert policy.attn_name != ref.attn_name
        assert _runs(trainer.model, policy) and _runs(trainer.ref_model, ref)
        assert "trainer.ref_model:" in patched.report()
    assert policy.reverted and ref.reverted and not patched.handles
    assert trainer.model.config._attn_implementation == "sdpa" == trainer.ref_model.config._attn_implementation


def test_skips_what_is_missing_shared_or_already_patched_and_says_why():
    model = _tiny.build(FAMILY, "sdpa")
    trainer = types.SimpleNamespace(model=model, ref_model=None)
    with portvlm.patch_trainer(trainer, arch="cpu") as patched:
        assert "ref_model is None" in patched.skipped["ref_model"]
    trainer.ref_model = model
    with portvlm.patch(model, arch="cpu"), portvlm.patch_trainer(trainer, arch="cpu") as patched:
        assert not patched.handles
        assert "already patched" in patched.skipped["model"] and "same model as trainer.model" in patched.skipped["ref_model"]


def test_a_refused_model_leaves_no_model_patched():
    class Cfg:
        model_type = "bert"

    class Other(torch.nn.Module):
        config = Cfg()

    trainer = types.SimpleNamespace(model=_tiny.build(FAMILY, "sdpa"), ref_model=Other())
    with pytest.raises(UnsupportedError, match="bert"):
        portvlm.patch_trainer(trainer, arch="cpu")
    from portvlm.shims import dispatch

    assert not dispatch.owner_reasons(trainer.model.modules())  # the policy's handle was reverted too
