"""Hub kernels (transformers 5.25 kernelizes in from_pretrained): detected, reported, kept off where the policy says.

No Hub and no ``kernels`` package: a fake kernelized layer is made exactly the way ``kernels.kernelize`` makes one
(the class marked with ``kernel_layer_name``, the hub layer's forward bound on the instance).
"""

from __future__ import annotations

from types import MethodType

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import portvlm  # noqa: E402
from portvlm.models import inputs as model_inputs  # noqa: E402
from portvlm.models import tiny  # noqa: E402
from portvlm.shims import hub_kernels  # noqa: E402
from portvlm.suites import SuiteContext, run_suite  # noqa: E402
from portvlm.suites.from_pretrained import describe, differences, predicted_raise  # noqa: E402


class FakeHubRMSNorm(torch.nn.Module):
    """A stand-in for a Hub layer (liger-kernels' LigerRMSNorm): visibly different output (x2)."""

    def forward(self, hidden_states):
        return 2.0 * hidden_states


def _norms(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]


def _kernelize(model, monkeypatch):
    """Mark the text RMSNorm class as kernels does and put the fake hub forward on its first instance."""
    path, norm = _norms(model)[-1]  # the text model's final norm: every logit goes through it
    monkeypatch.setattr(type(norm), "kernel_layer_name", "RMSNorm", raising=False)
    norm.forward = MethodType(FakeHubRMSNorm.forward, norm)
    return path, norm


@pytest.fixture
def model():
    return tiny.build("qwen2_5vl", attn_implementation="sdpa")


def _logits(model):
    model.rope_deltas = None
    if hasattr(model, "model") and hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None
    with torch.no_grad():
        return model(**model_inputs.build("qwen2_5vl", "text", torch.float32), use_cache=False).logits


def test_a_kernelized_layer_is_detected_with_its_origin(model, monkeypatch):
    path, norm = _kernelize(model, monkeypatch)
    found = hub_kernels.kernelized_layers(model)
    assert [k.path for k in found] == [path]
    assert found[0].layer_name == "RMSNorm" and found[0].cls == type(norm).__name__
    assert "FakeHubRMSNorm.forward" in found[0].origin


def test_kernelize_fallback_binding_the_class_forward_is_not_a_replacement(model, monkeypatch):
    _, norm = _norms(model)[0]
    monkeypatch.setattr(type(norm), "kernel_layer_name", "RMSNorm", raising=False)
    norm.forward = MethodType(type(norm).forward, norm)  # what kernelize does where no kernel matches the device
    assert hub_kernels.kernelized_layers(model) == []


def test_patch_reports_hub_kernels_it_lets_run_where_the_policy_allows(model, monkeypatch):
    path, norm = _kernelize(model, monkeypatch)
    with portvlm.patch(model, arch="cpu") as handle:
        hk = handle.report.hub_kernels
        assert hk["allowed"] and [k["path"] for k in hk["kernelized"]] == [path] and hk["kept_off"] == []
        assert "run hub kernels" in hk["verdict"] and "hub kernels:" in str(handle.report)
        assert "forward" in vars(norm)  # left as the user loaded it


def test_sm70_and_rocm_policies_keep_layers_off_hub_kernels_and_revert_restores_them(model, monkeypatch):
    plain = _logits(model)
    path, norm = _kernelize(model, monkeypatch)
    hub_forward = vars(norm)["forward"]
    kernelized = _logits(model)
    assert not torch.allclose(plain, kernelized)  # the fake hub layer is visible in the output
    model._use_kernels = True  # 5.25's flag that makes train()/eval() re-kernelize
    for arch in ("sm70", "gfx942"):
        with portvlm.patch(model, arch=arch) as handle:
            hk = handle.report.hub_kernels
            assert not hk["allowed"] and [k["path"] for k in hk["kept_off"]] == [path]
            assert "kept off" in hk["verdict"] and arch in hk["verdict"] and "verified" in hk["policy"]
            assert "forward" not in vars(norm) and model._use_kernels is False
            assert hub_kernels.kernelized_layers(model) == []
        assert vars(norm)["forward"] is hub_forward and model._use_kernels is True
    model.float()
    assert torch.equal(_logits(model), kernelized)


def test_the_from_pretrained_lane_records_what_the_load_resolved():
    result = run_suite(SuiteContext("llava", "cpu", fast=True, checker=portvlm.check), "from_pretrained")
    assert result.status == "pass", (result.error, [c for c in result.checks if not c.ok])
    fig = result.figures
    names = {c.name for c in result.checks}
    assert {"doctor_predicts_default_load", "weights_roundtrip", "logits.image.unpatched", "portvlm.check"} <= names
    assert fig["from_pretrained"]["dtype"] == "float32" and fig["patch_hub_kernels"]["verdict"]
    raises, _ = predicted_raise()
    assert (fig["default_load"] != "ok") == raises
    if raises:  # 5.25+ without kernels: the fallback is named, and counted as a difference
        assert fig["loaded_with"].startswith("USE_HUB_KERNELS=0") and any("raised" in d for d in fig["differences"])


def test_differences_name_what_from_pretrained_resolved_otherwise(model, monkeypatch):
    built = describe(model)
    _kernelize(model, monkeypatch)
    loaded = dict(describe(model), attn_implementation="eager")
    diff = differences(loaded, built)
    assert any(d.startswith("attn_implementation: from_pretrained 'eager'") for d in diff)
    assert any(d.startswith("hub kernels: 1 layer(s)") for d in diff)


def test_the_doctor_prediction_follows_use_hub_kernels(monkeypatch):
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    raises, message = predicted_raise()
    assert not raises and message == "from_pretrained loads no Hub kernels"
