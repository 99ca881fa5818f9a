"""benchmarks/distributed_train.py's verdicts, fed the bounds its GPU runs recorded (issue 23): a coarse
longest-row search is never read as more than it measured, and a reference that fails on one rank fails on all.

    $PY -m pytest tests/torch/test_distributed_benchmark_verdicts.py -q -p no:cacheprovider
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("distributed_train_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def search(longest, shortest_failing, tried=()):
    return {"longest_that_trains": longest, "shortest_that_does_not": shortest_failing,
            "tried": [{"fits": True, "trains": True}, *tried]}


def test_the_target_passes_only_when_the_lower_bound_reaches_it(bench):
    # one H200 shared by 2 ranks, sm90: SP=1 137k trains / 267k does not (not refined), SP=2 267k / 405k
    v = bench.longest_verdict(search(136943, 267442), search(267442, 404625), 1.8)
    assert v["ratio_longest_sp_over_sp1"] == 1.953 and v["ratio_bounds"] == [1.0, 2.955]
    assert v["status"] == "inconclusive" and "between 1.0 and 2.955" in v["reason"]
    # bounds that do decide it
    assert bench.longest_verdict(search(66615, 98391), search(209998, 267442), 1.8)["status"] == "pass"


def test_an_upper_bound_below_the_target_is_a_fail(bench):
    # sm70 on the same run: SP=2 could not train 217,612 tokens while SP=1 trained 136,943: ratio < 1.59
    v = bench.longest_verdict(search(136943, 267442), search(136943, 217612), 1.8)
    assert v["status"] == "fail" and v["meets_target"] is False and "1.589" in v["reason"]


def test_a_row_that_fits_with_a_non_finite_loss_fails_whatever_the_ratio(bench):
    nan = search(267442, 404625, [{"fits": True, "trains": False}])
    assert bench.longest_verdict(search(66615, 98391), nan, 1.8)["status"] == "fail"


def test_together_raises_naming_the_rank_and_its_error(bench):
    assert bench.together(lambda: 3, 1) == 3

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")

    with pytest.raises(RuntimeError, match="rank 0: OutOfMemoryError: CUDA out of memory"):
        bench.together(oom, 1)
