"""Testing ``portvlm.distributed`` on one machine: N gloo ranks under a deadline, and the rows and faults the checks use.

    from portvlm.testing.distributed import gloo_group, spawn

    def worker(rank, world, port, out):
        with gloo_group(rank, world, port):
            ...  # collectives
            if rank == 0:
                torch.save(result, out)

    spawn(worker, 2, out, timeout_s=120)   # RankError names a rank that raised, died or outlived the deadline

The one multi-process harness of portvlm: the cell's gloo checks (``portvlm.suites``), the tests and the benchmarks'
CPU smokes use it. Nothing here imports torch until it is called.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time

PG_TIMEOUT_S = 60  # the gloo group's own timeout: a rank stuck in a collective raises after this
GRACE_S = 5.0  # after the first failure, how long the other ranks get to end before they are killed


class RankError(RuntimeError):
    """A spawned rank raised, died without raising, or was still running at the deadline; ``ranks`` names them."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the rendezvous port of one spawn)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_file() -> str:
    """A fresh file path for one spawn's rendezvous (``torch.distributed.FileStore``): unlike a port that was free
    a moment ago, nothing else on the machine can take it before rank 0 binds it (gloo's own connections take
    ephemeral ports, and two test workers spawn at once)."""
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix="portvlm-rdzv-"), "store")


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int | str, *, timeout_s: float = PG_TIMEOUT_S, threads: int = 1):
    """This process as gloo rank ``rank`` of ``world``, destroyed on exit. ``port``: the rendezvous — a file path
    (what :func:`spawn` passes: race-free) or a TCP port on 127.0.0.1.

    ``threads``: torch's intra-op threads per rank (1: N ranks share the machine's cores without oversubscribing)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=timeout_s)
    if isinstance(port, str):
        dist.init_process_group("gloo", init_method=f"file://{port}", rank=rank, world_size=world, timeout=timeout)
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may never reach one (spawn ends them)
        raise
    # Every rank done before any tears its connections down: a peer that closes while another still reads its last
    # collective ends that one with "terminate called without an active exception" (SIGABRT; seen once under load)
    dist.barrier()
    dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout_s: float, what: str | None = None, tcp: bool = False) -> None:
    """Run ``fn(rank, world, rendezvous, *args)`` in ``world`` spawned processes (``rendezvous``: a fresh file path
    for :func:`gloo_group`; with ``tcp``, a port free a moment ago, for code that rendezvouses through
    ``MASTER_PORT`` as under torchrun); wait at most ``timeout_s`` seconds.

    Raises ``RankError`` naming the rank that raised (with its traceback), the rank that died without raising
    (exit code or signal), or the ranks still running at the deadline; the other ranks are ended first, so nothing
    is left behind and nothing waits longer than ``timeout_s`` plus a few seconds' grace. Files the ranks wrote
    before the failure stay where they are (the harness never deletes anything).
    """
    import torch.multiprocessing as mp

    name = what or getattr(fn, "__qualname__", repr(fn))
    rdzv = free_port() if tcp else rendezvous_file()
    ctx = mp.start_processes(fn, args=(world, rdzv, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.5, grace_period=GRACE_S):
            if time.monotonic() > deadline:
                alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
                _end(ctx.processes)
                raise RankError(
                    f"{name}: rank{'s' if len(alive) > 1 else ''} {', '.join(map(str, alive))} of {world} still running "
                    f"after the {timeout_s:g}s deadline (stuck in a collective, or waiting for a rank that is); killed. "
                    "If the work is only slow, raise timeout_s", alive)
    except mp.ProcessRaisedException as e:
        raise RankError(f"{name}: rank {e.error_index} of {world} raised (the other ranks were ended):{e.msg}",
                        [e.error_index]) from e
    except mp.ProcessExitedException as e:
        how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
        raise RankError(f"{name}: rank {e.error_index} of {world} died without a Python exception ({how}: killed, "
                        "out of memory, or os._exit); the other ranks were ended", [e.error_index]) from e


def _end(processes) -> None:
    """Kill what is still alive and reap it (a killed rank leaves no zombie and no open port)."""
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(timeout=GRACE_S)


def load_result(path, what: str):
    """``torch.load`` of the file rank 0 wrote; a missing file says which run did not write it."""
    import torch

    if not os.path.exists(path):
        raise RankError(f"{what}: every rank exited cleanly but rank 0 wrote no result at {path}", [0])
    return torch.load(path, weights_only=False)


# ---------------------------------------------------------------------------------------------------------------
# What the checks of portvlm.distributed look at
# ---------------------------------------------------------------------------------------------------------------


def straddles(row: dict, sp: int, vision_tokens=None) -> dict:
    """Which SP rank boundaries cut a sample / a vision-token run (the cases a wrong implementation gets wrong)."""
    import torch

    from portvlm.distributed.ulysses import split_bounds
    from portvlm.models.family import IMG, VID

    vision_tokens = vision_tokens or (IMG, VID)
    ids = row["input_ids"][0]
    cu = set(int(c) for c in row["cu_seqlens"].tolist())
    cuts = [lo for lo, _ in split_bounds(ids.shape[0], sp)[1:]]
    is_vis = torch.isin(ids, torch.tensor(vision_tokens))
    return {
        "cuts": cuts,
        "sample_cut": [c for c in cuts if c not in cu],
        "vision_cut": [c for c in cuts if 0 < c < ids.shape[0] and bool(is_vis[c - 1]) and bool(is_vis[c])],
    }


def plant_inf(model) -> str:
    """Put an inf into this rank's shard of one gradient (the last decoder layer's first non-empty one); its name."""
    import torch

    for name, p in reversed(list(model.named_parameters())):
        local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if local is not None and local.numel() and "layers" in name:
            with torch.no_grad():
                local.view(-1)[0] = float("inf")
            return name.removeprefix("module.")
    raise RuntimeError("no decoder-layer gradient shard on this rank to plant an inf in")
