"""benchmarks/distributed_train.py's verdicts, fed the bounds its GPU runs recorded (issue 23): a coarse
longest-row search is never read as more than it measured, and a reference that fails on one rank fails on all.
The longest-row search itself runs against a fake GPU (a row trains iff it has at most L tokens, each probe costs
20 s of a fake clock): its probe sequence, the aim at the target, the time limit and a non-finite loss.

    $PY -m pytest tests/torch/test_distributed_benchmark_verdicts.py -q -p no:cacheprovider
"""

from __future__ import annotations

import importlib.util
import json
import math
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


def test_a_probe_beside_an_earlier_model_still_alive_cannot_decide_it(bench):
    # sm70, 2026-12-03: the failing probes ran with the previous probe's model uncollected (7.2 GiB per rank)
    leak = search(333656, 343215, [{"tokens": 343215, "fits": False, "trains": False,
                                    "leftover_models_per_rank": [1, 1]}])
    v = bench.longest_verdict(search(177505, 185364), leak, 1.8)
    assert v["status"] == "fail" and "[343215]" in v["reason"] and "leak" in v["reason"], v
    clean = search(333656, 343215, [{"tokens": 343215, "fits": False, "trains": False,
                                     "leftover_models_per_rank": [0, 0]}])
    assert bench.longest_verdict(search(177505, 185364), clean, 1.8)["status"] == "pass"


def test_together_raises_naming_the_rank_and_its_error(bench):
    assert bench.together(lambda: 3, 1) == 3

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")

    with pytest.raises(RuntimeError, match="rank 0: OutOfMemoryError: CUDA out of memory"):
        bench.together(oom, 1)


class FakeGpu:
    """A row trains iff it has at most ``limit`` tokens (loss NaN from ``nan_from`` on); each probe takes ``seconds``
    of the fake clock; ``rows(n)``: the actual size of the row requested as ``n`` (default ``n``)."""

    def __init__(self, limit, *, seconds=20.0, nan_from=None, rows=None):
        self.limit, self.seconds, self.nan_from, self.rows = limit, seconds, nan_from, rows or (lambda n: n)
        self.now, self.probes = 0.0, []

    def clock(self):
        return self.now

    def step(self, n):
        self.now += self.seconds
        t = self.rows(n)
        self.probes.append(t)
        fits = t <= self.limit
        loss = (float("nan") if self.nan_from and t >= self.nan_from else 2.5) if fits else None
        return {"tokens": t, "fits": fits, "trains": fits and math.isfinite(loss), "loss": loss}

    def search(self, bench, until=math.inf, **kw):
        return bench.search_longest(self.step, 131072, until=until, maximum=524288, tokens=self.rows,
                                    clock=self.clock, **kw)


def aim_of(sp1):
    return math.ceil(1.8 * sp1["shortest_that_does_not"])


def test_the_search_doubles_then_bisects_to_the_precision(bench):
    gpu = FakeGpu(186_000)
    sp1 = gpu.search(bench)
    lo, hi = sp1["longest_that_trains"], sp1["shortest_that_does_not"]
    assert lo <= 186_000 < hi and hi / lo <= 1.05 and "bracketed" in sp1["stopped"]
    assert gpu.probes[:2] == [131072, 262144]  # doubling until a row does not train
    assert 131072 < gpu.probes[2] < 262144  # then bisection between the two
    assert len(gpu.probes) == 6 and [t["tokens"] for t in sp1["tried"]] == gpu.probes and "aim" not in sp1
    # a coarser precision stops sooner; rows that come only in 10k steps stop the search before it repeats a size
    assert len(FakeGpu(186_000).search(bench, precision=0.2)["tried"]) == 4
    coarse = FakeGpu(186_000, rows=lambda n: math.ceil(n / 10_000) * 10_000)
    found = coarse.search(bench, precision=0.001)
    assert len(set(coarse.probes)) == len(coarse.probes) and found["shortest_that_does_not"] == 190_000
    assert found["longest_that_trains"] == 180_000 and "between 180000 and 190000" in found["stopped"]


def test_the_aim_comes_right_after_the_first_row_and_decides_a_pass(bench):
    sp1 = FakeGpu(186_000).search(bench)
    gpu = FakeGpu(380_000)
    spn = gpu.search(bench, aim=aim_of(sp1))
    assert gpu.probes[:2] == [131072, aim_of(sp1)] and spn["aim"] == {"tokens": aim_of(sp1),
                                                                     "row_tokens": aim_of(sp1), "trains": True}
    assert spn["longest_that_trains"] <= 380_000 < spn["shortest_that_does_not"]  # time was left: it went on
    v = bench.longest_verdict(sp1, spn, 1.8)
    assert v["status"] == "pass" and v["meets_target"] is True and v["ratio_bounds"][0] >= 1.8
    # the row made for the aim is short of it: the request steps up once
    short = FakeGpu(380_000, rows=lambda n: n - 1000 if n > 300_000 else n)
    assert short.search(bench, aim=aim_of(sp1))["aim"]["row_tokens"] >= aim_of(sp1)


def test_an_aim_that_does_not_train_bisects_below_it_to_a_fail(bench):
    sp1 = FakeGpu(186_000).search(bench)
    gpu = FakeGpu(250_000)
    spn = gpu.search(bench, aim=aim_of(sp1))
    assert gpu.probes[1] == aim_of(sp1) and spn["aim"]["trains"] is False
    assert all(p < aim_of(sp1) for p in gpu.probes[2:]) and len(gpu.probes) > 2
    v = bench.longest_verdict(sp1, spn, 1.8)
    assert v["status"] == "fail" and v["meets_target"] is False and v["ratio_bounds"][1] < 1.8


def test_the_time_share_stops_the_search_with_both_bounds(bench):
    gpu1 = FakeGpu(186_000)
    sp1 = gpu1.search(bench, until=50)  # probes at 0, 20, 40 s; none at 60
    assert len(gpu1.probes) == 3 and "time share" in sp1["stopped"]
    assert sp1["longest_that_trains"] == 185364 and sp1["shortest_that_does_not"] == 262144
    gpun = FakeGpu(380_000)
    spn = gpun.search(bench, until=50, aim=aim_of(sp1))
    assert spn["longest_that_trains"] and spn["shortest_that_does_not"] and "time share" in spn["stopped"]
    assert bench.longest_verdict(sp1, spn, 1.8)["status"] == "inconclusive"
    # no time at all: not even the aim is probed, and it says so
    none = FakeGpu(380_000).search(bench, until=-1, aim=500_000)
    assert none["tried"] == [] and none["aim"]["trains"] is None and "time share" in none["stopped"]


def test_a_non_finite_loss_stops_the_search_and_fails_the_verdict(bench):
    gpu = FakeGpu(400_000, nan_from=200_000)  # the aim fits, with a NaN loss
    sp1 = FakeGpu(186_000).search(bench)
    spn = gpu.search(bench, aim=aim_of(sp1))
    assert gpu.probes == [131072, aim_of(sp1)] and "not finite" in spn["stopped"]
    v = bench.longest_verdict(sp1, spn, 1.8)
    assert v["status"] == "fail" and "not finite" in v["reason"]


def test_sp_rows_have_the_tokens_the_search_asks_for(bench):
    # the search's bounds are row sizes: a row that overshot by a whole last sample (~12%) would make its 5% moot
    for n in (600, 713, 1284, 2400):
        assert n <= bench.sp_row("qwen2_5vl", n, True)["input_ids"].shape[1] <= n + 4


def test_sp1_from_takes_a_comparable_sp1_search_and_refuses_any_other(bench, tmp_path):
    base = {"model": "qwen2_5vl", "model_desc": "7B widths", "world_size": 2, "memory_cap_GiB_per_rank": 69.9,
            "activation_checkpointing": True}
    sp1 = {"longest_that_trains": 185364, "shortest_that_does_not": 193571, "tried": [{"tokens": 131072}]}
    doc = {"torch": "2.11.0+cu130", "commit": "abc", "date": "2026-12-03", "argv": ["sp"],
           "rows": [base | {"check": "longest_row", "arch_policy": "sm70", "sp1": sp1}]}
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(doc))
    got, where = bench.sp1_from(str(path), "sm70", base, "2.11.0+cu130")
    assert got == sp1 and where == {"file": "rec.json", "commit": "abc", "date": "2026-12-03", "argv": ["sp"]}
    with pytest.raises(SystemExit, match="memory_cap_GiB_per_rank: 69.9 there, 60.0 here"):
        bench.sp1_from(str(path), "sm70", base | {"memory_cap_GiB_per_rank": 60.0}, "2.11.0+cu130")
    with pytest.raises(SystemExit, match="torch: '2.11.0\\+cu130' there, '2.13.0' here"):
        bench.sp1_from(str(path), "sm70", base, "2.13.0")
    with pytest.raises(SystemExit, match="no longest_row row of policy sm90"):
        bench.sp1_from(str(path), "sm90", base, "2.11.0+cu130")
