"""portvlm.distributed on GPUs: FSDP2 data parallel, Ulysses SP, fp16 mixed precision, a 7B-sized step (issues 12,
22, 23). One command runs one or more parts; each part writes ``distributed_<part>_<topology>.json`` to ``--out``
(default ``$OUT``) and ``benchmarks/results/`` as it goes (a row at a time: a run cut short keeps what it measured),
prints a short table last, and exits 1 if any row failed (a non-finite loss is a failure, never a figure).

One GPU per rank (NCCL; multicast stays off, as the shared machines require):

    torchrun --nproc_per_node N benchmarks/distributed_train.py dp grads scaler fp16rows
    torchrun --nproc_per_node N benchmarks/distributed_train.py sp

Every rank on ONE GPU (shared-device mode, ``portvlm.distributed.launch``: gloo, each rank capped at 1/N of the GPU;
``PORTVLM_SHARED_DEVICE=1`` does the same as the flag). Numerics are those of N ranks; times are NOT NCCL times:

    torchrun --nproc_per_node 2 benchmarks/distributed_train.py dp grads scaler fp16rows --shared-device   # ~5 min
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \\
    torchrun --nproc_per_node 2 benchmarks/distributed_train.py sp --shared-device --search-start 131072 \\
        --budget-s 460                                                                                 # <= 9 min

    torchrun --nproc_per_node 2 benchmarks/distributed_train.py dp grads scaler fp16rows sp --smoke   # CPU, gloo, tiny

Parts (Qwen2.5-VL at 7B widths, Qwen3-VL at 8B widths, few layers, random weights; the sm90 policy: bf16,
``hardware`` on sm90; the sm70 policy: fp16, ``emulated`` off Volta):

- ``dp``: a DIFFERENT packed row per rank; loss, every gradient and the parameters after one SGD step against one
  process on the union of the rows.
- ``grads``: SP=N vs one process (SP=1) on one row of >= 16 images whose samples and images straddle the rank
  boundaries: loss within the loss tolerance, each parameter's gradient within the table's backward rtol (relative
  norm error); a negative control (per-rank positions) must fail the same check.
- ``scaler``: the fp16 recipe (``parallelize``'s default mixed precision: fp32 shards, fp16 compute, fp32 reduce,
  ``torch.amp.GradScaler``) for DP=N and SP=N: an inf planted in one rank's gradient shard makes EVERY rank skip
  the step and halve its scale; the next step is taken everywhere.
- ``fp16rows``: the sm70 policy (fp16) under SP=N on a row with >= 32 images and on a video row of >= 256 frames:
  loss finite and within the fp16 loss tolerance of an fp32 one-process reference (issue 22's NaN rows).
- ``sp``: per policy, the longest packed row (Qwen2.5-VL, 4 text layers, 8 vision blocks at 7B widths; 1–4 images of
  256 tokens per ~n/8-token sample) that trains one step with SP=1 (mesh (N,1): each rank the whole row) and with
  SP=N (mesh (1,N)) at equal per-rank memory, with per-rank peak memory and the allocator's settings (topology):
  a bracketing search — ``--search-start`` tokens, doubling until a row does not train, then geometric bisection
  until the shortest row that did not train is within ``--search-precision`` (5%) of the longest that did or the
  search's time share (SP=1 ~40% of the policy's, SP=N the rest) is spent. SP=N probes 1.8 × SP=1's shortest failing
  row right after its first row, so one probe decides the 1.8× target (it trains: pass; it does not: the
  bisection runs below it). The verdict comes from both searches' bounds, never from the midpoint. And the loss of
  SP=N vs SP=1 on the searches' first row (``--search-start`` tokens).
- ``size``: Qwen2.5-VL-7B dimensions, FSDP2 + activation checkpointing: sm70 vs flash vs padded sdpa (issue 12).

``--budget-s`` (default 450) bounds one command: what does not fit is recorded ``not_run`` (exit 3), never passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
import weakref
from pathlib import Path

for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(key, value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import portvlm  # noqa: E402
from portvlm.distributed import enable_activation_checkpointing, make_mesh, pack, parallelize  # noqa: E402
from portvlm.models import inputs as model_inputs  # noqa: E402
from portvlm.models import qwen, tiny  # noqa: E402
from portvlm.shims import model_io  # noqa: E402
from portvlm.testing import benchmark  # noqa: E402
from portvlm.testing.distributed import plant_inf, straddles  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "V100": 125.0}  # dense bf16/fp16 tensor-core peaks
QWEN25_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                      num_hidden_layers=28, vocab_size=152064, head_dim=128)
QWEN25_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        fullatt_block_indexes=[7, 15, 23, 31])
QWEN3_8B_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936)
QWEN3_8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
MROPE = {"qwen2_5vl": [16, 24, 24], "qwen3vl": [24, 20, 20]}
POLICIES = ("sm90", "sm70")
# The packed-row text kernel per policy on a GPU (--text-backend auto): every policy's own text choice is sdpa_masked,
# whose dense [S, S] mask (40 GB at 200k tokens) would decide the longest row, for SP=1 and SP=N alike (each SP rank
# sees the whole row for its heads). sm90: torch's FlashAttention-2 varlen; sm70: the cutlass mem-efficient varlen
# kernel, which is what runs on a V100 (fp16/fp32 below sm80) — as in the size part. Recorded in every row.
TEXT_BACKENDS = {"sm90": "torch_varlen", "sm70": "efficient_varlen"}
SMOKE_RANK_TOKENS = 700
METRIC = ("per parameter: ‖g − g_ref‖ / max(rtol·‖g_fp32‖, 2·‖g_ref − g_fp32‖) <= 1 (grad_ratio; g_ref: one process in "
          "the policy's dtype, g_fp32: one process in fp32, rtol: the table's backward rtol); the SGD step likewise "
          "(step_ratio); grad_max_rel_err = max ‖g − g_ref‖/‖g_ref‖ for information")  # --smoke: a rank "runs out of memory" above this many tokens (exercises the search's OOM path)
MODELS = ("qwen2_5vl", "qwen3vl")
NAMES = {"qwen2_5vl": "Qwen2.5-VL-7B widths", "qwen3vl": "Qwen3-VL-8B widths"}


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------


# gloo's words when a peer left a collective (it raised alone, died, or timed out waiting in another collective)
GLOO_PEER_LOST = ("Connection closed by peer", "Timed out waiting", "Connection reset by peer", "Broken pipe")
BROKEN: dict = {}  # {"why": ...} once this process's group cannot run collectives any more (a peer left mid-step)
# A second gloo group for the benchmark's own bookkeeping (gather_rows, agree): a rank that ran out of memory alone
# gathers its result there while the others are still in the step's collectives on the default group. On one group
# the two collectives would pair up ("Received data size doesn't match": gloo aborts the process); on two, the
# others time out and then join the gather, so every rank's result is recorded and the search ends cleanly.
CONTROL: dict = {}


def peer_lost(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in GLOO_PEER_LOST)


def init(args):
    """This rank, the world, its device and the run's topology (``portvlm.distributed.launch.init_ranks``)."""
    from portvlm.distributed.launch import init_ranks

    # a rank that dies makes the others fail, not hang: a collective waits at most 150 s (gloo's largest, a
    # 200k-token row's all-to-all through host memory, took ~30 s on one H200)
    if args.smoke:
        ranks = init_ranks(shared_device=False, backend="gloo", timeout_s=args.pg_timeout_s)
    else:
        ranks = init_ranks(shared_device=args.shared_device, timeout_s=args.pg_timeout_s)
    import datetime

    if ranks.world > 1:  # twice the step's timeout: a rank waits here while another's collective times out
        CONTROL["group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2 * args.pg_timeout_s))
    return ranks.rank, ranks.world, ranks.device, ranks.device.type, ranks.topology


def widths(model_id: str, text_layers: int, vision_blocks: int):
    """The real model's widths with ``text_layers`` decoder layers and ``vision_blocks`` vision blocks."""
    if model_id == "qwen2_5vl":
        vision = dict(QWEN25_7B_VISION, depth=vision_blocks,
                      fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < vision_blocks]
                      or [vision_blocks // 2 - 1, vision_blocks - 1])
        return dict(QWEN25_7B_TEXT, num_hidden_layers=text_layers), vision
    deep = [i for i in (8, 16, 24) if i < vision_blocks] or list(range(1, vision_blocks))
    vision = dict(QWEN3_8B_VISION, depth=vision_blocks, deepstack_visual_indexes=deep[:text_layers])
    return dict(QWEN3_8B_TEXT, num_hidden_layers=text_layers), vision


def model_config(model_id, args):
    """The tiny config (``--smoke``) or the real widths with ``--text-layers`` / ``--vision-blocks``."""
    if args.smoke:
        return config(model_id, None, None)
    return config(model_id, *widths(model_id, args.text_layers, args.vision_blocks))


def describe(model_id, cfg, smoke):
    if smoke:
        return f"tiny {model_id}"
    return (f"{NAMES[model_id]} ({cfg.get_text_config().num_hidden_layers} text layers, {cfg.vision_config.depth} "
            "vision blocks; random weights)")


def config(model_id: str, text: dict | None, vision: dict | None):
    """The tiny config with real-sized layers (rebuilt from a dict so derived fields follow); None = tiny."""
    base = tiny.config(model_id)
    if text is None:
        return base
    d = base.to_dict()
    d["text_config"].update(text)
    d["text_config"].pop("layer_types", None)
    for attr in ("rope_scaling", "rope_parameters"):
        if isinstance(d["text_config"].get(attr), dict) and "mrope_section" in d["text_config"][attr]:
            d["text_config"][attr]["mrope_section"] = MROPE[model_id]
    d["vision_config"].update(vision)
    cfg = type(base)(**d)
    if not hasattr(cfg, "vocab_size"):
        cfg.vocab_size = cfg.get_text_config().vocab_size
    return cfg


def build(model_id, cfg, device, dtype, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cls = tiny.model_class(model_id)
    with torch.device(device):
        model = cls._from_config(cfg, attn_implementation=attn, torch_dtype=dtype)
    return model.to(device).train()


def sample(model_id, rng: random.Random, text_range, images_range, grids, seed):
    """One sample: text of a random length with 1–4 images spread through it; labels skip vision tokens."""
    n_img = rng.randint(*images_range)
    n_text = rng.randint(*text_range)
    cuts = sorted(rng.randint(1, max(1, n_text - 1)) for _ in range(n_img))
    segs, prev = [], 0
    g = torch.Generator().manual_seed(seed)
    for c in cuts:
        segs.append(model_inputs.Segment("text", torch.randint(3, 200, (max(1, c - prev),), generator=g).tolist()))
        segs.append(model_inputs.Segment("image", grid=rng.choice(grids)))
        prev = c
    segs.append(model_inputs.Segment("text", torch.randint(3, 200, (max(1, n_text - prev),), generator=g).tolist()))
    s = model_inputs.qwen_sequence(model_id, segs, seed=seed)
    labels = s["input_ids"].clone()
    for tok in (tiny.IMG, tiny.VID, tiny.VSTART, tiny.VEND):
        labels[labels == tok] = -100
    s["labels"] = labels
    return s


def to(row, device, dtype):
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in row.items()}


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def allocated_gib(device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_rows(obj, world):
    out = [None] * world
    dist.all_gather_object(out, obj, group=CONTROL.get("group"))
    return out


PART_POLICIES = {"scaler": ("sm70",), "fp16rows": ("sm70",)}  # the parts that run one policy whatever the host


class Report:
    """One part's ``BenchmarkRecord``: rows appended and written at once (rank 0), so a run cut short keeps every
    finished row. Evidence is the policies' own match of this host (``portvlm.testing.benchmark``)."""

    def __init__(self, part, args, rank, world, device, kind, topology):
        self.rank, self.args = rank, args
        where = ("shared1gpu" if topology.shared_device else f"{world}gpu") if kind == "cuda" else f"{world}proc"
        only = f"_{'-'.join(models_for(args))}" if args.models and part in ("dp", "grads", "fp16rows") else ""
        only += f"_{args.arch.replace(',', '-')}" if args.arch and part in ("dp", "grads", "sp") else ""
        self.name = f"distributed_{part}{only}_{where}{'_smoke' if args.smoke else ''}.json"
        archs = PART_POLICIES.get(part) or policies_for(kind, args)
        self.rec = benchmark.record("distributed_train", archs=archs, device=device, smoke=args.smoke,
                                    world_size=world, topology=topology, part=part, argv=sys.argv[1:])

    def add(self, row: dict) -> dict:
        row = {k: v for k, v in row.items()}
        self.rec.rows.append(row)
        self.flush()
        if self.rank == 0:
            print(json.dumps({k: v for k, v in row.items() if k not in ("trace", "per_rank")}), flush=True)
        return row

    def flush(self):
        # --out (default $OUT), and benchmarks/results/ unless a smoke (a CPU smoke leaves the checkout as it was)
        benchmark.write(self.rec, self.name, out_dir=self.args.out, rank=self.rank)


class Budget:
    """Wall-clock budget of one command: a row that no longer fits is recorded ``not_run``, never passed."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def agree(flag: bool, world: int) -> bool:
    """Every rank's flag (all ranks must take the same branch before the next collective)."""
    return all(gather_rows(bool(flag), world)) if world > 1 else bool(flag)


def finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def free(device=None):
    """Collect garbage and return cached CUDA blocks (``device`` None: whatever this process has)."""
    import gc

    gc.collect()
    if (device.type == "cuda") if device is not None else torch.cuda.is_available():
        torch.cuda.empty_cache()


def policy_evidence(arch: str, device) -> str:
    """``hardware`` when this host is ``arch`` (the matrix's match), else ``emulated`` (a CPU smoke included)."""
    from portvlm.policy import resolve_policy

    return str(resolve_policy(arch).host.evidence_for(arch))


# ---------------------------------------------------------------------------------------------------------------
# Shared by dp / grads / scaler / fp16rows: one process as the reference, the parallel run, the comparisons
# ---------------------------------------------------------------------------------------------------------------


def timed_step(pmodel, row, device, dtype, ref, allowed, rank, world):
    """One forward + backward of the parallel model on this rank's ``row`` (peak memory counted from here), timed,
    and its gradients against the reference's: ``(out, seconds, (diffs, missing, max rel, worst ratio, its name))``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    out = pmodel(**to(row, device, dtype))
    out.loss.backward()
    sync(device)
    step = time.perf_counter() - t0
    diffs, missing = sharded_diffs(pmodel, ref["grads"], rank, world)
    grad_rel, _ = worst_ratio(diffs)
    grad_err, grad_worst = worst_ratio(diffs, allowed)
    return out, step, (diffs, missing, grad_rel, grad_err, grad_worst)


def tolerances_for(arch, device, dtype):
    """``(loss (atol, rtol), grad rtol)`` from portvlm's tolerance table for this policy on this device (an emulated
    policy is held to the tolerance of the device it runs on: its kernels round as the host's do)."""
    loss = benchmark.loss_tolerance(dtype)
    return (loss["atol"], loss["rtol"]), benchmark.tolerance(arch, dtype, "bwd", device=device)["rtol"]


def one_process(model_id, cfg, arch, rows, device, *, dtype=None, ckpt=False, grads=True, seed=0):
    """The reference: one process, no FSDP, no SP (``ParallelModel`` at world 1) on all ``rows``: the mean token loss
    over every row, and the gradients by parameter name (in the compute dtype) with the parameters before the step."""
    model = build(model_id, cfg, device, torch.float32, seed=seed)
    with portvlm.patch(model, arch=arch, dtype=dtype) as handle:
        model.to(handle.dtype)
        if dtype is None:  # the fp32 references keep the policy's own kernels (the flash varlen one has no fp32)
            use_text_backend(handle, arch, device)
        if ckpt:
            enable_activation_checkpointing(model)
        with parallelize(model, handle) as single, \
                torch.set_grad_enabled(grads):
            sums, n = [], 0
            for r in rows:
                out = single(**to(r, device, handle.dtype))
                sums.append(out.loss * out.tokens)
                n += out.tokens
            loss = torch.stack(sums).sum() / n
            if grads:
                loss.backward()
    res = {"loss": float(loss.detach()), "dtype": handle.dtype}
    if grads:
        res["grads"] = {k: p.grad.detach() for k, p in model.named_parameters() if p.grad is not None}
        res["params"] = {k: p.detach() for k, p in model.named_parameters()}
    del model
    return res


def parallel_model(model_id, cfg, arch, device, dims, *, ckpt=False, master_fp32=True, fault=None, seed=0):
    """``portvlm.patch`` + ``parallelize`` over mesh ``dims``; weights as ``one_process`` builds them (same seed).

    ``master_fp32``: fp32 sharded weights with the policy's compute dtype and fp32 gradient reduction — the
    default for fp16 policies, asked for explicitly for bf16 so one SGD step compares at fp32 resolution.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = build(model_id, cfg, device, torch.float32, seed=seed)
    handle = portvlm.patch(model, arch=arch)
    model.to(handle.dtype)  # what a user does; the fp32 master copy is then exactly the compute weights
    use_text_backend(handle, arch, device)
    mp = "auto"
    if master_fp32 and handle.dtype != torch.float16 and handle.dtype != torch.float32:
        model.float()
        mp = MixedPrecisionPolicy(param_dtype=handle.dtype, reduce_dtype=torch.float32)
    pmodel = parallelize(model, handle, make_mesh(*dims, device.type), activation_checkpointing=ckpt, mp_policy=mp,
                         fault=fault)
    return pmodel, handle


def use_text_backend(handle, arch, device):
    """Point the handle's packed-row text kernel at ``TEXT_BACKENDS[arch]`` on a GPU (``--text-backend``)."""
    if device.type == "cuda" and TEXT_BACKENDS.get(arch):
        handle.state.text_backend = TEXT_BACKENDS[arch]


def text_kernel(arch, device) -> str:
    """What the rows record as the packed-row text kernel."""
    if device.type == "cuda" and TEXT_BACKENDS.get(arch):
        return TEXT_BACKENDS[arch]
    return "the policy's own"


def close(pmodel, handle, device):
    pmodel.close()
    handle.revert()
    free(device)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard_of(ref, t, rank, world):
    """This rank's shard of DTensor ``t`` and the slice of the full ``ref`` it holds (FSDP2: Shard(0) over the
    flattened mesh, ``torch.chunk`` semantics, coordinate = global rank); the whole tensors for another layout."""
    if not hasattr(t, "placements"):
        return t, ref
    local = t.to_local()
    chunks = torch.chunk(ref, world, dim=0)
    part = chunks[rank] if rank < len(chunks) else ref[:0]
    return (local, part) if tuple(local.shape) == tuple(part.shape) else (full(t), ref)


def sharded_diffs(pmodel, ref: dict, rank, world, of=lambda p: p.grad, ref_of=None):
    """Per parameter ``‖got − want‖`` and ``‖want‖`` over the whole tensor, computed shard by shard on every rank
    and summed with ONE all-reduce (nothing is gathered): ``({name: (diff, norm)}, names missing on one side)``."""
    names, stats, missing = [], [], []
    for k, p in pmodel.named_parameters():
        key = k.removeprefix("module.")
        t = of(p)
        if t is None or key not in ref:
            missing.append(key)
            continue
        local, part = _shard_of(ref[key] if ref_of is None else ref_of(key), t, rank, world)
        d = local.float() - part.float()
        stats.append(torch.stack([d.pow(2).sum(), part.float().pow(2).sum()]))
        names.append(key)
    if not stats:
        return {}, missing
    total = torch.stack(stats)
    if world > 1:
        dist.all_reduce(total)
    total = total.sqrt().tolist()
    return {n: (a, b) for n, (a, b) in zip(names, total, strict=True)}, missing


def worst_ratio(pairs: dict, denominator=None) -> tuple[float, str | None]:
    """The largest ``diff / norm`` (or ``diff / denominator[name]``) and its parameter."""
    ratios = {n: a / max(denominator[n] if denominator else b, 1e-30) for n, (a, b) in pairs.items()
              if denominator is None or n in denominator}
    if not ratios:
        return float("inf"), None
    name = max(ratios, key=lambda n: ratios[n])
    return ratios[name], name


def allowances(ref: dict, ref32: dict, rtol: float) -> tuple[dict, dict]:
    """Per parameter, how far a low-precision gradient may be from the low-precision one-process reference:
    ``max(rtol·‖g32‖, 2·‖g_ref − g32‖)``, and the noise ``‖g_ref − g32‖ / ‖g32‖`` itself.

    Two computations of one gradient in bf16/fp16 differ by about what each differs from the fp32 truth: for a
    reduction that nearly cancels (a random-init norm weight's gradient sums many tokens' terms), that is far more
    than ``rtol`` of the tiny result. The fp32 run measures this noise floor instead of assuming it; a wrong SP or
    DP (the negative control) is off by far more than both.
    """
    allowed, noise = {}, {}
    for k, g in ref.items():
        if k not in ref32:
            continue
        g32 = ref32[k].float()
        diff, norm = float((g.float() - g32).norm()), float(g32.norm())
        noise[k] = diff / max(norm, 1e-30)
        allowed[k] = max(rtol * norm, 2.0 * diff)
    return allowed, noise


def noisiest(noise: dict) -> dict | None:
    """The parameter whose low-precision reference gradient is farthest from fp32 (relative), and by how much."""
    if not noise:
        return None
    k = max(noise, key=lambda n: noise[n])
    return {"parameter": k, "rel": noise[k]}


def all_finite(pmodel, world) -> bool:
    """Every rank's gradient shards are finite (one all-reduce)."""
    bad = torch.zeros((), device=next(pmodel.parameters()).device)
    for p in pmodel.parameters():
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            bad += (~torch.isfinite(g)).sum().float()
    if world > 1:
        dist.all_reduce(bad)
    return float(bad) == 0.0


def row_with_images(model_id, n_images, n_tokens, grids, seed, smoke):
    """One packed row of several samples holding >= ``n_images`` images in total, about ``n_tokens`` tokens."""
    rng = random.Random(seed)
    samples, images, tokens, i = [], 0, 0, 0
    per = max(2, n_images // 4)
    text = (16, 48) if smoke else (max(64, n_tokens // 8), max(128, n_tokens // 4))
    while images < n_images or tokens < n_tokens:
        s = sample(model_id, rng, text, (per, per), grids, seed * 1000 + i)
        samples.append(s)
        images += int(s["image_grid_thw"].shape[0])
        tokens += int(s["input_ids"].shape[1])
        i += 1
    return pack(samples)


def video_row(model_id, frames, grid_hw, text_tokens, seed):
    """One row: a text sample, then a sample with one video of ``frames`` frames (temporal patches of 2)."""
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return model_inputs.Segment("text", torch.randint(3, 200, (n,), generator=g).tolist())

    t = frames // qwen.TEMPORAL_PATCH
    video = model_inputs.qwen_sequence(model_id, [words(text_tokens), model_inputs.Segment("video", grid=(t, *grid_hw)), words(16)],
                               seed=seed)
    lead = model_inputs.qwen_sequence(model_id, [words(text_tokens)], seed=seed + 1)
    for s in (lead, video):
        labels = s["input_ids"].clone()
        for tok in (tiny.IMG, tiny.VID, tiny.VSTART, tiny.VEND):
            labels[labels == tok] = -100
        s["labels"] = labels
        s.pop("attention_mask", None)
    return pack([lead, video])


def cuts(row, sp):
    """Where the SP split cuts the row: through samples and through vision-token runs (``straddles``)."""

    return straddles(row, sp)


def together(fn, world):
    """``fn()`` on every rank, then agree: if it raised on any rank, raise on EVERY rank naming the rank and its
    error. Work outside collectives (the one-process references) goes through this before any rank enters a
    collective again: a rank that ran out of memory alone would otherwise leave the others waiting in FSDP's
    all-gather until the process group's timeout."""
    try:
        value, error = fn(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        value, error = None, f"{type(exc).__name__}: {str(exc)[:300]}"
    errors = gather_rows(error, world) if world > 1 else [error]
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        value = None
        free()
        raise RuntimeError("; ".join(f"rank {r}: {e}" for r, e in bad))
    return value


def failed_row(row, exc):
    """``row`` failed with ``exc``. Only rank 0 writes the record, so every rank also prints its own error and trace
    to stderr: a rank that failed alone (the others then see gloo's "Connection closed by peer") names its cause."""
    trace = traceback.format_exc()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    print(f"[rank {rank}] {row.get('check', row.get('part', '?'))} {row.get('arch_policy', '')} failed: "
          f"{type(exc).__name__}: {exc}\n{trace}", file=sys.stderr, flush=True)
    return row | {"status": "fail", "error": f"{type(exc).__name__}: {str(exc)[:600]}", "trace": trace[-1500:]}


def policies_for(kind, args=None):
    """``--arch`` (comma-separated) when given, else both policies on a GPU and the CPU's own on the CPU."""
    if args is not None and args.arch:
        return tuple(args.arch.split(","))
    return POLICIES if kind == "cuda" else ("cpu",)


def run_rows(report, budget, items, fn, world):
    """``fn(item)`` for every item with the budget checked first (the same answer on every rank)."""
    for item, base in items:
        if not agree(budget.left() > 0, world):
            report.add(base | {"status": "not_run", "reason": "the command's --budget-s was spent before this row"})
            continue
        try:
            report.add(base | fn(item))
        except Exception as exc:  # noqa: BLE001 - a row that failed says why
            report.add(failed_row(base, exc))
        # after the except block has dropped the traceback (whose frames hold the row's models and activations):
        # a row that ran out of memory must not leave its memory to the next row
        free()


# ---------------------------------------------------------------------------------------------------------------
# dp: a different row per rank vs one process on the union
# ---------------------------------------------------------------------------------------------------------------


def part_dp(args, rank, world, device, kind, report, budget):
    items = []
    for model_id in models_for(args):
        for arch in policies_for(kind, args):
            base = {"check": "dp_vs_union", "model": model_id, "arch_policy": arch, "world_size": world,
                    "mesh": {"dp": world, "sp": 1}, "evidence": policy_evidence(arch, device)}
            items.append(((model_id, arch), base))

    def one(item):
        model_id, arch = item
        if tiny.is_available(model_id):
            raise RuntimeError("; ".join(tiny.is_available(model_id)))
        return dp_one(args, model_id, arch, rank, world, device)

    run_rows(report, budget, items, one, world)


def dp_one(args, model_id, arch, rank, world, device):
    cfg = model_config(model_id, args)
    rng = random.Random(1)
    text_range = (16, 64) if args.smoke else (128, 1024)
    grids = [(1, 8, 8), (1, 8, 12)] if args.smoke else [(1, 16, 16), (1, 24, 32)]
    # one DIFFERENT row per rank (2 samples each, different lengths; odd ranks' first sample has no image)
    all_rows = [pack([sample(model_id, rng, text_range, (0 if r % 2 else 1, 2), grids, 10 * r + i) for i in range(2)])
                for r in range(world)]
    ref = together(lambda: one_process(model_id, cfg, arch, all_rows, device), world)  # every rank: same rows
    dtype = ref["dtype"]
    (l_atol, l_rtol), g_rtol = tolerances_for(arch, device, dtype)
    allowed, noise = together(lambda: allowances(ref["grads"], one_process(
        model_id, cfg, arch, all_rows, device, dtype=torch.float32)["grads"], g_rtol), world)
    free(device)
    pmodel, handle = parallel_model(model_id, cfg, arch, device, (world, 1))
    out, step, (diffs, missing, grad_rel, grad_err, grad_worst) = timed_step(pmodel, all_rows[rank], device, dtype,
                                                                              ref, allowed, rank, world)
    # the parallel model starts from the reference's weights (the seeded builds agree), or nothing is compared
    start, _ = sharded_diffs(pmodel, ref["params"], rank, world, of=lambda p: p.detach())
    start_err, start_worst = worst_ratio(start)
    if start_err != 0.0:
        raise RuntimeError(f"{start_worst}: the parallel model's weights differ from the reference's before the step "
                           f"(relative {start_err:.3g}); the seeded builds disagree, nothing is compared")
    # one SGD step on the fp32 master shards vs the same step from the reference's weights and gradients (fp32)
    moved = torch.zeros((), device=device)
    with torch.no_grad():
        for p in pmodel.parameters():
            if p.grad is not None:
                delta = args.lr * p.grad
                p -= delta
                local = delta.to_local() if hasattr(delta, "to_local") else delta
                if local.numel():
                    moved = torch.maximum(moved, local.abs().max().float())
    if world > 1:
        dist.all_reduce(moved, op=dist.ReduceOp.MAX)
    grads = ref["grads"]
    after, _ = sharded_diffs(pmodel, ref["params"], rank, world, of=lambda p: p.detach(),
                             ref_of=lambda k: ref["params"][k].float() - args.lr * grads[k].float() if k in grads
                             else ref["params"][k].float())
    # ‖p_after − (p − lr·g_ref)‖ against lr × the gradient's allowance (+ fp32 rounding of the update, 4 ulp of p)
    step_err, step_worst = worst_ratio(after, {k: args.lr * allowed[k] + 2.0**-22 * float(ref["params"][k].float().norm())
                                               for k in grads if k in allowed})
    moved = float(moved)
    close(pmodel, handle, device)
    loss, ref_loss = float(out.loss_value), ref["loss"]
    loss_err = abs(loss - ref_loss)
    ok = (finite(loss) and loss_err <= l_atol + l_rtol * abs(ref_loss) and grad_err <= 1.0 and step_err <= 1.0
          and moved > 0 and not missing)
    return {"text_kernel": text_kernel(arch, device), "model_desc": describe(model_id, cfg, args.smoke), "dtype": str(dtype).removeprefix("torch."),
            "rows_tokens": [int(r["input_ids"].shape[1]) for r in all_rows], "union_loss": ref_loss, "dp_loss": loss,
            "loss_abs_err": loss_err, "loss_tolerance": [l_atol, l_rtol], "grad_ratio": grad_err,
            "grad_worst": grad_worst, "grad_max_rel_err": grad_rel, "step_ratio": step_err, "step_worst": step_worst,
            "param_max_change_in_step": moved, "grad_rtol": g_rtol, "grads_missing": missing[:5],
            "reference_noise": noisiest(noise), "metric": METRIC,
            "step_s": round(step, 3), "peak_GiB": peak_gib(device), "status": "pass" if ok else "fail"}


# ---------------------------------------------------------------------------------------------------------------
# grads: SP=N vs SP=1 on a row of >= 16 images straddling the rank boundaries
# ---------------------------------------------------------------------------------------------------------------


def part_grads(args, rank, world, device, kind, report, budget):
    items = []
    for model_id in models_for(args):
        for arch in policies_for(kind, args):
            base = {"check": "sp_vs_sp1", "model": model_id, "arch_policy": arch, "world_size": world,
                    "mesh": {"dp": 1, "sp": world}, "evidence": policy_evidence(arch, device)}
            items.append(((model_id, arch, None), base))
    # the negative control: vision features left in rank order, not sequence order — the same check must fail
    items.append((("qwen2_5vl", policies_for(kind, args)[0], "unordered_vision"),
                  {"check": "sp_vs_sp1", "model": "qwen2_5vl", "arch_policy": policies_for(kind, args)[0],
                   "world_size": world, "mesh": {"dp": 1, "sp": world}, "negative_control": "unordered_vision",
                   "evidence": policy_evidence(policies_for(kind, args)[0], device)}))

    def one(item):
        model_id, arch, fault = item
        if tiny.is_available(model_id):
            raise RuntimeError("; ".join(tiny.is_available(model_id)))
        res = sp_grads_one(args, model_id, arch, rank, world, device, fault)
        if fault:  # a negative control passes when the check it runs FAILS
            res["status"] = "pass" if res["status"] == "fail" else "fail"
            res["note"] = "negative control: the comparison must fail (it did)" if res["status"] == "pass" \
                else "negative control: the comparison did NOT fail — the check cannot tell a wrong SP"
        return res

    run_rows(report, budget, items, one, world)


def sp_grads_one(args, model_id, arch, rank, world, device, fault):
    cfg = model_config(model_id, args)
    grids = [(1, 8, 8), (1, 8, 12)] if args.smoke else [(1, 16, 16), (1, 16, 24), (1, 32, 32)]
    for seed in range(3, 43):  # the first seeded row whose split cuts through a sample AND an image
        # 4,096 tokens: each rank holds the bf16/fp16 and the fp32 one-process references (fp32 logits over a 152k
        # vocabulary are 2.3 GiB at this length) beside its shard, under half of one GPU in shared-device mode
        row = row_with_images(model_id, 16, 600 if args.smoke else 4096, grids, seed=seed, smoke=args.smoke)
        where = cuts(row, world)
        if where["sample_cut"] and where["vision_cut"]:
            break
    ref = together(lambda: one_process(model_id, cfg, arch, [row], device), world)
    dtype = ref["dtype"]
    (l_atol, l_rtol), g_rtol = tolerances_for(arch, device, dtype)
    allowed, noise = together(lambda: allowances(ref["grads"], one_process(
        model_id, cfg, arch, [row], device, dtype=torch.float32)["grads"], g_rtol), world)
    free(device)
    pmodel, handle = parallel_model(model_id, cfg, arch, device, (1, world), fault=fault)
    out, step, (diffs, missing, grad_rel, grad_err, grad_worst) = timed_step(pmodel, row, device, dtype, ref, allowed,
                                                                              rank, world)
    close(pmodel, handle, device)
    del ref["grads"], ref["params"]
    loss, ref_loss = float(out.loss_value), ref["loss"]
    loss_err = abs(loss - ref_loss)
    straddle = bool(where["sample_cut"]) and bool(where["vision_cut"])
    ok = finite(loss) and loss_err <= l_atol + l_rtol * abs(ref_loss) and grad_err <= 1.0 and not missing
    return {"text_kernel": text_kernel(arch, device), "model_desc": describe(model_id, cfg, args.smoke), "dtype": str(dtype).removeprefix("torch."),
            "row_tokens": int(row["input_ids"].shape[1]), "row_images": int(row["image_grid_thw"].shape[0]),
            "cuts": where, "straddles": straddle, "sp1_loss": ref_loss, "sp_loss": loss, "loss_abs_err": loss_err,
            "loss_tolerance": [l_atol, l_rtol], "grad_ratio": grad_err, "grad_worst": grad_worst,
            "grad_max_rel_err": grad_rel, "grad_rtol": g_rtol, "grads_missing": missing[:5],
            "reference_noise": noisiest(noise), "metric": METRIC,
            "step_s": round(step, 3), "peak_GiB": peak_gib(device),
            "status": "pass" if ok and (straddle or args.smoke) else "fail"}


# ---------------------------------------------------------------------------------------------------------------
# scaler: fp16 mixed precision + GradScaler, an inf in one rank's gradients
# ---------------------------------------------------------------------------------------------------------------


def part_scaler(args, rank, world, device, kind, report, budget):
    arch = "sm70"  # the fp16 policy (emulated off Volta; on the CPU too)
    items = []
    for dims in ((world, 1), (1, world)):
        base = {"check": "grad_scaler_skip", "model": "qwen2_5vl", "arch_policy": arch, "world_size": world,
                "mesh": {"dp": dims[0], "sp": dims[1]}, "evidence": policy_evidence(arch, device)}
        items.append((dims, base))
    run_rows(report, budget, items, lambda dims: scaler_one(args, arch, dims, rank, world, device), world)


def scaler_one(args, arch, dims, rank, world, device):

    model_id = "qwen2_5vl"
    cfg = model_config(model_id, args)
    grids = [(1, 8, 8)] if args.smoke else [(1, 16, 16), (1, 24, 32)]
    rng = random.Random(2)
    rows = [pack([sample(model_id, rng, (16, 64) if args.smoke else (256, 1024), (1, 2), grids, 50 * r + i)
                  for i in range(2)]) for r in range(dims[0])]
    pmodel, handle = parallel_model(model_id, cfg, arch, device, dims)  # fp16: the default mixed precision
    plant = world - 1
    record = {"sharded_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in pmodel.parameters()}),
              "steps": []}
    opt = torch.optim.SGD(pmodel.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    row = to(rows[pmodel.layout.dp_rank], device, handle.dtype)
    for step in range(2):
        out = pmodel(**row)
        scaler.scale(out.loss).backward()
        planted = plant_inf(pmodel) if step == 0 and rank == plant else None
        before = [p.detach().to_local().clone() for p in pmodel.parameters()]
        scale = float(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        moved = sum(not torch.equal(p.detach().to_local(), b) for p, b in zip(pmodel.parameters(), before, strict=True))
        record["steps"].append({"planted_in": planted, "loss": float(out.loss_value), "scale_before": scale,
                                "scale_after": float(scaler.get_scale()), "params_moved": moved, "skipped": moved == 0})
    close(pmodel, handle, device)
    per_rank = gather_rows(record, world)
    ok = all(
        r["sharded_dtypes"] == ["float32"]
        and all(finite(s["loss"]) for s in r["steps"])
        and r["steps"][0]["skipped"] and r["steps"][0]["scale_after"] == r["steps"][0]["scale_before"] / 2
        and not r["steps"][1]["skipped"] and r["steps"][1]["scale_after"] == r["steps"][0]["scale_after"]
        for r in per_rank)
    return {"text_kernel": text_kernel(arch, device), "model_desc": describe(model_id, cfg, args.smoke), "dtype": str(handle.dtype).removeprefix("torch."),
            "planted_rank": plant, "planted_in": per_rank[plant]["steps"][0]["planted_in"],
            "skipped_on_ranks": [r["steps"][0]["skipped"] for r in per_rank],
            "scales": [[s["scale_before"], s["scale_after"]] for s in per_rank[0]["steps"]],
            "second_step_taken_on_ranks": [not r["steps"][1]["skipped"] for r in per_rank],
            "per_rank": per_rank, "status": "pass" if ok else "fail"}


# ---------------------------------------------------------------------------------------------------------------
# fp16rows: the sm70 policy on a >= 32-image row and a >= 256-frame video row vs an fp32 reference
# ---------------------------------------------------------------------------------------------------------------


def part_fp16rows(args, rank, world, device, kind, report, budget):
    items = []
    for model_id in models_for(args):
        for what in ("images", "video"):
            base = {"check": "fp16_row_vs_fp32", "model": model_id, "arch_policy": "sm70", "world_size": world,
                    "mesh": {"dp": 1, "sp": world}, "row": what, "evidence": policy_evidence("sm70", device)}
            items.append(((model_id, what), base))

    def one(item):
        model_id, what = item
        if tiny.is_available(model_id):
            raise RuntimeError("; ".join(tiny.is_available(model_id)))
        return fp16_row_one(args, model_id, what, world, device)

    run_rows(report, budget, items, one, world)


def fp16_row_one(args, model_id, what, world, device):
    cfg = model_config(model_id, args)
    if what == "images":
        grids = [(1, 8, 8)] if args.smoke else [(1, 16, 16), (1, 16, 24), (1, 24, 24)]
        row = row_with_images(model_id, 32, 600 if args.smoke else 12288, grids, seed=7, smoke=args.smoke)
        shape = {"images": int(row["image_grid_thw"].shape[0])}
    else:
        frames = 8 if args.smoke else 256
        row = video_row(model_id, frames, (8, 8) if args.smoke else (16, 16), 32 if args.smoke else 512, seed=8)
        shape = {"video_frames": int(row["video_grid_thw"][:, 0].sum()) * qwen.TEMPORAL_PATCH}
    ref = together(lambda: one_process(model_id, cfg, "sm70", [row], device, dtype=torch.float32, grads=False),
                   world)  # fp32, one process
    pmodel, handle = parallel_model(model_id, cfg, "sm70", device, (1, world), ckpt=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = pmodel(**to(row, device, handle.dtype))
    out.loss.backward()
    grads_finite = all_finite(pmodel, world)
    dtype = handle.dtype
    close(pmodel, handle, device)
    (l_atol, l_rtol), _ = tolerances_for("sm70", device, dtype)
    loss, ref_loss = float(out.loss_value), ref["loss"]
    err = abs(loss - ref_loss) if finite(loss) else float("inf")
    ok = finite(loss) and grads_finite and err <= l_atol + l_rtol * abs(ref_loss)
    return {"text_kernel": text_kernel("sm70", device), "model_desc": describe(model_id, cfg, args.smoke), "dtype": str(dtype).removeprefix("torch."),
            "row_tokens": int(row["input_ids"].shape[1]), **shape, "loss": loss, "fp32_reference_loss": ref_loss,
            "loss_abs_err": err, "loss_tolerance": [l_atol, l_rtol], "grads_finite": grads_finite,
            "peak_GiB": peak_gib(device), "status": "pass" if ok else "fail"}


# ---------------------------------------------------------------------------------------------------------------
# 2. size
# ---------------------------------------------------------------------------------------------------------------


class Recorder:
    """Records every attention kernel call's shapes, cu_seqlens and backend while ``on`` (one forward), through the
    opt-in ``portvlm.backends.kernels.trace``."""

    def __init__(self):
        self._trace, self.calls = None, []

    @property
    def on(self) -> bool:
        return self._trace is not None

    @on.setter
    def on(self, value: bool) -> None:
        from portvlm.backends import kernels

        if value and self._trace is None:
            self._trace = kernels.trace()
            self._seen = self._trace.__enter__()
        elif not value and self._trace is not None:
            self.calls = [(c.q_shape, c.k_shape, c.cu_seqlens, c.max_seqlen, c.causal, c.dtype) for c in self._seen]
            self._trace.__exit__(None, None, None)
            self._trace = None

    def close(self):
        self.on = False


def kernel_seconds(calls, backend, device, dtype, recompute: bool, reps=3) -> float:
    """fwd+bwd (+ one more fwd with activation checkpointing) of every recorded call, alone, with ``backend``."""
    from portvlm.backends import kernels

    total = 0.0
    cache: dict = {}
    for qs, ks, cu, mx, causal, _ in calls:
        key = (qs, ks, cu, causal)
        if key not in cache:
            q = torch.randn(qs, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(ks, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(ks, device=device, dtype=dtype, requires_grad=True)
            cut = torch.tensor(cu, device=device, dtype=torch.int32)
            times = []
            for _ in range(reps + 1):
                sync(device)
                t0 = time.perf_counter()
                out = kernels.varlen_attention(q, k, v, cut, mx, backend=backend, causal=causal)
                out.backward(torch.ones_like(out))
                if recompute:
                    with torch.no_grad():
                        kernels.varlen_attention(q, k, v, cut, mx, backend=backend, causal=causal)
                sync(device)
                times.append(time.perf_counter() - t0)
            cache[key] = statistics.median(times[1:])
        total += cache[key]
    return total


def model_flops(cfg, samples) -> float:
    """Training FLOPs (6 × params × tokens + causal attention) of the text decoder and the vision tower."""
    t = cfg.get_text_config()
    v = cfg.vision_config
    L, d, f = t.num_hidden_layers, t.hidden_size, t.intermediate_size
    hd = getattr(t, "head_dim", None) or d // t.num_attention_heads
    kv = t.num_key_value_heads * hd
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f
    text_params = L * per_layer + d * t.vocab_size
    vd, vf, vL = v.hidden_size, v.intermediate_size, v.depth
    vis_params = vL * (4 * vd * vd + 3 * vd * vf)
    flops = 0.0
    for s in samples:
        n = int(s["input_ids"].shape[1])
        patches = int(s["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in s else 0
        flops += 6 * text_params * n + 6 * L * d * n * n  # causal: 12·L·d·n²/2
        flops += 6 * vis_params * patches + 12 * vL * vd * patches * 64  # window/full blocks: ~64-patch segments avg
    return flops


def train_timed(step_fn, steps, device):
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] or times), times


def part_size(args, rank, world, device, kind):
    model_id = "qwen2_5vl"
    if args.smoke:
        cfg = config(model_id, None, None)
        text_range, grids, row_tokens, long_len, steps = (32, 128), [(1, 8, 8), (1, 8, 12)], 512, 600, 2
    else:
        text = dict(QWEN25_7B_TEXT, num_hidden_layers=args.text_layers)
        cfg = config(model_id, text, dict(QWEN25_7B_VISION, depth=args.vision_blocks,
                                          fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < args.vision_blocks]))
        text_range, grids, row_tokens, long_len, steps = (128, 4096), [(1, 16, 16), (1, 16, 24), (1, 24, 24), (1, 32, 32)], args.row_tokens, 32768, args.steps
    rng = random.Random(rank)
    samples, total = [], 0
    while total < row_tokens * args.rows:
        s = sample(model_id, rng, text_range, (1, 4), grids, len(samples) + 1000 * rank)
        samples.append(s)
        total += int(s["input_ids"].shape[1])
    # greedy packing into rows of ≤ row_tokens (a longer sample gets its own row)
    rows, cur, n = [], [], 0
    for s in samples:
        m = int(s["input_ids"].shape[1])
        if cur and n + m > row_tokens:
            rows.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += m
    rows.append(cur) if cur else None
    long = [sample(model_id, random.Random(99), (long_len, long_len), (1, 1), grids[:1], 7)]
    policies = [("sm70", "efficient_varlen", "efficient_varlen"), ("flash", "torch_varlen", "torch_varlen")]
    if kind == "cpu":
        policies = [("cpu", "sdpa_masked", "sdpa_masked"), ("cpu-eager", "eager", "eager")]
    out = {"model": f"Qwen2.5-VL-7B dims ({cfg.get_text_config().num_hidden_layers} of 28 text layers, "
                    f"{cfg.vision_config.depth} of 32 vision blocks; random weights)" if not args.smoke else "tiny qwen2_5vl",
           "world_size": world, "mesh": {"dp": world, "sp": 1}, "optimizer": "SGD, no momentum (no optimizer state)",
           "activation_checkpointing": True,
           "length_mix": f"samples of {text_range[0]}-{text_range[1]} text tokens + 1-4 images of "
                         f"{sorted({g[1] * g[2] // 4 for g in grids})} tokens, packed into rows of <= {row_tokens}",
           "samples_per_rank": len(samples), "rows_per_rank": len(rows), "long_row_tokens": int(long[0]["input_ids"].shape[1]),
           "runs": {}}
    gpu = torch.cuda.get_device_name(device) if kind == "cuda" else ""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    out["peak_tflops_assumed"] = peak
    recorded = {}
    for name, text_backend, vision_backend in policies:
        arch = {"sm70": "sm70", "flash": "sm90"}.get(name, "cpu")
        model = pmodel = None
        try:  # one model per policy, both workloads
            model = build(model_id, cfg, device, torch.float32 if kind == "cpu" else torch.bfloat16)
            handle = portvlm.patch(model, arch=arch)
            dtype = handle.dtype
            model.to(dtype)
            base = {"arch_policy": arch, "text_backend": text_backend, "vision_backend": vision_backend,
                    "dtype": str(dtype).removeprefix("torch."), "policy_text_backend": handle.state.text_backend,
                    "evidence": policy_evidence(arch, device)}
            handle.state.text_backend, handle.state.vision_backend = text_backend, vision_backend
            pmodel = parallelize(model, handle, make_mesh(world, 1, device.type), activation_checkpointing=True)
        except Exception as exc:  # noqa: BLE001
            base = {"arch_policy": arch, "status": "fail", "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        for label, batch in (("mix", rows), ("long", [long])):
            res = dict(base)
            if pmodel is None:
                out["runs"][f"{name}/{label}"] = res
                continue
            try:
                packed = [to(pack(r), device, dtype) for r in batch]
                rec = Recorder() if name in ("sm70", "cpu") else None

                losses = []

                def step():
                    for i, r in enumerate(packed):
                        if rec is not None:
                            rec.on = not recorded.get(label) and i == 0
                        o = pmodel(**r)
                        losses.append(float(o.loss_value))
                        if rec is not None and rec.on:  # the forward's calls; recompute is added when timing
                            rec.on = False
                            recorded[label] = (list(rec.calls), dtype)
                        o.loss.backward()
                    with torch.no_grad():
                        for p in pmodel.parameters():
                            if p.grad is not None:
                                p -= 1e-6 * p.grad
                                p.grad = None

                if kind == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    med, times = train_timed(step, steps, device)
                finally:
                    if rec is not None:
                        rec.close()
                tokens = sum(int(r["input_ids"].shape[1]) for r in packed)
                flops = model_flops(cfg, [s for r in batch for s in r])
                res.update(step_s=round(med, 4), tokens_per_s=round(tokens / med, 1), tokens=tokens,
                           peak_GiB=peak_gib(device), mfu=round(flops / med / (peak * 1e12), 4) if peak else None,
                           losses=[round(x, 5) for x in losses], status="pass")
                if not all(finite(x) for x in losses):  # a NaN step is a failure, never a throughput figure
                    res.update(status="fail", error=f"non-finite loss in {sum(not finite(x) for x in losses)} of "
                                                    f"{len(losses)} forwards")
            except Exception as exc:  # noqa: BLE001
                res.update(status="fail", error=f"{type(exc).__name__}: {str(exc)[:400]}")
            out["runs"][f"{name}/{label}"] = res
            if rank == 0:
                print(json.dumps({f"{name}/{label}": res}), flush=True)
        if pmodel is not None:
            pmodel.close()
            handle.revert()
        del model, pmodel
        if kind == "cuda":
            torch.cuda.empty_cache()
    # transformers' own sdpa, unpatched, padded batches of the same samples (what a V100 user runs today)
    for label, batch in (("mix", rows), ("long", [long])):
        res = {"arch_policy": "none (transformers sdpa, padded)", "text_backend": "sdpa", "vision_backend": "sdpa"}
        try:
            dtype = torch.float32 if kind == "cpu" else torch.float16
            model = build(model_id, cfg, device, dtype)
            enable_activation_checkpointing(model)
            from torch.distributed.fsdp import fully_shard

            from portvlm.shims.layer_paths import resolve

            paths = resolve(model)
            mesh = make_mesh(world, 1, device.type)._flatten("dp_sp") if world > 1 else make_mesh(world, 1, device.type)["dp"]
            for m in list(paths.vision_blocks) + list(paths.text_layers):
                fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
            per = max(1, args.pad_batch)
            flat = [s for r in batch for s in r]
            groups = [flat[i : i + per] for i in range(0, len(flat), per)]
            padded = [to(model_inputs.pad_rows(g, "right") | {"labels": model_inputs.pad_rows([{**s, "input_ids": s["labels"]} for s in g], "right")["input_ids"]}, device, dtype) for g in groups]
            for p in padded:
                p["labels"] = p["labels"].masked_fill(p["attention_mask"] == 0, -100)

            sdpa_losses = []

            def step():
                for p in padded:
                    model_io.reset_rope_state(model)
                    loss = model(**p, use_cache=False).loss
                    sdpa_losses.append(float(loss))
                    loss.backward()
                with torch.no_grad():
                    for prm in model.parameters():
                        prm.grad = None

            if kind == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            med, _ = train_timed(step, steps, device)
            tokens = sum(int(s["input_ids"].shape[1]) for s in flat)
            padded_tokens = sum(int(p["input_ids"].numel()) for p in padded)
            res.update(dtype=str(dtype).removeprefix("torch."), step_s=round(med, 4), tokens_per_s=round(tokens / med, 1),
                       tokens=tokens, padded_tokens=padded_tokens, batch_per_step=per, peak_GiB=peak_gib(device),
                       mfu=round(model_flops(cfg, flat) / med / (peak * 1e12), 4) if peak else None, status="pass",
                       note="mean loss per padded batch (transformers' own), not the packed batch mean; same samples")
            if not all(finite(x) for x in sdpa_losses):
                res.update(status="fail", error=f"non-finite loss in {sum(not finite(x) for x in sdpa_losses)} of "
                                                f"{len(sdpa_losses)} padded batches")
            del model
        except Exception as exc:  # noqa: BLE001
            res.update(status="fail", error=f"{type(exc).__name__}: {str(exc)[:400]}")
        if kind == "cuda":
            torch.cuda.empty_cache()
        out["runs"][f"sdpa_padded/{label}"] = res
        if rank == 0:
            print(json.dumps({f"sdpa_padded/{label}": res}), flush=True)
    # kernels alone on the recorded shapes; targets (a) and (b)
    a_name, b_name = ("sm70", "flash") if kind == "cuda" else ("cpu", "cpu-eager")
    kb = {"sm70": ("efficient_varlen", torch.float16), "flash": ("torch_varlen", torch.bfloat16),
          "cpu": ("sdpa_masked", torch.float32), "cpu-eager": ("eager", torch.float32)}
    out["targets"] = {}
    for label in ("mix", "long"):
        if label not in recorded:
            continue
        calls, _ = recorded[label]
        n_rows = len(rows) if label == "mix" else 1
        ka = kernel_seconds(calls, kb[a_name][0], device, kb[a_name][1], True) * n_rows
        kbt = kernel_seconds(calls, kb[b_name][0], device, kb[b_name][1], True) * n_rows
        ra, rb = out["runs"].get(f"{a_name}/{label}", {}), out["runs"].get(f"{b_name}/{label}", {})
        sd = out["runs"].get(f"sdpa_padded/{label}", {})
        t = {"attention_calls_per_row": len(calls), "kernel_note": "the first row's calls, timed alone, times the rows per step", "kernel_s": {a_name: round(ka, 4), b_name: round(kbt, 4)},
             "kernel_diff_s": round(ka - kbt, 4)}
        if ra.get("step_s") and rb.get("step_s"):
            t["step_diff_s"] = round(ra["step_s"] - rb["step_s"], 4)
            t["a_ratio_step_diff_over_kernel_diff"] = round((ra["step_s"] - rb["step_s"]) / (ka - kbt), 3) if ka != kbt else None
            t["a_target"] = "<= 1.1"
        if ra.get("tokens_per_s") and sd.get("tokens_per_s"):
            t["b_ratio_tokens_per_s_over_padded_sdpa"] = round(ra["tokens_per_s"] / sd["tokens_per_s"], 3)
            t["b_target"] = ">= 1.5 (length mix)"
        out["targets"][label] = t
        if rank == 0:
            print(json.dumps({f"targets/{label}": t}), flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 3. sp: SP=N vs SP=1 loss on a long row, and the longest row each trains at equal per-rank memory
# ---------------------------------------------------------------------------------------------------------------


def sp_row(model_id, n, smoke):
    """``n`` tokens (a few more where two of a sample's image cuts coincide): samples of ~n/8 text tokens with 1–4
    images each (seeded, the same row for every rank). The last sample is drawn again to fill what is left: kept
    whole it would overshoot ``n`` by up to a sample (~12%), coarser than the longest-row search's precision."""
    rng = random.Random(5)
    grids = [(1, 8, 8)] if smoke else [(1, 32, 32)]
    per = max(64, n // 8)
    ss, tot, i = [], 0, 0
    while tot < n:
        state = rng.getstate()
        s = sample(model_id, rng, (per // 2, per), (1, 4), grids, i)
        if tot + s["input_ids"].shape[1] > n:  # the last sample: the images that fit (at least one), text for the rest
            n_img = int(s["image_grid_thw"].shape[0])
            each = (int(s["input_ids"].shape[1]) - int((s["labels"] != -100).sum())) // n_img  # tokens per image
            left = n - tot
            k = max(1, min(n_img, (left - 1) // each))
            rng.setstate(state)
            s = sample(model_id, rng, (max(1, left - k * each),) * 2, (k, k), grids, i)
        ss.append(s)
        tot += int(s["input_ids"].shape[1])
        i += 1
    return pack(ss)


_BUILT = weakref.WeakSet()  # every model sp_step built in this process: one still alive at a rebuild is a leak


def sp_step(args, model_id, cfg, arch, device, dims, row, world, held=None):
    """One training step (forward + backward, activation checkpointing) of ``row`` over mesh ``dims``: fits (no
    rank ran out of memory), loss, per-rank peak memory. An OOM is an answer, not an error. ``held``: the model of
    the previous step of this search (reused after a step that fit on every rank; rebuilt after an OOM).
    Returns ``(result, held)``."""
    res, live = {}, {}
    try:
        if held is None:  # what earlier probes left allocated (~0: a model closed after an OOM must be gone)
            # A closed model is cyclic garbage (FSDP's hooks hold their modules): only a collection frees it, and
            # the caller dropped its last reference only now. Uncollected, it stayed allocated through the next
            # probe (7.2 GiB per rank in the sm70 run of 2026-12-03, beside a 4.2 GiB model).
            free(device)
            live["leftover_GiB"] = allocated_gib(device)
            live["leftover_models"] = len(_BUILT)
            held = parallel_model(model_id, cfg, arch, device, dims, ckpt=True)
            _BUILT.add(held[0])
        live["resident_GiB"] = allocated_gib(device)  # the model, and anything else live, before the step
        pmodel, handle = held
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        over = args.smoke and row["input_ids"].shape[1] / dims[1] > SMOKE_RANK_TOKENS  # the CPU never runs out
        lone = args.smoke_lone_oom and dims[1] > 1  # SP=N: only the last rank runs out, in its backward
        if over and not lone:
            raise torch.OutOfMemoryError(f"smoke: simulated, more than {SMOKE_RANK_TOKENS} tokens on one rank")
        sync(device)
        t0 = time.perf_counter()
        out = pmodel(**to(row, device, handle.dtype))
        if over and dist.get_rank() == world - 1:
            raise torch.OutOfMemoryError("smoke: simulated, this rank alone, before its backward")
        out.loss.backward()
        sync(device)
        res = {"fits": True, "loss": float(out.loss_value), "step_s": round(time.perf_counter() - t0, 3),
               "peak_GiB": peak_gib(device), "dtype": str(handle.dtype).removeprefix("torch."),
               "text_backend": handle.state.text_backend}
        del out
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # a CUDA OOM outside the caching allocator is a RuntimeError
        if peer_lost(exc):  # a peer left this step's collectives (it ran out of memory alone): the group is gone
            BROKEN.setdefault("why", f"{type(exc).__name__}: {str(exc)[:200]}")
        elif not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc).lower():
            raise
        res = {"fits": False, "error": f"{type(exc).__name__}: {str(exc)[:160]}", "peak_GiB": peak_gib(device)}
    if held is not None:
        for p in held[0].parameters():
            p.grad = None
    try:  # on the control group: it still works after the step's group broke
        per_rank = gather_rows(res | live, world)
    except RuntimeError as exc:  # a peer died: this rank's own view only
        if not peer_lost(exc):
            raise
        BROKEN.setdefault("why", f"{type(exc).__name__}: {str(exc)[:200]}")
        per_rank = [res | live]
    lost = [r["error"] for r in per_rank if any(w in (r.get("error") or "") for w in GLOO_PEER_LOST)]
    if lost:  # a peer's step collective failed: the group is gone for every rank, this one included
        BROKEN.setdefault("why", lost[0])
    fits = all(r["fits"] for r in per_rank)
    oom_ranks = [i for i, r in enumerate(per_rank) if "OutOfMemoryError" in (r.get("error") or "")
                 or "out of memory" in (r.get("error") or "").lower()]
    if not fits and held is not None:  # every rank drops its model after an OOM anywhere: FSDP's state is suspect
        close(*held, device)
        held = None
    free(device)
    loss = per_rank[0].get("loss")
    return {"tokens": int(row["input_ids"].shape[1]), "images": int(row["image_grid_thw"].shape[0]), "fits": fits,
            "trains": fits and finite(loss), "loss": loss, "step_s": per_rank[0].get("step_s"),
            "peak_GiB_per_rank": [r.get("peak_GiB") for r in per_rank], "dtype": per_rank[0].get("dtype"),
            "text_backend": per_rank[0].get("text_backend"),
            "resident_GiB_per_rank": [r.get("resident_GiB") for r in per_rank],
            "leftover_GiB_per_rank": [r.get("leftover_GiB") for r in per_rank],
            "leftover_models_per_rank": [r.get("leftover_models") for r in per_rank],
            "error": next((r["error"] for r in per_rank if "error" in r), None)} | (
            {"group_broken": BROKEN["why"], "oom_ranks": oom_ranks, "ranks_seen": len(per_rank)} if BROKEN else {}), held


def search_longest(step, start: int, *, until: float, maximum: int, precision: float = 0.05, aim: int | None = None,
                   tokens=None, clock=time.monotonic, agree=bool) -> dict:
    """The longest row that trains, bracketed: ``start`` first, ``aim`` next (when given), then doubling until a row
    does not train, then geometric bisection between the longest row that trained and the shortest that did not
    until ``shortest / longest <= 1 + precision``; both bounds are recorded however the search stops.

    ``step(n)`` probes the row requested as ``n`` tokens and returns ``{"tokens", "fits", "trains", "loss", ...}``;
    bounds are its actual ``tokens``, which ``tokens(n)`` tells before the probe (default: ``n``). The search stops
    early, saying why in ``stopped``, when ``clock()`` reaches ``until`` (checked before each probe, so one probe may
    overrun it), when a row fits with a non-finite loss, or when a probe would repeat a size already tried.
    ``aim`` (SP=N: the target × SP=1's ``shortest_that_does_not``) is probed right after the first row (requested
    so that the row has at least ``aim`` tokens): if it trains the target is met whatever follows, if not the
    bisection runs below it. ``agree(flag)``: every rank's flag, so that all ranks take the same branch.
    """
    tokens = tokens or (lambda n: n)
    tried = []
    out = {"longest_that_trains": None, "shortest_that_does_not": None, "stopped": None, "tried": tried}
    best = {}  # the request of the longest row that trained (doubling goes on from it)

    def probe(n: int) -> str | None:
        """Probe the row requested as ``n`` tokens; why the search stops here, or None."""
        if not agree(clock() < until):
            return "the time share for this search was spent"
        actual = tokens(n)
        if any(t["tokens"] == actual for t in tried):
            return f"the next row ({n} tokens requested) has {actual} tokens, a size already tried"
        r = dict(step(n), requested=n)
        tried.append(r)
        if r.get("group_broken"):  # a rank's OOM (seen on the control group) still bounds the row; nothing else does
            hi = out["shortest_that_does_not"]
            if r.get("oom_ranks") and (hi is None or r["tokens"] < hi):
                out["shortest_that_does_not"] = r["tokens"]
            return (f"the process group broke at {r['tokens']} tokens (out of memory on rank(s) "
                    f"{r.get('oom_ranks') or 'none seen'} alone, mid-step): {r['group_broken']}; no step can run "
                    "after it")
        if r["fits"] and not r["trains"]:
            return f"loss {r['loss']} is not finite at {r['tokens']} tokens"
        lo, hi = out["longest_that_trains"], out["shortest_that_does_not"]
        if r["trains"] and (lo is None or r["tokens"] > lo):
            out["longest_that_trains"], best["request"] = r["tokens"], n
        elif not r["trains"] and (hi is None or r["tokens"] < hi):
            out["shortest_that_does_not"] = r["tokens"]
        return None

    why = probe(start)
    if why is None and out["longest_that_trains"] is None:
        why = f"the first row ({out['shortest_that_does_not']} tokens) did not train: lower --search-start"
    if aim is not None:
        out["aim"] = {"tokens": aim, "row_tokens": None, "trains": None}
        if why is None and out["longest_that_trains"] >= aim:  # the first row already decided it
            out["aim"] |= {"row_tokens": out["longest_that_trains"], "trains": True}
        elif why is None:
            n = aim if tokens(aim) >= aim else 2 * aim - tokens(aim)  # a row of fewer tokens: step up once
            before = len(tried)
            why = probe(n)
            if len(tried) > before:
                out["aim"] |= {"row_tokens": tried[-1]["tokens"], "trains": tried[-1]["trains"]}
    while why is None and out["shortest_that_does_not"] is None:  # doubling
        if best["request"] >= maximum:
            why = f"every row up to --search-max ({maximum} tokens) trained"
            break
        why = probe(min(2 * best["request"], maximum))
    while why is None:  # bisection
        lo, hi = out["longest_that_trains"], out["shortest_that_does_not"]
        if hi <= lo * (1 + precision):
            why = f"bracketed to {hi / lo - 1:.1%} (--search-precision {precision:g})"
            break
        n = round(math.sqrt(lo * hi))
        if not lo < tokens(n) < hi:
            why = f"no row strictly between {lo} and {hi} tokens (requested {n}: {tokens(n)} tokens)"
            break
        why = probe(n)
    out["stopped"] = why
    return out


def sp_search(args, model_id, cfg, arch, device, dims, world, until, aim=None) -> dict:
    """``search_longest`` over mesh ``dims`` with ``sp_step`` probes (the model is kept while rows fit)."""
    held, rows = [None], {}

    def row(n):
        if n not in rows:  # built once for tokens() and step(): ~1 s at 200k tokens
            rows.clear()
            rows[n] = sp_row(model_id, n, args.smoke)
        return rows[n]

    def step(n):
        r, held[0] = sp_step(args, model_id, cfg, arch, device, dims, row(n), world, held[0])
        rows.clear()
        return r

    try:
        found = search_longest(step, args.search_start, until=until, maximum=args.search_max,
                               precision=args.search_precision, aim=aim,
                               tokens=lambda n: int(row(n)["input_ids"].shape[1]), agree=lambda f: agree(f, world))
    finally:
        if held[0] is not None:
            close(*held[0], device)
            held[0] = None
            free(device)  # closed and unreferenced: collected before the next search builds its model
    return {"mesh": {"dp": dims[0], "sp": dims[1]}} | found


def longest_verdict(sp1: dict, spn: dict, target: float) -> dict:
    """The longest-row ratio and its status from two searches' bounds (``longest_that_trains`` <= L <
    ``shortest_that_does_not``): the true ratio lies in (lo_N / hi_1, hi_N / lo_1), so the target is met
    (``pass``) only when the lower bound reaches it, missed (``fail``) when the upper bound does not, and
    ``inconclusive`` between — a coarse search is never read as more than it measured."""
    nonfinite = [t for f in (sp1, spn) for t in f["tried"] if t["fits"] and not t["trains"]]
    # a probe that ran beside an earlier probe's model measured less memory than the cap: not the same budget
    beside = [t["tokens"] for f in (sp1, spn) for t in f["tried"] if any(t.get("leftover_models_per_rank") or ())]
    a, b = sp1["longest_that_trains"], spn["longest_that_trains"]
    a_hi, b_hi = sp1["shortest_that_does_not"], spn["shortest_that_does_not"]
    ratio = round(b / a, 3) if a and b else None
    lower = round(b / a_hi, 3) if b and a_hi else None  # SP=1 may train anything below a_hi
    upper = round(b_hi / a, 3) if b_hi and a else None  # SP=N trains nothing from b_hi on
    out = {"ratio_longest_sp_over_sp1": ratio, "ratio_bounds": [lower, upper], "meets_target": None}
    if nonfinite or ratio is None:
        return out | {"status": "fail", "reason": "a row fit but its loss was not finite" if nonfinite
                      else "a search found no row that trains"}
    if beside:
        return out | {"status": "fail", "reason": f"the probes at {beside} tokens ran beside an earlier probe's model "
                                                  "still allocated: their memory was not the cap (a leak)"}
    if lower is not None and lower >= target:
        return out | {"meets_target": True, "status": "pass"}
    if upper is not None and upper < target:
        return out | {"meets_target": False, "status": "fail",
                      "reason": f"SP=N trains nothing from {b_hi} tokens on while SP=1 trains {a}: the ratio is "
                                f"below {upper} < target {target}"}
    return out | {"status": "inconclusive",
                  "reason": f"the searches' bounds put the ratio between {lower} and {upper}: refine the bounds "
                            "(a longer --budget-s) to decide the target"}


def sp1_from(path: str, arch: str, base: dict, torch_version: str) -> tuple[dict, dict]:
    """The SP=1 search of ``arch``'s longest_row row in the record ``path`` (``--sp1-from``): its search dict and
    where it came from. Refused unless that row ran the same model, policy, world size and per-rank memory cap on
    the same torch, so that only the SP=N search runs here (one device budget may not hold both)."""
    doc = json.loads(Path(path).read_text())
    rows = [r for r in doc.get("rows", []) if r.get("check") == "longest_row" and r.get("arch_policy") == arch]
    if len(rows) != 1 or not (rows[0].get("sp1") or {}).get("tried"):
        raise SystemExit(f"--sp1-from {path}: no longest_row row of policy {arch} with an SP=1 search in it")
    row = rows[0]
    keys = ("model", "model_desc", "world_size", "memory_cap_GiB_per_rank", "activation_checkpointing")
    differ = [f"{k}: {row.get(k)!r} there, {base.get(k)!r} here" for k in keys if row.get(k) != base.get(k)]
    if doc.get("torch") != torch_version:
        differ.append(f"torch: {doc.get('torch')!r} there, {torch_version!r} here")
    if differ:
        raise SystemExit(f"--sp1-from {path}: its SP=1 search is not comparable with this run ({'; '.join(differ)})")
    return row["sp1"], {"file": Path(path).name, "commit": doc.get("commit"), "date": doc.get("date"),
                        "argv": doc.get("argv")}


def part_sp(args, rank, world, device, kind, report, budget):
    model_id = "qwen2_5vl"
    cfg = model_config(model_id, args)
    cap = None
    if kind == "cuda":
        frac = report.rec.topology.get("memory_fraction_per_rank") or 1.0
        cap = round(torch.cuda.get_device_properties(device).total_memory * frac / 2**30, 2)
    policies = list(policies_for(kind, args))
    for i, arch in enumerate(policies):
        base = {"model": model_id, "model_desc": describe(model_id, cfg, args.smoke), "arch_policy": arch,
                "world_size": world, "evidence": policy_evidence(arch, device), "activation_checkpointing": True,
                "memory_cap_GiB_per_rank": cap}
        if BROKEN:  # an earlier policy's search broke the group: nothing distributed can run in this process
            report.add(base | {"check": "longest_row", "status": "not_run",
                               "reason": f"the process group broke in an earlier search: {BROKEN['why']}"})
            continue
        policy_end = time.monotonic() + budget.left() / (len(policies) - i)  # this policy's share of the budget
        # (b) the longest row that trains at equal per-rank memory: SP=1 (~40% of the policy's time: its steps are
        # shorter), then SP=N aiming first at the target × SP=1's upper bound, so that one probe decides the target
        target = 1.8
        row = base | {"check": "longest_row", "mesh": {"dp": 1, "sp": world}, "target_ratio": target,
                      "search": f"bracketing: --search-start, then doubling until a row does not train, then "
                                f"geometric bisection between the longest row that trained and the shortest that did "
                                f"not until they are within {args.search_precision:.0%} or the time share is spent; "
                                f"SP={world} probes {target} × SP=1's shortest_that_does_not (aim) right after its "
                                "first row; both bounds are recorded"}
        try:
            found = {}
            until = time.monotonic() + 0.4 * max(0.0, policy_end - time.monotonic())
            if args.sp1_from:  # SP=1's bounds from an earlier run of this commit's code: only SP=N runs here
                found["sp1"], row["sp1_from"] = sp1_from(args.sp1_from, arch, base, torch.__version__)
            else:
                found["sp1"] = sp_search(args, model_id, cfg, arch, device, (world, 1), world, until)
            hi = found["sp1"]["shortest_that_does_not"]
            if BROKEN:
                found[f"sp{world}"] = {"mesh": {"dp": 1, "sp": world}, "longest_that_trains": None,
                                       "shortest_that_does_not": None, "tried": [],
                                       "stopped": "not run: the process group broke in the SP=1 search"}
            else:
                found[f"sp{world}"] = sp_search(args, model_id, cfg, arch, device, (1, world), world, policy_end,
                                                aim=math.ceil(target * hi) if hi else None)
            row |= found | longest_verdict(found["sp1"], found[f"sp{world}"], target)
            if BROKEN and row["status"] != "pass":  # the bounds so far, not a verdict on the target
                row |= {"status": "inconclusive", "reason": f"{row.get('reason') or 'the bounds do not decide it'}; "
                                                            f"the search ended early: {BROKEN['why']}"}
        except Exception as exc:  # noqa: BLE001 - the row says why, with the searches that finished
            row = failed_row(row | found, exc)
            found = {}
        # (a) the loss of the searches' first row (the same seeded row): SP=N vs SP=1 (mesh (N,1): each rank all of it)
        first = [f["tried"][0] for f in found.values() if f.get("tried")]
        loss_row = base | {"check": "sp_loss", "mesh": {"dp": 1, "sp": world}}
        if len(first) == 2 and first[0]["tokens"] == first[1]["tokens"] and first[0]["trains"] and first[1]["trains"]:
            (l_atol, l_rtol), _ = tolerances_for(arch, device, first[0]["dtype"])
            err = abs(first[0]["loss"] - first[1]["loss"])
            report.add(loss_row | {"row_tokens": first[0]["tokens"], "row_images": first[0]["images"],
                                   "sp1_loss": first[0]["loss"], "sp_loss": first[1]["loss"], "loss_abs_err": err,
                                   "loss_tolerance": [l_atol, l_rtol],
                                   "status": "pass" if err <= l_atol + l_rtol * abs(first[0]["loss"]) else "fail"})
        elif len(first) == 2 and first[0]["tokens"] != first[1]["tokens"]:  # --sp1-from, another --search-start
            report.add(loss_row | {"status": "not_run", "reason": f"the searches' first rows differ ({first[0]['tokens']}"
                                                                  f" vs {first[1]['tokens']} tokens): no SP=1 loss to "
                                                                  "compare with"})
        else:
            report.add(loss_row | {"status": "fail" if first else "not_run",
                                   "reason": "the first row of both searches did not train: " +
                                             "; ".join(f"{t['tokens']} tokens: {t.get('error') or t.get('loss')}"
                                                       for t in first)})
        report.add(row)


PARTS = ("dp", "grads", "scaler", "fp16rows", "sp", "size")


def models_for(args) -> tuple[str, ...]:
    """dp, grads, fp16rows: the models ``--models`` names (default: all of MODELS)."""
    if not args.models:
        return MODELS
    chosen = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return chosen


def summary(reports) -> str:
    """The short table printed last: one line per row."""
    lines = [f"{'part':8} {'check':18} {'model':10} {'policy':6} {'mesh':5} {'status':8} figure"]
    for rep in reports:
        for r in rep.rec.rows:
            mesh = r.get("mesh") or {}
            fig = next((f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in (
                "ratio_longest_sp_over_sp1", "grad_ratio", "loss_abs_err", "skipped_on_ranks", "error", "reason")
                if r.get(k) is not None), "")
            lines.append(f"{rep.rec.figures['part']:8} {r.get('check', '-'):18} {r.get('model', '-'):10} "
                         f"{r.get('arch_policy', '-'):6} {mesh.get('dp', 1)}x{mesh.get('sp', 1):<3} "
                         f"{r.get('status', '?'):8} {fig[:120]}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="+", choices=PARTS, metavar="part", help=", ".join(PARTS))
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU with gloo (any world size)")
    ap.add_argument("--shared-device", action="store_true", default=None,
                    help="every rank on one GPU over gloo, each capped at 1/world of it (or PORTVLM_SHARED_DEVICE=1)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON (default $OUT)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the command")
    ap.add_argument("--text-layers", type=int, default=None, help="default: 2 (dp, grads, scaler, fp16rows), 4 (sp), 28 (size)")
    ap.add_argument("--vision-blocks", type=int, default=None, help="default: 4, 8 (sp), 32 (size)")
    ap.add_argument("--row-tokens", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=2, help="size: rows of the length mix per rank per step")
    ap.add_argument("--pad-batch", type=int, default=2, help="size: samples per padded sdpa batch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--models", default=None, help=f"dp, grads, fp16rows: models, comma-separated (default: {','.join(MODELS)})")
    ap.add_argument("--arch", default=None, help="dp, grads, sp: policies, comma-separated (default: sm90,sm70 on a GPU)")
    ap.add_argument("--text-backend", default="auto",
                    help="packed-row text kernel on a GPU: auto (sm90 torch_varlen, sm70 efficient_varlen), policy "
                         "(each policy's own: sdpa_masked, a dense mask), or one backend name for every policy")
    ap.add_argument("--search-start", type=int, default=None, help="sp: the search's first row (tokens; 32768, smoke 300)")
    ap.add_argument("--search-max", type=int, default=None, help="sp: the search's last row (tokens; 524288, smoke 2400)")
    ap.add_argument("--sp1-from", default=None,
                    help="sp: take the SP=1 search from this earlier record (same model, policy, world and memory "
                         "cap) and run only the SP=N search")
    ap.add_argument("--pg-timeout-s", type=float, default=150.0,
                    help="how long a collective waits for a peer before the group fails (gloo's largest, a 200k-token "
                         "row's all-to-all through host memory, took ~30 s on one H200)")
    ap.add_argument("--smoke-lone-oom", action="store_true",
                    help="smoke: the simulated OOM of SP=N rows hits the last rank alone, after its forward")
    ap.add_argument("--search-precision", type=float, default=0.05,
                    help="sp: bisect until shortest_that_does_not / longest_that_trains <= 1 + this")
    args = ap.parse_args()
    args.search_start = args.search_start or (300 if args.smoke else 32768)
    args.search_max = args.search_max or (2400 if args.smoke else 524288)
    if args.text_backend == "policy":
        TEXT_BACKENDS.clear()
    elif args.text_backend != "auto":
        TEXT_BACKENDS.update(dict.fromkeys(POLICIES, args.text_backend))
    # fp32 references in fp32: no TF32 in matmuls or convolutions (the vision patch embedding is a Conv3d)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rank, world, device, kind, topology = init(args)
    budget = Budget(args.budget_s)
    reports = []
    try:
        for part in dict.fromkeys(args.parts):
            layers = {"sp": (4, 8), "size": (28, 32)}.get(part, (2, 4))
            part_args = argparse.Namespace(**vars(args))
            part_args.text_layers = args.text_layers or layers[0]
            part_args.vision_blocks = args.vision_blocks or layers[1]
            report = Report(part, part_args, rank, world, device, kind, topology)
            reports.append(report)
            t0 = time.time()
            if part == "size":  # issue 12's part: one result document, rows derived for the exit code
                body = part_size(part_args, rank, world, device, kind)
                report.rec.figures["result"] = body
                report.rec.rows = [dict(v, check=f"size/{k}") for k, v in body.get("runs", {}).items()]
            else:
                {"dp": part_dp, "grads": part_grads, "scaler": part_scaler, "fp16rows": part_fp16rows,
                 "sp": part_sp}[part](part_args, rank, world, device, kind, report, budget)
            report.rec.figures["wall_s"] = round(time.time() - t0, 1)
            report.flush()
    finally:
        for report in reports:
            report.flush()
        dist.destroy_process_group()
    rows = [r for rep in reports for r in rep.rec.rows]
    if rank == 0:
        print(summary(reports), flush=True)
        print(f"topology: {json.dumps(topology.as_dict())}", flush=True)
    if any(r.get("status") == "fail" for r in rows) or not rows:
        return 1
    return 3 if any(r.get("status") != "pass" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
