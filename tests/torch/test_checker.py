"""portvlm.check catches the published V100 port's vision forward, and passes the same model under portvlm.patch.

The port (Heart-Sniper/VLM-R1_with_xformers, ../shared/research/peers.md §1a) calls xformers'
``memory_efficient_attention(q, k, v)`` without ``attn_bias=BlockDiagonalMask.from_seqlens(...)``: one attention over
every patch of every image, frame and window. ``v100_port_forward`` is that call in plain torch, installed on the
class the way the port installs it.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import portvlm  # noqa: E402
from portvlm import checker  # noqa: E402
from portvlm.errors import UnsupportedError  # noqa: E402
from portvlm.models import tiny  # noqa: E402

pytestmark = pytest.mark.skipif(bool(tiny.is_available("qwen2_5vl")), reason="needs Qwen2.5-VL")


def v100_port_forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
    """The port's vision attention: rotary, then full attention over ALL patches (``cu_seqlens`` unused)."""
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    if position_embeddings is None:
        emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
        position_embeddings = (emb.cos(), emb.sin())
    q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return self.proj((probs @ v).transpose(0, 1).reshape(seq, -1))


_MODEL = {}


def broken_model():
    """The factory ``portvlm check test_checker:broken_model`` calls: a tiny Qwen2.5-VL with the port installed."""
    if "m" not in _MODEL:
        _MODEL["m"] = tiny.build("qwen2_5vl", attn_implementation="sdpa")
    model = _MODEL["m"]
    cls = _vision_cls(model)
    _MODEL.setdefault("upstream", vars(cls)["forward"])
    cls.forward = v100_port_forward
    return model


def _vision_cls(model):
    from portvlm.shims.layer_paths import resolve

    return type(resolve(model).vision_blocks[0].attn)


@pytest.fixture
def ported():
    model = broken_model()
    yield model
    _vision_cls(model).forward = _MODEL["upstream"]


def test_broken_v100_port_is_caught_from_the_command_line_and_passes_under_portvlm_patch(ported, capsys):
    rc = checker.main(["test_checker:broken_model", "--json"])
    report = json.loads(capsys.readouterr().out)
    figures = report["figures"]
    print("broken port:", {k: figures[k] for k in ("leak_max_abs", "across_items_max_abs", "across_windows_max_abs",
                                                   "logits_max_abs")})
    assert rc == 1 and not report["ok"]
    failed = {c["name"] for c in report["checks"] if not c["ok"]}
    assert {"vision.packed_vs_alone.features", "vision.across_items.features", "vision.windows.features",
            "logits.packed"} <= failed, failed
    assert figures["across_items_max_abs"] > 0.1 and figures["across_windows_max_abs"] > 0.1  # far above 1e-5
    key = f"{_vision_cls(ported).__qualname__}.forward"  # Qwen2_5_VLVisionSdpaAttention on <=4.52
    assert "test_checker.v100_port_forward" in report["runs"][key]

    with pytest.warns(UserWarning, match="not transformers' own"), portvlm.patch(ported, arch="sm70") as handle:
        fixed = portvlm.check(ported)
    print("under portvlm.patch:", {k: fixed.figures[k] for k in ("leak_max_abs", "across_items_max_abs",
                                                                "across_windows_max_abs", "logits_max_abs")})
    assert fixed.ok, str(fixed)
    assert fixed.runs[key].startswith(f"portvlm ({handle.attn_name})")
    assert "PASS" in str(fixed) and fixed.figures["leak_max_abs"] < 1e-4
    assert vars(_vision_cls(ported))["forward"] is v100_port_forward  # revert put the user's port back


def test_check_refuses_models_it_has_no_inputs_for():
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedError, match="qwen2_5_vl.*llava"):
        portvlm.check(model)
    assert checker.main(["no_such_module_xyz:build"]) == 2


@pytest.mark.skipif(bool(tiny.is_available("qwen3_5")), reason="; ".join(tiny.is_available("qwen3_5")) or "-")
def test_check_holds_logits_to_the_familys_declared_scale_and_vision_features_to_the_table(monkeypatch):
    """Qwen3.5 upstream sdpa vs the eager reference: its gated RMSNorm amplifies rounding (the family's declared scale)."""
    from dataclasses import replace

    from portvlm import models

    family = models.by_type("qwen3_5")
    model = tiny.build("qwen3_5", attn_implementation="sdpa")
    report = portvlm.check(model)
    assert report.ok, str(report)
    figures = report.figures
    assert figures["tolerance_scale"] == family.tolerance_scale and figures["tolerance_why"] == family.tolerance_why
    assert figures["atol"] == figures["vision_atol"] * family.tolerance_scale and "vision_tolerance_scale" not in figures
    assert "declared by the family" in str(report)
    # Without the declaration the same model fails at the logits, and only there: the scale is what the check used.
    monkeypatch.setitem(models._REGISTRY, "qwen3_5", replace(family, tolerance_scale=1.0, tolerance_why=""))
    bare = portvlm.check(model)
    assert not bare.ok and bare.failed and all(c.name.startswith("logits.") for c in bare.failed), str(bare)


@pytest.mark.skipif(bool(tiny.is_available("glm_ocr")), reason="; ".join(tiny.is_available("glm_ocr")) or "-")
def test_the_reference_applies_glm_ocrs_vision_qk_norms_and_refuses_a_step_it_does_not_know(monkeypatch):
    """GLM-OCR's vision attention norms q and k per head: a reference without them read 0.386 as a leak."""
    model = tiny.build("glm_ocr", attn_implementation="sdpa")
    report = portvlm.check(model)
    assert report.ok and report.figures["leak_max_abs"] < 1e-5, str(report)
    # an upstream tower with a step the reference does not apply (here: as if it knew no q/k norms) is refused
    monkeypatch.setattr(checker, "REFERENCE_VISION_CHILDREN", ("qkv", "proj"))
    with pytest.raises(UnsupportedError, match="would skip GlmOcrVisionAttention's k_norm, q_norm"):
        portvlm.check(model)
