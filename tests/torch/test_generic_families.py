"""portvlm's generic path over every packed-image (cu_seqlens) VLM family of the installed transformers.

Each family is built tiny from its own config class (``portvlm.models.generic``). The test holds what must never
happen: a declared family that does not pass, and a vision module the probes accept whose figures miss (a probe that
lets through a module portvlm's forward computes wrongly, as GLM-OCR's q_norm/k_norm once would have been). Which
undeclared families pass, fail or cannot be built is the table's business (SUPPORT.md), not an assertion.
``PORTVLM_SWEEP_OUT=path`` also writes the sweep there (results/families/ feeds SUPPORT.md).
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from portvlm.models import generic  # noqa: E402

if generic.sweep_reasons():  # declared in one place: generic.SWEEP_FROM
    pytest.skip("; ".join(generic.sweep_reasons()), allow_module_level=True)
from portvlm.shims import dispatch  # noqa: E402

TYPES = generic.cu_seqlens_model_types()
if not TYPES:
    pytest.skip(f"transformers {transformers.__version__} has no cu_seqlens VLM family", allow_module_level=True)


@pytest.fixture(scope="module")
def sweep():
    result = generic.sweep(TYPES)
    out = os.environ.get("PORTVLM_SWEEP_OUT")
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1, sort_keys=True)
            fh.write("\n")
    return result


def test_every_declared_cu_seqlens_family_passes_the_generic_path(sweep):
    declared = [r for r in sweep["rows"] if r["declared"]]
    assert declared, "no declared family among the cu_seqlens families: the sweep checks nothing portvlm claims"
    bad = [f"{r['model_type']}: {r['status']} {r['notes']}" for r in declared if r["status"] != "passes"]
    assert not bad, bad


def test_no_vision_module_the_probes_accept_computes_wrongly(sweep):
    bad = [f"{r['model_type']}: err {r['vision_err']}" for r in sweep["rows"] if r["vision"] == "fail"]
    assert not bad, bad


def test_the_sweep_leaves_no_registry_entry_or_class_hook_behind(sweep):
    assert not any(name.startswith("portvlm") for name in transformers.AttentionInterface._global_mapping)
    assert not dispatch.HOOKS


def test_the_generic_plan_names_each_shim_it_would_apply():
    cfg = generic.tiny_config("qwen3_5")
    model = transformers.AutoModelForImageTextToText.from_config(cfg)
    plan = generic.generic_plan(model)
    assert plan[0].startswith("vision_varlen on Qwen3_5VisionAttention: one block-diagonal call")
    assert any(line.startswith("linear_attention_packed: per-sample") for line in plan)
