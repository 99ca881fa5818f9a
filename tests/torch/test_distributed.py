"""portvlm.distributed on the CPU with gloo: N processes against one (the patched model's own forward).

    .portvlm/envs/py3.11-torch2.13.0cpu-tf5.23.0/bin/python -m pytest tests/torch/test_distributed.py -q -p no:xdist

Every spawn has a hard deadline (``portvlm.testing.distributed.spawn``) and the gloo group a timeout, so nothing here can hang.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _stacks import ends_only, newest_only  # noqa: E402

from portvlm.models import tiny  # noqa: E402
from portvlm.suites import distributed_checks as check  # noqa: E402
from portvlm.testing.distributed import RankError  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4  # fp32, eager-grade sdpa_masked on the CPU; measured worst ratio ~0.004
DEADLINE_S = 300


def _needs(model_id):
    reasons = tiny.is_available(model_id)
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "-")


def _run(model_id, kind, dp, sp, faults=()):
    rows = check.rows_for(model_id, kind)
    ref = check.reference(model_id, "cpu", tiny.build(model_id).state_dict(), rows)
    cases = [{"name": "ok"}] + [{"name": f, "fault": f} for f in faults]
    got = check.run(model_id, "cpu", dp=dp, sp=sp, rows=rows, cases=cases, timeout_s=DEADLINE_S)
    return rows, {name: check.compare(res, ref, ATOL, RTOL) | {"ulysses_calls": res["ulysses_calls"]}
                  for name, res in got.items()}


# qwen3vl_moe: deepstack, DP only; rank 1's text-only row once reduced fewer gradients (its dummy frame left the
# deepstack mergers out) and gloo aborted ("Received data size doesn't match expected size")
@pytest.mark.parametrize("model_id", [pytest.param("qwen2_5vl"), pytest.param("llava"),
                                      pytest.param("qwen3vl_moe", marks=(_needs("qwen3vl_moe"), newest_only("a family's DP check")))])
def test_dp2_step_equals_one_process_on_the_union(model_id):
    faults = ("average_gradients",) if model_id == "qwen2_5vl" else ()
    rows, res = _run(model_id, "dp", dp=2, sp=1, faults=faults)
    assert rows[0]["input_ids"].shape[1] != rows[1]["input_ids"].shape[1]  # different data, different lengths
    assert "pixel_values" not in rows[1]  # rank 1 has no image: its tower runs on the dummy frame
    assert res["ok"]["ok"], res["ok"]
    if faults:  # FSDP's default mean over ranks is wrong for a batch-mean loss over rows of different lengths
        assert not res["average_gradients"]["ok"], res["average_gradients"]


@pytest.mark.parametrize("model_id", [pytest.param("qwen2_5vl"), pytest.param("qwen3vl", marks=_needs("qwen3vl"))])
def test_sp2_equals_sp1_and_negative_controls_fail(model_id):
    rows, res = _run(model_id, "sp", dp=1, sp=2, faults=("local_cu", "local_positions", "unordered_vision"))
    cut = check.straddles(rows[0], 2)
    assert cut["sample_cut"] and cut["vision_cut"], cut  # the split cuts a sample and an image
    assert res["ok"]["ok"], res["ok"]
    assert res["ok"]["ulysses_calls"] == tiny.config(model_id).get_text_config().num_hidden_layers
    for fault in ("local_cu", "local_positions", "unordered_vision"):
        assert not res[fault]["ok"], (fault, res[fault])
        assert res[fault]["grad_ratio"] > 10, (fault, res[fault])  # far outside fp32 noise, not marginal


# the claim is portvlm's K/V head replication (fewer KV heads than ranks); each stack's attention path under SP is
# test_sp2's, on every stack
@ends_only("SP=4 with 2 KV heads")
@pytest.mark.parametrize("model_id", [pytest.param("qwen2_5vl"), pytest.param("qwen3vl", marks=_needs("qwen3vl"))])
def test_sp4_with_two_kv_heads_equals_sp1(model_id):
    assert tiny.config(model_id).get_text_config().num_key_value_heads == 2  # fewer KV heads than ranks
    rows, res = _run(model_id, "sp", dp=1, sp=4)
    cut = check.straddles(rows[0], 4)
    assert len(cut["sample_cut"]) >= 2 and cut["vision_cut"], cut
    assert res["ok"]["ok"], res["ok"]


def test_head_count_not_divisible_names_both_numbers():
    from portvlm.distributed.ulysses import UlyssesBackend, head_reasons, kv_repeat
    from portvlm.errors import UnsupportedError

    assert head_reasons(4, 2, 4) == [] and kv_repeat(4, 2, 4) == 2 and kv_repeat(28, 4, 2) == 1
    (why,) = head_reasons(4, 2, 3)
    assert "4 query heads" in why and "SP degree 3" in why
    backend = UlyssesBackend("eager", group=None, rank=0, sp=3)
    q = torch.zeros(5, 4, 8)
    with pytest.raises(UnsupportedError, match="4 query heads.*SP degree 3"):
        backend(q, q[:, :2], q[:, :2], torch.tensor([0, 15]), 15, 1.0, True)


@newest_only("a raising rank's end is the harness's and check.run's, not the model's")
def test_a_rank_that_raises_ends_every_rank_in_bounded_time():
    rows = check.rows_for("qwen2_5vl", "sp")
    t0 = time.monotonic()
    with pytest.raises(RankError, match="rank 1 of 2 raised(.|\n)*injected failure on rank 1") as err:
        check.run("qwen2_5vl", "cpu", dp=1, sp=2, rows=rows, cases=[{"name": "ok"}], fail_rank=1, timeout_s=120)
    assert time.monotonic() - t0 < 120
    assert err.value.ranks == [1]


def test_the_root_output_shows_fsdp_its_loss():
    """FSDP2 up to torch 2.12 finds the root's outputs with ``tree_flatten``; an opaque output leaves the root's
    parameters freed in backward (torch 2.11 + CUDA: "setStorage ... storage of size 0")."""
    from torch.utils._pytree import tree_flatten

    from portvlm.distributed.parallel import StepOutput

    loss = torch.ones((), requires_grad=True) * 2
    leaves, _ = tree_flatten(StepOutput(loss, loss.detach(), 3))
    assert any(leaf is loss for leaf in leaves), leaves
