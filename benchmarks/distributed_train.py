"""portvlm.distributed on GPUs: FSDP2 data parallel, a 7B-sized step, and Ulysses SP on a long row (issue 12).

One command per part (world size N = GPUs; multicast stays off, as the shared machines require):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      torchrun --nproc_per_node N benchmarks/distributed_train.py dp     # 1. DP, different rows per rank
      torchrun --nproc_per_node N benchmarks/distributed_train.py size   # 2. Qwen2.5-VL-7B dims: sm70 / flash / sdpa
      torchrun --nproc_per_node N benchmarks/distributed_train.py sp     # 3. SP=N vs SP=1 on a long row + search
    torchrun --nproc_per_node 2 benchmarks/distributed_train.py {dp,size,sp} --smoke   # CPU, gloo, tiny config

1. ``dp``: Qwen2.5-VL / Qwen3-VL (a few real-sized layers, random weights) under the sm90 policy (bf16, hardware on
   sm90) and the sm70 policy (fp16, emulated off Volta). Every rank gets a DIFFERENT packed row; rank 0 first runs
   one process on the union of all rows; the parallel loss and the parameters after one SGD step must match it.
2. ``size``: Qwen2.5-VL-7B dimensions (28 text layers of 3584, 32 vision blocks of 1280; ``--text-layers`` to cut,
   stated in the output), FSDP2 + activation checkpointing, SGD without momentum (no optimizer state). Samples of
   128–4096 text tokens with 1–4 images of 64–256 tokens each (seeded), packed into rows of ``--row-tokens``; and one
   long row (a single 32k-token sample). Three runs: portvlm's sm70 policy (fp16, text+vision through the
   efficient-attention varlen kernel), the flash policy (bf16, ``torch_varlen`` = FlashAttention-2 inside torch for
   text+vision), and transformers' own sdpa on padded batches of the same samples (unpatched). Then every attention
   call of one sm70 forward is replayed alone with both kernels: target (a) = (sm70 step − flash step) / (kernel
   time difference) ≤ 1.1; target (b) = sm70 tokens/s / padded-sdpa tokens/s ≥ 1.5.
3. ``sp``: one long packed row (≥ 32k tokens incl. images): loss with SP=1 (every rank the same row, mesh (N,1))
   vs SP=N (mesh (1,N)); then the longest row that trains one step under SP=N (a doubling search), per-rank memory.

Results (JSON, with world size, GPU and evidence) go to ``$OUT/`` and ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import statistics
import sys
import time
import traceback

for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(key, value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import portvlm  # noqa: E402
from portvlm.distributed import enable_activation_checkpointing, make_mesh, pack, parallelize  # noqa: E402
from portvlm.suites import tiny  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "V100": 125.0}  # dense bf16/fp16 tensor-core peaks
QWEN25_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                      num_hidden_layers=28, vocab_size=152064, head_dim=128)
QWEN25_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        fullatt_block_indexes=[7, 15, 23, 31])
FEW_LAYERS_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                       num_hidden_layers=4, head_dim=128)
FEW_LAYERS_VISION = {"qwen2_5vl": dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                                       fullatt_block_indexes=[1, 3]),
                     "qwen3vl": dict(depth=4, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                                     deepstack_visual_indexes=[1, 2])}
MROPE = {"qwen2_5vl": [16, 24, 24], "qwen3vl": [24, 20, 20]}
TOL = {"bfloat16": 3e-2, "float16": 1e-2, "float32": 1e-4}  # loss, relative (the bf16/fp16 rows of the table)


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------


def init(smoke: bool):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    timeout = datetime.timedelta(minutes=5)  # a rank that dies makes the others fail, not hang
    if smoke or not torch.cuda.is_available():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        return rank, world, torch.device("cpu"), "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device, timeout=timeout)
    return rank, world, device, "cuda"


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
        segs.append(tiny.Segment("text", torch.randint(3, 200, (max(1, c - prev),), generator=g).tolist()))
        segs.append(tiny.Segment("image", grid=rng.choice(grids)))
        prev = c
    segs.append(tiny.Segment("text", torch.randint(3, 200, (max(1, n_text - prev),), generator=g).tolist()))
    s = tiny.qwen_sequence(model_id, segs, seed=seed)
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_rows(obj, world):
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def write(name: str, doc: dict, rank: int) -> None:
    if rank:
        return
    for d in filter(None, (os.environ.get("OUT"), os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "w") as fh:
            json.dump(doc, fh, indent=1)
    print(f"wrote {name}", flush=True)


def header(world, device, smoke):
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "transformers": __import__("transformers").__version__, "gpu": gpu,
            "world_size": world, "smoke": smoke,
            "evidence": "cpu-smoke" if smoke else "hardware", "date": datetime.datetime.now(datetime.UTC).isoformat()}


def policy_evidence(arch: str, device) -> str:
    if device.type != "cuda":
        return "cpu-smoke"
    cap = torch.cuda.get_device_capability(device)
    return "hardware" if f"sm{cap[0]}{cap[1]}" == arch else "emulated"


# ---------------------------------------------------------------------------------------------------------------
# 1. dp
# ---------------------------------------------------------------------------------------------------------------


def part_dp(args, rank, world, device, kind):
    rows = []
    for model_id in ("qwen2_5vl", "qwen3vl"):
        for arch in ("sm90", "sm70") if kind == "cuda" else ("cpu",):
            row = {"model": model_id, "arch_policy": arch, "world_size": world, "mesh": {"dp": world, "sp": 1}}
            try:
                if tiny.is_available(model_id):
                    raise RuntimeError("; ".join(tiny.is_available(model_id)))
                row.update(dp_one(args, model_id, arch, rank, world, device))
            except Exception as exc:  # noqa: BLE001 - a row that failed says why
                row.update(status="fail", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-1500:])
            row["evidence"] = policy_evidence(arch, device)
            if rank == 0:
                print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
            rows.append(row)
    return rows


def dp_one(args, model_id, arch, rank, world, device):
    cfg = config(model_id, None, None) if args.smoke else config(model_id, FEW_LAYERS_TEXT, FEW_LAYERS_VISION[model_id])
    rng = random.Random(1)
    text_range = (16, 64) if args.smoke else (128, 1024)
    grids = [(1, 8, 8), (1, 8, 12)] if args.smoke else [(1, 16, 16), (1, 24, 32)]
    # one DIFFERENT row per rank (2 samples each, different lengths)
    all_rows = [pack([sample(model_id, rng, text_range, (0 if r % 2 else 1, 2), grids, 10 * r + i) for i in range(2)])
                for r in range(world)]
    # single process on the union (every rank computes it: no FSDP, same weights, same rows)
    ref = build(model_id, cfg, device, torch.float32, seed=0)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    with portvlm.patch(ref, arch=arch) as handle:
        dtype = handle.dtype
        ref.to(dtype)
        ref_loss, n = 0.0, 0
        sums = []
        for r in all_rows:
            from portvlm.distributed.parallel import ParallelModel
            from portvlm.distributed.mesh import Layout

            single = ParallelModel(ref, handle, Layout(1, 1, 0, 0, None, None, None))
            out = single(**to(r, device, dtype))
            sums.append(out.loss * out.tokens)
            n += out.tokens
        loss = torch.stack(sums).sum() / n
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                if p.grad is not None:
                    p -= args.lr * p.grad
        ref_params = {k: v.detach().float().cpu() for k, v in ref.named_parameters()}
        ref_loss = float(loss.detach())
    del ref
    model = build(model_id, cfg, device, torch.float32)
    model.load_state_dict(state)
    with portvlm.patch(model, arch=arch) as handle:
        model.to(dtype)
        pmodel = parallelize(model, handle, make_mesh(world, 1, device.type))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        out = pmodel(**to(all_rows[rank], device, dtype))
        out.loss.backward()
        with torch.no_grad():
            for p in pmodel.parameters():
                if p.grad is not None:
                    p -= args.lr * p.grad
        sync(device)
        step = time.perf_counter() - t0
        params = {k.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu()
                  for k, p in pmodel.named_parameters()}
        pmodel.close()
    worst = max(float(((params[k] - v).abs() / (v.abs() + 1e-2)).max()) for k, v in ref_params.items())
    moved = max(float((v - state[k].float().cpu()).abs().max()) for k, v in ref_params.items())  # the step did move
    loss_err = abs(float(out.loss_value) - ref_loss)
    tol = TOL[str(dtype).removeprefix("torch.")]
    ok = loss_err <= tol * max(1.0, abs(ref_loss)) and worst <= tol * 10 and moved > 0
    return {"dtype": str(dtype).removeprefix("torch."), "rows_tokens": [int(r["input_ids"].shape[1]) for r in all_rows],
            "union_loss": ref_loss, "dp_loss": float(out.loss_value), "loss_abs_err": loss_err,
            "param_max_rel_err_after_step": worst, "param_max_change_in_step": moved, "tolerance": tol, "step_s": round(step, 3),
            "peak_GiB": peak_gib(device), "status": "pass" if ok else "fail"}


# ---------------------------------------------------------------------------------------------------------------
# 2. size
# ---------------------------------------------------------------------------------------------------------------


class Recorder:
    """Wraps ``kernels.varlen_attention`` to record every call's shapes, cu_seqlens and backend (one forward)."""

    def __init__(self):
        from portvlm.backends import kernels

        self.kernels, self.calls, self.on = kernels, [], False
        self.original = kernels.varlen_attention

        def wrapped(q, k, v, cu, max_seqlen, *, backend, scale=None, causal=False):
            if self.on:
                self.calls.append((tuple(q.shape), tuple(k.shape), tuple(int(x) for x in cu.tolist()), int(max_seqlen),
                                   bool(causal), q.dtype))
            return self.original(q, k, v, cu, max_seqlen, backend=backend, scale=scale, causal=causal)

        kernels.varlen_attention = wrapped

    def close(self):
        self.kernels.varlen_attention = self.original


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

                def step():
                    for i, r in enumerate(packed):
                        if rec is not None:
                            rec.on = not recorded.get(label) and i == 0
                        o = pmodel(**r)
                        if rec is not None and rec.on:  # the forward's calls; recompute is added when timing
                            recorded[label] = (list(rec.calls), dtype)
                            rec.on = False
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
                           status="pass")
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
            padded = [to(tiny.pad_rows(g, "right") | {"labels": tiny.pad_rows([{**s, "input_ids": s["labels"]} for s in g], "right")["input_ids"]}, device, dtype) for g in groups]
            for p in padded:
                p["labels"] = p["labels"].masked_fill(p["attention_mask"] == 0, -100)

            def step():
                for p in padded:
                    for m in (model, getattr(model, "model", None)):
                        if m is not None and hasattr(m, "rope_deltas"):
                            m.rope_deltas = None
                    model(**p, use_cache=False).loss.backward()
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
# 3. sp
# ---------------------------------------------------------------------------------------------------------------


def part_sp(args, rank, world, device, kind):
    model_id = "qwen2_5vl"
    if args.smoke:
        cfg, arch, length, grids, lengths = config(model_id, None, None), "cpu", 300, [(1, 8, 8)], [300, 600]
    else:
        text = dict(QWEN25_7B_TEXT, num_hidden_layers=args.text_layers)
        cfg = config(model_id, text, dict(QWEN25_7B_VISION, depth=args.vision_blocks,
                                          fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < args.vision_blocks]))
        arch, length, grids = args.arch, 32768, [(1, 32, 32)]
        lengths = [32768 * m for m in (1, 2, 3, 4, 6, 8)]

    def row_of(n):
        rng = random.Random(5)
        per = max(64, n // 8)  # 8 samples of ~n/8 text tokens, 1-4 images each
        ss, tot, i = [], 0, 0
        while tot < n:
            s = sample(model_id, rng, (per // 2, per), (1, 4), grids, i)
            ss.append(s)
            tot += int(s["input_ids"].shape[1])
            i += 1
        return pack(ss)

    out = {"model": f"Qwen2.5-VL-7B dims ({cfg.get_text_config().num_hidden_layers} text layers, "
                    f"{cfg.vision_config.depth} vision blocks)" if not args.smoke else "tiny qwen2_5vl",
           "arch_policy": arch, "world_size": world, "evidence": policy_evidence(arch, device), "activation_checkpointing": True}

    def one(mesh_dims, row, text_backend=None):
        model = build(model_id, cfg, device, torch.float32 if kind == "cpu" else torch.bfloat16, seed=0)
        with portvlm.patch(model, arch=arch) as handle:
            model.to(handle.dtype)
            if text_backend:
                handle.state.text_backend = text_backend
            pmodel = parallelize(model, handle, make_mesh(*mesh_dims, device.type), activation_checkpointing=True)
            if kind == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            o = pmodel(**to(row, device, handle.dtype))
            o.loss.backward()
            sync(device)
            res = {"loss": float(o.loss_value), "step_s": round(time.perf_counter() - t0, 3), "peak_GiB": peak_gib(device),
                   "dtype": str(handle.dtype).removeprefix("torch."), "text_backend": handle.state.text_backend}
            pmodel.close()
        del model, pmodel
        if kind == "cuda":
            torch.cuda.empty_cache()
        return res

    tb = None if kind == "cpu" else args.text_backend
    row = row_of(length)
    out["row_tokens"] = int(row["input_ids"].shape[1])
    out["row_images"] = int(row["image_grid_thw"].shape[0])
    sp1 = one((world, 1), row, tb)  # every rank: the whole row (SP=1)
    spn = one((1, world), row, tb)
    tol = TOL[sp1["dtype"]]
    out["sp1"] = gather_rows(sp1, world)
    out[f"sp{world}"] = gather_rows(spn, world)
    out["loss_abs_err"] = abs(sp1["loss"] - spn["loss"])
    out["loss_tolerance"] = tol * max(1.0, abs(sp1["loss"]))
    out["status"] = "pass" if out["loss_abs_err"] <= out["loss_tolerance"] else "fail"
    if rank == 0:
        print(json.dumps({k: out[k] for k in ("row_tokens", "row_images", "sp1", f"sp{world}", "loss_abs_err", "status")}), flush=True)
    search = []
    longest = None
    for n in lengths:
        r = row_of(n)
        try:
            res = one((1, world), r, tb)
            ok = True
        except torch.OutOfMemoryError as exc:
            res, ok = {"error": f"OutOfMemoryError: {str(exc)[:160]}"}, False
            torch.cuda.empty_cache()
        oks = gather_rows(ok, world)
        search.append({"tokens": int(r["input_ids"].shape[1]), "trains": all(oks), **res})
        if rank == 0:
            print(json.dumps({"search": search[-1]}), flush=True)
        if not all(oks):
            break
        longest = int(r["input_ids"].shape[1])
    out["search"], out["longest_row_that_trains"] = search, longest
    out["mesh"] = {"dp": 1, "sp": world}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=("dp", "size", "sp"))
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU with gloo (any world size)")
    ap.add_argument("--text-layers", type=int, default=28)
    ap.add_argument("--vision-blocks", type=int, default=32)
    ap.add_argument("--row-tokens", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=2, help="size: rows of the length mix per rank per step")
    ap.add_argument("--pad-batch", type=int, default=2, help="size: samples per padded sdpa batch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--arch", default="sm90", help="sp: the policy")
    ap.add_argument("--text-backend", default="torch_varlen", help="sp: text varlen kernel on the GPU")
    args = ap.parse_args()
    rank, world, device, kind = init(args.smoke)
    if args.part == "sp" and not args.smoke and args.text_layers == 28 and "--text-layers" not in sys.argv:
        args.text_layers, args.vision_blocks = 4, 8  # the search, stated in the output: fewer layers, same widths
    t0 = time.time()
    doc = header(world, device, args.smoke) | {"part": args.part, "argv": sys.argv[1:]}
    try:
        body = {"dp": part_dp, "size": part_size, "sp": part_sp}[args.part](args, rank, world, device, kind)
        doc["rows" if args.part == "dp" else "result"] = body
    finally:
        doc["wall_s"] = round(time.time() - t0, 1)
        suffix = "_smoke" if args.smoke else ""
        write(f"distributed_{args.part}_{world}{'gpu' if kind == 'cuda' else 'proc'}{suffix}.json", doc, rank)
        dist.destroy_process_group()
    rows = doc.get("rows") or []
    return 1 if any(r.get("status") != "pass" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
