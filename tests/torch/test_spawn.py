"""portvlm's one multi-process harness (``portvlm.testing.distributed.spawn``): a rank that dies or hangs is named, in
bounded time, and what the ranks wrote before stays. Lean: the ranks import torch and nothing else (seconds), and
only on the newest CI stack: the harness is torch's alone and every CI stack has the same torch.

    PY=$(python -m portvlm.run.env --transformers 5.24.0 --torch 2.13.0+cpu --python 3.11 | tail -1)
    $PY -m pytest tests/torch/test_spawn.py -q -p no:cacheprovider
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from _ranks import dies_or_hangs  # noqa: E402 - a light module: each spawned rank imports it
from _stacks import newest_only  # noqa: E402

from portvlm.testing.distributed import RankError, spawn  # noqa: E402

pytestmark = newest_only("the spawn harness is torch's alone")


def test_a_rank_that_dies_is_named_and_what_was_written_stays(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 of 2 died without a Python exception \(exit code 3") as err:
        spawn(dies_or_hangs, 2, str(tmp_path), "dies", timeout_s=60, what="the dying pair")
    assert time.monotonic() - t0 < 60
    assert err.value.ranks == [1] and "the dying pair" in str(err.value)
    assert (tmp_path / "rank0.done").read_text() == "written before the failure"


def test_a_rank_that_hangs_is_named_and_killed_at_the_deadline(tmp_path):
    t0 = time.monotonic()
    # 60 s: at load 10 on 2 cores two spawned ranks took over 20 s to import torch and write their files
    with pytest.raises(RankError, match=r"still running after the 60s deadline") as err:
        spawn(dies_or_hangs, 2, str(tmp_path), "hangs", timeout_s=60)
    assert time.monotonic() - t0 < 60 + 30  # the deadline plus the kill's grace, never the sleep's 600 s
    assert 1 in err.value.ranks and "of 2 still running" in str(err.value)  # rank 0 too only if it is slow to exit
    assert (tmp_path / "rank0.done").exists() and (tmp_path / "rank1.done").exists()
