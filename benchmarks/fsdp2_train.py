"""FSDP2 training step for the Qwen-VL families on GPUs, under portvlm's attention policies (issue: two-GPU FSDP2).

    torchrun --nproc_per_node 2 benchmarks/fsdp2_train.py      # the multi-GPU run (NCCL)
    torchrun --nproc_per_node 1 benchmarks/fsdp2_train.py      # the same code path on one GPU
    PORTVLM_SHARED_DEVICE=1 torchrun --nproc_per_node 2 benchmarks/fsdp2_train.py   # 2 ranks on one GPU (gloo)

Superseded by ``benchmarks/distributed_train.py dp`` (different rows per rank, gradients and the step checked).

Each rank builds the same seeded model (Qwen2.5-VL / Qwen3-VL, a few real-sized layers: text hidden 2048, 16 heads,
2 KV heads; vision hidden 1280/1024, 16 heads; random weights), patches it with ``portvlm.patch(model, arch=…)``
(sm90: bf16 + flash varlen; sm70 policy: fp16 + the efficient-attention varlen kernel), trains N steps on one
fixed batch without FSDP (the single-GPU reference), then again from the same weights with ``fully_shard`` on every
decoder layer and vision block class that portvlm's layer-path shim reports, plus the root. Every rank sees the
same batch, so the sharded losses must equal the reference within the dtype's tolerance. Step time and peak memory
per rank go into the JSON (``$OUT/fsdp2_<world>gpu.json`` and ``benchmarks/results/``).
Multicast stays off (NCCL_NVLS_ENABLE=0 and friends), as the shared machines require.
"""

from __future__ import annotations

import json
import os
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
from portvlm.models import inputs as model_inputs  # noqa: E402
from portvlm.models import tiny  # noqa: E402
from portvlm.shims.layer_paths import resolve  # noqa: E402

STEPS, LR = 4, 1e-4
TEXT = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2, num_hidden_layers=4)
VISION = {
    "qwen2_5vl": dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048),
    "qwen3vl": dict(hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048),
}
MROPE = {"qwen2_5vl": [16, 24, 24], "qwen3vl": [24, 20, 20]}  # sums to head_dim/2 = 64, as in the real models
TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


def scaled_config(model_id: str):
    """The tiny test config with real-sized text/vision layers (rebuilt from a dict so derived fields follow)."""
    base = tiny.config(model_id)
    d = base.to_dict()
    text, vision = d["text_config"], d["vision_config"]
    text.update(TEXT, head_dim=128)
    text.pop("layer_types", None)
    for attr in ("rope_scaling", "rope_parameters"):
        if isinstance(text.get(attr), dict) and "mrope_section" in text[attr]:
            text[attr]["mrope_section"] = MROPE[model_id]
    vision.update(VISION[model_id])
    cfg = type(base)(**d)
    if not hasattr(cfg, "vocab_size"):
        cfg.vocab_size = cfg.get_text_config().vocab_size
    return cfg


def build(model_id: str, device, seed: int = 0):
    torch.manual_seed(seed)
    cls = tiny.model_class(model_id)
    model = cls._from_config(scaled_config(model_id), attn_implementation="sdpa") if hasattr(cls, "_from_config") \
        else cls(scaled_config(model_id))
    return model.to(device)


def train(model, inp, dtype, device) -> tuple[list[float], list[float]]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    losses, times = [], []
    for _ in range(STEPS):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            loss = model(**inp, labels=inp["input_ids"]).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach().float()))
    return losses, times


def one(model_id: str, arch: str, rank: int, world: int, device) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    inp = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in model_inputs.build(model_id, "packed").items()}
    row = {"model": model_id, "arch_policy": arch, "world_size": world, "steps": STEPS}
    ref = build(model_id, device)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    with portvlm.patch(ref, arch=arch) as handle:
        dtype = handle.dtype if isinstance(handle.dtype, torch.dtype) else getattr(torch, str(handle.dtype))
        row.update(dtype=str(dtype).removeprefix("torch."), vision_backend=handle.report.vision_backend.name)
        torch.cuda.reset_peak_memory_stats(device)
        ref_losses, ref_times = train(ref, inp, dtype, device)
        row["single_peak_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    del ref
    model = build(model_id, device)
    model.load_state_dict(state)
    with portvlm.patch(model, arch=arch):
        paths = resolve(model)
        classes = tuple(paths.decoder_layer_classes) + tuple(getattr(paths, "vision_block_classes", ()) or ())
        mesh = init_device_mesh("cuda", (world,))
        wrapped = [m for m in model.modules() if isinstance(m, classes)]
        for m in wrapped:
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        torch.cuda.reset_peak_memory_stats(device)
        losses, times = train(model, inp, dtype, device)
        row["fsdp_peak_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    diff = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
    bound = TOL[dtype] * max(1.0, abs(ref_losses[0]))
    row.update(
        wrapped=len(wrapped), wrapped_classes=sorted({c.__name__ for c in classes}),
        single_losses=ref_losses, fsdp_losses=losses, max_loss_diff=diff, bound=bound,
        loss_falls=losses[-1] < losses[0], ok=diff <= bound and losses[-1] < losses[0] and all(map(torch.isfinite, map(torch.tensor, losses))),
        single_step_ms=round(statistics.median(ref_times[1:]) * 1e3, 2), fsdp_step_ms=round(statistics.median(times[1:]) * 1e3, 2),
    )
    return row


def main() -> int:
    from portvlm.distributed.launch import init_ranks

    # NCCL, one GPU per rank; PORTVLM_SHARED_DEVICE=1: every rank on cuda:0 over gloo (or refused, with the reason)
    ranks = init_ranks()
    rank, world, device, topology = ranks.rank, ranks.world, ranks.device, ranks.topology
    if device.type != "cuda":
        raise SystemExit("fsdp2_train.py runs on GPUs; on the CPU use benchmarks/distributed_train.py --smoke")
    rows = []
    for model_id in ("qwen2_5vl", "qwen3vl"):
        for arch in ("sm90", "sm70"):
            try:
                if tiny.is_available(model_id):
                    raise RuntimeError("; ".join(tiny.is_available(model_id)))
                row = one(model_id, arch, rank, world, device)
            except Exception as exc:  # noqa: BLE001 - a row that failed says why
                row = {"model": model_id, "arch_policy": arch, "world_size": world, "ok": False,
                       "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
            row["rank"] = rank
            gathered = [None] * world
            dist.all_gather_object(gathered, row)
            if rank == 0:
                rows.extend(gathered)
                for r in gathered:
                    print(json.dumps({k: v for k, v in r.items() if k != "trace"}), flush=True)
    dist.destroy_process_group()
    if rank == 0:
        doc = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(device), "world_size": world,
               "topology": topology.as_dict(), "evidence": "hardware", "rows": rows}
        name = f"fsdp2_{'shared1gpu' if topology.shared_device else f'{world}gpu'}.json"
        for d in filter(None, (os.environ.get("OUT"), os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))):
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, name), "w") as fh:
                json.dump(doc, fh, indent=1)
        bad = [r for r in rows if not r.get("ok")]
        print(f"{len(rows) - len(bad)} ok, {len(bad)} not ok")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
