"""portvlm.wrappers without torch: wrappers are recognised by class name + package, chains unwrap outermost first,
unknown holders are named; the integration extra and the CI stack that gets it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from portvlm import wrappers
from portvlm.errors import UnsupportedError
from portvlm.matrix import load_matrix
from portvlm.wheels import INTEGRATION_REQUIREMENTS, integration_requirements

ROOT = Path(__file__).resolve().parents[2]
BEFORE = set(sys.modules)  # what was imported before these tests ran (torch may be, via another test in the worker)


def _cls(name: str, module: str, base=object, **attrs):
    return type(name, (base,), {"__module__": module, **attrs})


class Model:  # stands in for a transformers model: defined "in transformers"
    pass


Model.__module__ = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"


def _peft(inner):
    cls = _cls("PeftModelForCausalLM", "peft.peft_model", _cls("PeftModel", "peft.peft_model"),
               get_base_model=lambda self: self._inner)
    obj = cls()
    obj._inner = inner
    return obj


def _holder(cls_name, module, attr, inner):
    obj = _cls(cls_name, module)()
    setattr(obj, attr, inner)
    return obj


def test_a_chain_unwraps_outermost_first_and_names_each_wrapper():
    model = Model()
    ddp = _holder("DistributedDataParallel", "torch.nn.parallel.distributed", "module", _peft(model))
    compiled = _holder("OptimizedModule", "torch._dynamo.eval_frame", "_orig_mod", ddp)
    held = wrappers.unwrap(compiled)
    assert held.model is model
    assert held.labels == ["torch.compile OptimizedModule (._orig_mod)", "DistributedDataParallel (.module)",
                           "PEFT PeftModel (get_base_model())"]
    assert held.notes and "torch._dynamo.reset()" in held.notes[0]
    assert held.check_reasons() == []


def test_a_model_that_is_no_wrapper_is_returned_as_is():
    model = Model()
    held = wrappers.unwrap(model)
    assert held.model is model and held.chain == () and wrappers.foreign_reasons(model) == []


def test_same_class_name_from_another_package_is_not_a_wrapper():
    mine = _holder("DistributedDataParallel", "mytrainer.parallel", "module", Model())
    assert wrappers.wrapper_of(mine) is None


@pytest.mark.parametrize("stage, refused", [(2, False), (3, True)])
def test_check_refuses_zero3_and_fsdp1_with_the_reason(stage, refused):
    engine = _holder("DeepSpeedEngine", "deepspeed.runtime.engine", "module", Model())
    engine.zero_optimization_stage = lambda: stage
    reasons = wrappers.unwrap(engine).check_reasons()
    assert bool(reasons) == refused and (not refused or "ZeRO-3 partitions the parameters" in reasons[0])
    fsdp = _holder("FullyShardedDataParallel", "torch.distributed.fsdp.fully_sharded_data_parallel", "module", Model())
    assert "flattens and shards the parameters" in wrappers.unwrap(fsdp).check_reasons()[0]


def test_check_refuses_prompt_learning_adapters_it_would_not_see():
    peft = _peft(Model())
    peft.active_peft_config = type("Cfg", (), {"is_prompt_learning": True, "peft_type": "PREFIX_TUNING"})()
    assert "PREFIX_TUNING (prompt learning)" in wrappers.unwrap(peft).check_reasons()[0]
    peft.active_peft_config.is_prompt_learning = False  # LoRA-style: the adapters sit inside the model
    assert wrappers.unwrap(peft).check_reasons() == []


def test_an_unknown_holder_is_named_with_where_the_model_sits():
    holder = _cls("Engine", "lmms_engine.train")()
    child = Model()
    child.config = type("Cfg", (), {"model_type": "qwen2_5_vl"})()
    holder.named_children = lambda: [("model", child)]
    reasons = wrappers.foreign_reasons(holder)
    assert "lmms_engine.train.Engine is not a transformers model but a wrapper portvlm does not know" in reasons[0]
    assert "(a transformers model sits at .model)" in reasons[0]


def test_a_wrapper_cycle_is_an_error_not_a_hang():
    a = _holder("DataParallel", "torch.nn.parallel.data_parallel", "module", None)
    a.module = a
    with pytest.raises(UnsupportedError, match="nested wrappers"):
        wrappers.unwrap(a)


def test_unwrapping_imports_none_of_the_wrapper_libraries():
    wrappers.unwrap(_peft(Model()))
    assert not {"peft", "deepspeed", "torch"} & set(sys.modules) - BEFORE


def test_the_integrations_extra_is_the_ci_requirements_and_only_the_newest_stack_gets_it():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["integrations"]
    assert tuple(extra) == INTEGRATION_REQUIREMENTS
    stacks = load_matrix(ROOT / "matrix.yaml").ci_cpu_stacks()
    given = [s.id for s in stacks if integration_requirements(s, stacks)]
    newest = max(stacks, key=lambda s: tuple(int(p) for p in s.transformers.split(".")))
    assert given == [newest.id]
