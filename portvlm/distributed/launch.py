"""Starting the ranks of a run: one GPU per rank over NCCL, or — shared-device mode — every rank on one GPU over gloo.

    ranks = portvlm.distributed.init_ranks()            # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ranks = portvlm.distributed.init_ranks(shared_device=True)   # or PORTVLM_SHARED_DEVICE=1 torchrun ...

Shared-device mode (issue 23) runs a world of N ranks where only one GPU is lent: every rank takes ``cuda:0``, the
process group is gloo (NCCL refuses two ranks on one GPU: "Duplicate GPU detected"), and each rank caps its
allocator at ``1/N`` of the GPU (``torch.cuda.set_per_process_memory_fraction``; ``memory_fraction=`` or
``PORTVLM_SHARED_DEVICE_MEMORY_FRACTION`` overrides), so "per-rank memory" means what it would on N GPUs of 1/N the
size. gloo moves every collective through host memory: results are numerically those of N ranks, but step times
are NOT NCCL times and must never be quoted as speed. Every result records ``topology()``.

Before any work the mode runs every collective ``portvlm.distributed`` uses once on a CUDA tensor; one that this
torch's gloo lacks is refused with its name (an error on every rank, in bounded time), never left to hang later.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass

ENV = "PORTVLM_SHARED_DEVICE"
ENV_FRACTION = "PORTVLM_SHARED_DEVICE_MEMORY_FRACTION"
NOTE = "ranks share one GPU; collectives go through the host; times are not NCCL times"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Topology:
    """What every distributed result records: ranks, devices, transport (and, shared, the cap and the caveat)."""

    world_size: int
    devices: int
    transport: str  # "nccl" | "gloo"
    device_type: str  # "cuda" | "cpu"
    shared_device: bool = False
    memory_fraction_per_rank: float | None = None
    note: str | None = None
    allocator: str | None = None  # CUDA: the caching allocator's settings (``allocator_setting``); CPU: None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size, its device and the run's topology."""

    rank: int
    world: int
    local_rank: int
    device: object  # torch.device
    topology: Topology


# The caching allocator's settings (https://pytorch.org/docs/stable/notes/cuda.html#memory-management). Which name
# wins when several are set changed between torch releases (c10/core/AllocatorConfig.h), so every one set is recorded.
ALLOC_ENVS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")


def allocator_setting(environ=None) -> str:
    """The GPU allocator's settings from the environment (``"default"`` when none): a longest-row figure depends on
    them (``expandable_segments:True`` avoids the fragmentation that fails a large request below the cap)."""
    env = os.environ if environ is None else environ
    found = {name: env[name].strip() for name in ALLOC_ENVS if env.get(name, "").strip()}
    if len(set(found.values())) == 1:
        return next(iter(found.values()))
    return "; ".join(f"{name}={value}" for name, value in found.items()) or "default"


def shared_device_requested(flag: bool | None = None, environ=None) -> bool:
    """``flag`` when given, else ``PORTVLM_SHARED_DEVICE`` (1/true/yes/on or 0/false/no/off/unset)."""
    if flag is not None:
        return bool(flag)
    raw = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{ENV}={raw!r}: set it to 1 (every rank on one GPU, gloo) or 0 (one GPU per rank)")


def memory_fraction(world: int, override: float | None = None, environ=None) -> float:
    """The per-rank share of the GPU: ``override``, else ``PORTVLM_SHARED_DEVICE_MEMORY_FRACTION``, else ``1/world``."""
    env = os.environ if environ is None else environ
    if override is None and env.get(ENV_FRACTION, "").strip():
        try:
            override = float(env[ENV_FRACTION])
        except ValueError:
            raise ValueError(f"{ENV_FRACTION}={env[ENV_FRACTION]!r} is not a number; give a fraction in (0, 1], "
                             f"e.g. {1 / world:g} for {world} ranks") from None
    return 1.0 / world if override is None else float(override)


def shared_device_reasons(*, world: int, local_world: int | None, cuda_devices: int, backend: str | None,
                          fraction: float) -> list[str]:
    """Why shared-device mode cannot run here (empty: it can); pure, so the refusals are tested without a GPU."""
    reasons = []
    if cuda_devices < 1:
        reasons.append("shared-device mode puts every rank on one GPU, but torch sees no CUDA/ROCm device; on the "
                       "CPU run without it (gloo on the CPU is already the default there)")
    if backend not in (None, "gloo"):
        reasons.append(f"the process group backend is {backend!r}: NCCL refuses two ranks on one GPU ('Duplicate "
                       "GPU detected') and only gloo can share one; drop the backend choice or the shared-device flag")
    if local_world is not None and local_world != world:
        reasons.append(f"LOCAL_WORLD_SIZE={local_world} of WORLD_SIZE={world}: ranks on other hosts cannot share "
                       "this host's GPU; run every rank on one host (torchrun --nnodes 1)")
    if not 0.0 < fraction <= 1.0:
        reasons.append(f"per-rank memory fraction {fraction:g} is outside (0, 1]; give e.g. {1 / max(world, 1):g} "
                       f"for {world} ranks ({ENV_FRACTION})")
    return reasons


def _probes(device):
    """``[(name, call)]``: every collective portvlm.distributed issues, on ``device`` tensors of the default group."""
    import torch
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    world = dist.get_world_size()

    def t(n=1):
        return torch.ones(n * world, device=device)

    def a2a():
        out = all_to_all_single_autograd(t(), [1] * world, [1] * world, dist.group.WORLD)
        return out.wait() if hasattr(out, "wait") else out

    return [
        ("all_reduce(SUM)", lambda: dist.all_reduce(t())),  # loss and token counts
        ("all_reduce(MAX)", lambda: dist.all_reduce(t(), op=dist.ReduceOp.MAX)),  # GradScaler's found_inf (DTensor)
        ("broadcast", lambda: dist.broadcast(t(), src=0)),
        ("all_gather_into_tensor", lambda: dist.all_gather_into_tensor(t(world), t())),  # FSDP2 unshard
        ("reduce_scatter_tensor(SUM)", lambda: dist.reduce_scatter_tensor(t(), t(world))),  # FSDP2 gradients
        ("all_to_all_single", lambda: dist.all_to_all_single(t(), t())),  # Ulysses, vision features
        ("functional all_to_all_single_autograd", a2a),
    ]


def collective_reasons(device, probes=None) -> list[str]:
    """Run each collective once on ``device`` (default group); why any cannot run with this backend (empty: all can).

    Every rank runs the same probes in the same order, and an unsupported collective raises on every rank alike
    (gloo checks the op and the tensor's device before it talks), so the ranks agree on the answer.
    """
    import torch

    reasons = []
    for name, call in probes if probes is not None else _probes(device):
        try:
            call()
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reasons.append(f"{name} on {torch.device(device).type} tensors: {type(exc).__name__}: {first[:200]}")
    return reasons


def init_ranks(*, shared_device: bool | None = None, backend: str | None = None, fraction: float | None = None,
               timeout_s: float = 300.0, environ=None) -> Ranks:
    """Initialise the default process group for this rank (torchrun's environment) and pick its device.

    Shared-device mode (``shared_device=True`` or ``PORTVLM_SHARED_DEVICE=1``): gloo, ``cuda:0`` for every rank,
    memory capped at ``fraction`` (default ``1/world``), every collective probed first; refused with the reasons
    where it cannot work. Otherwise: ``backend`` or nccl with one GPU per local rank where CUDA is available, gloo on
    the CPU where it is not. The group's timeout makes a rank that dies end the others, not hang them.
    """
    import torch
    import torch.distributed as dist

    from portvlm.errors import UnsupportedError

    env = os.environ if environ is None else environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", rank))
    timeout = datetime.timedelta(seconds=timeout_s)
    if shared_device_requested(shared_device, env):
        share = memory_fraction(world, fraction, env)
        local_world = int(env["LOCAL_WORLD_SIZE"]) if env.get("LOCAL_WORLD_SIZE") else None
        if dist.is_initialized():
            backend = backend or dist.get_backend()
        reasons = shared_device_reasons(world=world, local_world=local_world, backend=backend, fraction=share,
                                        cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if reasons:
            raise UnsupportedError("shared-device mode: " + "; ".join(reasons))
        # CUDA is initialised and cuda:0 chosen BEFORE any DeviceMesh exists: a mesh sets LOCAL_RANK's device itself
        # when CUDA is not initialised yet (torch/distributed/device_mesh.py), which is cuda:1 on a one-GPU host.
        torch.cuda.init()
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
        torch.cuda.set_per_process_memory_fraction(share, device)
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        reasons = collective_reasons(device)
        if reasons:
            dist.destroy_process_group()
            raise UnsupportedError(f"shared-device mode: torch {torch.__version__}'s gloo cannot run what "
                                   "portvlm.distributed needs on a GPU: " + "; ".join(reasons) +
                                   "; use one GPU per rank (NCCL, without the flag) or a torch whose gloo has them")
        topo = Topology(world, 1, "gloo", "cuda", True, round(share, 6), NOTE, allocator_setting(env))
        return Ranks(rank, world, local_rank, device, topo)
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend {backend!r}: portvlm.distributed runs on 'nccl' (one GPU per rank) or 'gloo'")
    if torch.cuda.is_available() and backend != "gloo":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device, timeout=timeout)
        return Ranks(rank, world, local_rank, device,
                     Topology(world, world, "nccl", "cuda", allocator=allocator_setting(env)))
    if backend == "nccl":
        raise UnsupportedError("backend 'nccl' needs CUDA, and torch sees no CUDA device; use gloo on the CPU")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    return Ranks(rank, world, local_rank, torch.device("cpu"), Topology(world, 0, "gloo", "cpu"))
