"""Shared-device mode (issue 23): every rank on one GPU over gloo — its refusals, on the CPU.

    PY=$(python -m portvlm.run.env --transformers 5.24.0 --torch 2.13.0+cpu --python 3.11 | tail -1)
    $PY -m pytest tests/torch/test_shared_device.py -q -p no:cacheprovider

What needs a GPU (ranks on cuda:0, the memory cap, gloo on CUDA tensors) runs in
``benchmarks/distributed_train.py --shared-device``; here: every path that must refuse, and the collective probe
on a real two-process gloo group, with a collective that "gloo lacks" injected.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _stacks import newest_only  # noqa: E402

from portvlm.distributed import launch  # noqa: E402
from portvlm.errors import UnsupportedError  # noqa: E402


def test_the_env_var_switches_the_mode_and_a_typo_is_an_error():
    assert launch.shared_device_requested(None, {launch.ENV: "1"}) is True
    assert launch.shared_device_requested(None, {launch.ENV: "no"}) is False
    assert launch.shared_device_requested(None, {}) is False
    assert launch.shared_device_requested(True, {launch.ENV: "0"}) is True  # the flag wins
    with pytest.raises(ValueError, match=f"{launch.ENV}='shared'.*set it to 1"):
        launch.shared_device_requested(None, {launch.ENV: "shared"})


def test_the_memory_cap_is_one_over_world_unless_overridden():
    assert launch.memory_fraction(2, None, {}) == 0.5
    assert launch.memory_fraction(4, 0.3, {launch.ENV_FRACTION: "0.9"}) == 0.3
    assert launch.memory_fraction(4, None, {launch.ENV_FRACTION: "0.9"}) == 0.9
    with pytest.raises(ValueError, match=f"{launch.ENV_FRACTION}='half' is not a number.*0.25 for 4 ranks"):
        launch.memory_fraction(4, None, {launch.ENV_FRACTION: "half"})


@pytest.mark.parametrize("kwargs,needle", [
    (dict(cuda_devices=0), "torch sees no CUDA/ROCm device; on the CPU run without it"),
    (dict(backend="nccl"), "NCCL refuses two ranks on one GPU"),
    (dict(local_world=2, world=4), "LOCAL_WORLD_SIZE=2 of WORLD_SIZE=4: ranks on other hosts cannot share"),
    (dict(fraction=1.5), "per-rank memory fraction 1.5 is outside (0, 1]"),
    (dict(fraction=0.0), "per-rank memory fraction 0 is outside (0, 1]"),
])
def test_each_refusal_names_the_problem_and_the_fix(kwargs, needle):
    args = dict(world=2, local_world=2, cuda_devices=1, backend=None, fraction=0.5) | kwargs
    assert launch.shared_device_reasons(**dict(world=2, local_world=2, cuda_devices=1, backend=None, fraction=0.5)) == []
    (why,) = launch.shared_device_reasons(**args)
    assert needle in why, why


def test_asking_for_it_without_a_gpu_refuses_at_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t0 = time.monotonic()
    with pytest.raises(UnsupportedError, match="shared-device mode: .*torch sees no CUDA"):
        launch.init_ranks(environ={launch.ENV: "1", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    assert time.monotonic() - t0 < 5  # before any process group: nothing waits for the other rank
    assert not torch.distributed.is_initialized()


def _probe_worker(rank, world, port, out):
    import torch.distributed as dist

    from portvlm.testing.distributed import gloo_group

    with gloo_group(rank, world, port, timeout_s=30):
        real = launch.collective_reasons(torch.device("cpu"))  # what portvlm.distributed issues, on gloo/CPU

        def lacking():
            raise RuntimeError("ProcessGroupGloo does not support reduce_scatter on CUDA tensors\nmore detail")

        injected = launch.collective_reasons("cpu", probes=[("reduce_scatter_tensor(SUM)", lacking),
                                                            ("all_reduce(SUM)", lambda: dist.all_reduce(torch.ones(1)))])
        after = torch.ones(1)
        dist.all_reduce(after)  # the ranks are still in step after a refused probe
        if rank == 0:
            torch.save({"real": real, "injected": injected, "after": float(after)}, out)


@newest_only("the collective probe is torch's gloo alone")
def test_the_collective_probe_names_what_gloo_lacks_and_keeps_ranks_in_step(tmp_path):
    from portvlm.testing.distributed import load_result, spawn

    out = str(tmp_path / "probe.pt")
    spawn(_probe_worker, 2, out, timeout_s=120)
    got = load_result(out, "the collective probe")
    assert got["real"] == [], got["real"]  # every collective of portvlm.distributed runs on gloo (CPU tensors)
    assert got["injected"] == ["reduce_scatter_tensor(SUM) on cpu tensors: RuntimeError: ProcessGroupGloo does not "
                               "support reduce_scatter on CUDA tensors"], got["injected"]
    assert got["after"] == 2.0


def test_topology_is_what_every_result_records():
    t = launch.Topology(2, 1, "gloo", "cuda", True, 0.5, launch.NOTE, "expandable_segments:True")
    assert t.as_dict() == {"world_size": 2, "devices": 1, "transport": "gloo", "device_type": "cuda",
                           "shared_device": True, "memory_fraction_per_rank": 0.5,
                           "note": "ranks share one GPU; collectives go through the host; times are not NCCL times",
                           "allocator": "expandable_segments:True"}


def test_the_allocator_setting_is_recorded_whichever_variable_sets_it():
    assert launch.allocator_setting({}) == "default"
    assert launch.allocator_setting({"PYTORCH_CUDA_ALLOC_CONF": " "}) == "default"
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        assert launch.allocator_setting({name: "expandable_segments:True"}) == "expandable_segments:True"
    # torch releases disagree on which name wins: two different settings are both recorded
    both = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": "max_split_size_mb:128"}
    assert launch.allocator_setting(both) == ("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; "
                                              "PYTORCH_ALLOC_CONF=max_split_size_mb:128")
