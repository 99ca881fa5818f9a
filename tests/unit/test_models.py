"""The family registry (``portvlm.models``) against matrix.yaml, without torch: one id bridge, one record per type."""

from __future__ import annotations

import subprocess
import sys

import pytest

from portvlm import models
from portvlm.errors import UnsupportedError
from portvlm.policy import packaged_matrix


def test_every_matrix_model_is_built_from_the_family_its_entry_names():
    for m in packaged_matrix().models:
        assert models.by_id(m.id).model_type == m.family, m.id


def test_every_registered_family_is_declared_in_the_matrix():
    declared = {m.id for m in packaged_matrix().models}
    assert set(models.model_ids()) == declared
    assert models.model_types() == packaged_matrix().families()


def test_records_are_complete():
    for fam in models.families():
        assert fam.layout in models.LAYOUTS
        assert all(d > 0 and d % 8 == 0 for d in fam.head_dims), fam.model_type
        assert fam.anchors.get("layer_paths"), f"{fam.model_type}: the drift lane watches its class"


def test_lookups_name_the_known_ones():
    with pytest.raises(UnsupportedError, match="'gpt2' is not a supported family.*qwen2_5_vl"):
        models.by_type("gpt2")
    with pytest.raises(KeyError, match="unknown tiny model 'nope'.*llava_mla"):
        models.by_id("nope")
    assert models.by_id("llava_mla") is models.by_type("llava")
    assert models.sequence_parallel_types() == ("qwen2_5_vl", "qwen3_vl")


def test_register_refuses_clashes_and_restores():
    qwen = models.by_type("qwen2_5_vl")
    with pytest.raises(ValueError, match="already registered"), models.register(qwen):
        pass
    import dataclasses

    with pytest.raises(ValueError, match="llava_mla"), models.register(
            dataclasses.replace(qwen, model_type="other", model_id="llava_mla")):
        pass
    assert "other" not in models.model_types()


def test_importing_the_registry_imports_neither_torch_nor_transformers():
    code = ("import sys, portvlm.models, portvlm.drift.symbols as s; s.anchors(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_familys_declared_scale_reaches_text_budgets_only_and_carries_its_reason():
    """``tolerances.budget``: the one place suites and portvlm.check take budgets from."""
    from dataclasses import replace

    from portvlm.testing import tolerances

    table = tolerances.tolerance("cpu", "float32", None, "fwd")
    qwen35 = models.by_type("qwen3_5")
    assert qwen35.tolerance_scale > 1 and qwen35.tolerance_why
    text = tolerances.budget("cpu", "float32", None, "fwd", family=qwen35)
    assert tuple(text) == (table[0] * qwen35.tolerance_scale, table[1])  # atol only: rtol stays the table's
    assert text.figures()["tolerance_why"] == qwen35.tolerance_why
    assert tuple(tolerances.budget("cpu", "float32", None, "fwd", family=qwen35, output="vision")) == table
    assert tolerances.budget("cpu", "float32", None, "fwd", family=models.by_type("qwen2_5_vl")) == tolerances.Budget(*table)
    loss = tolerances.loss_budget("float32", family=qwen35)
    l_atol, l_rtol = tolerances.loss_tolerance("float32")
    assert tuple(loss) == (l_atol * qwen35.tolerance_scale, l_rtol)
    with pytest.raises(ValueError, match="measured reason"):
        tolerances.budget("cpu", "float32", None, "fwd", family=replace(qwen35, tolerance_why=""))
    with pytest.raises(KeyError, match="output"):
        tolerances.budget("cpu", "float32", None, "fwd", output="audio")
