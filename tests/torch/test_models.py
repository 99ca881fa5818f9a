"""The one-place rule for model families: a family declared only as a ``portvlm.models.Family`` record (plus a matrix
entry) flows through ``patch``, ``check``, the tiny-model factory, the cell suites, the doctor and the drift anchors.

The test family is a transformers model_type portvlm does not know, ``portvlm_testvlm``: a Qwen2.5-VL subclass under
its own name, registered for the test only (the registry is restored afterwards).
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import portvlm  # noqa: E402
from portvlm import models  # noqa: E402
from portvlm.errors import UnsupportedError  # noqa: E402
from portvlm.matrix.schema import Model  # noqa: E402
from portvlm.models import inputs as model_inputs  # noqa: E402
from portvlm.models import qwen, tiny  # noqa: E402
from portvlm.policy import packaged_matrix  # noqa: E402

TYPE, MID = "portvlm_testvlm", "testvlm"


class ToyVLMConfig(transformers.Qwen2_5_VLConfig):
    model_type = TYPE


class ToyVLM(transformers.Qwen2_5_VLForConditionalGeneration):
    config_class = ToyVLMConfig


def _tiny_config():
    base = qwen.qwen2_5_vl_config()
    return ToyVLMConfig.from_dict({k: v for k, v in base.to_dict().items() if k != "model_type"})


FAMILY = models.Family(
    model_type=TYPE, model_id=MID, model_class=lambda: ToyVLM, tiny_config=_tiny_config,
    geometry=qwen.geometry, layout="patches", head_dims=(16, 16), sequence_parallel=False,
    anchors={"layer_paths": ("transformers.Qwen2_5_VLForConditionalGeneration",)}, description="test VLM",
)


@pytest.fixture
def family():
    with models.register(FAMILY) as fam:
        yield fam
    assert TYPE not in models.model_types()  # the registry is put back


@pytest.fixture
def matrix():
    """The packaged matrix plus the one entry a new family needs."""
    m = packaged_matrix()
    return dataclasses.replace(m, models=(*m.models, Model(MID, TYPE, "test VLM", "4.49.0")))


def test_an_unregistered_family_is_refused_by_name():
    with pytest.raises(KeyError, match="unknown tiny model 'testvlm'"):
        tiny.build(MID)
    with pytest.raises(UnsupportedError, match="portvlm_testvlm.*not a supported family.*portvlm/models/"):
        models.by_type(TYPE)


def test_a_registered_family_builds_patches_and_checks(family, matrix):
    model = tiny.build(MID, attn_implementation="sdpa")
    assert type(model) is ToyVLM and model.config.model_type == TYPE
    geo = tiny.geometry(MID)
    assert (geo.model_type, geo.layout, geo.window) == (TYPE, "patches", 8)
    inp = model_inputs.build(MID, "packed")
    with portvlm.patch(model, arch="cpu", matrix=matrix) as handle:
        assert {"vision_varlen", "layer_paths"} <= handle.report.shim_names()
        assert handle.report.family == TYPE
        report = portvlm.check(model)
        with torch.no_grad():
            assert torch.isfinite(model(**inp, use_cache=False).logits).all()
    assert report.ok, str(report)
    assert report.family == TYPE and "across_windows_max_abs" in report.figures  # windowed: read from its geometry


def test_a_family_the_matrix_does_not_declare_is_refused_by_patch(family):
    model = tiny.build(MID)
    with pytest.raises(UnsupportedError, match="portvlm_testvlm.*not a supported family"):
        portvlm.patch(model, arch="cpu")  # the packaged matrix has no entry for it


def test_the_cell_suites_run_a_registered_family(family, matrix):
    from portvlm.suites import SuiteContext, run_suite

    result = run_suite(SuiteContext(model_id=MID, arch_id="cpu", matrix=matrix), "parity")
    assert result.status == "pass", result.error or [c for c in result.checks if not c.ok]
    assert any(c.name == f"{MID}.window_and_full_blocks_exercised" for c in result.checks)


def test_doctor_and_drift_read_the_record(family):
    from portvlm.drift import symbols

    assert models.by_type(TYPE).head_dims == (16, 16)
    assert TYPE not in models.sequence_parallel_types()
    assert "transformers.Qwen2_5_VLForConditionalGeneration" in symbols.anchors()["layer_paths"]
