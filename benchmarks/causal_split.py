"""Is there a faster route for one long causal sample on the efficient-attention kernel (the sm70 policy's)?

Issue 12 asks, where the long causal row loses most to flash, for a route the arch really has. This times causal
self-attention fwd+bwd at Qwen2.5-VL-7B text shapes (28 heads after the GQA repeat, head dim 128, fp16) for one
sample of N tokens, all in one run on one GPU:

- ``efficient``: the mem-efficient (cutlass) kernel, one call, causal from the top left (what portvlm runs);
- ``efficient_split{c}``: the sample's queries cut into ``c`` chunks, each chunk a call against its key prefix with a
  bottom-right causal mask (``causal_lower_right``), so no call carries the masked upper triangle of later chunks;
- ``flash``: torch's flash SDPA kernel (sm80+; the reference, not available on a V100).

    python benchmarks/causal_split.py [--tokens 32768 8192] [--chunks 2 4 8]

Prints one JSON line per variant (median ms of fwd+bwd, ratio to ``efficient``, max |out - efficient|) and writes
``causal_split.json`` (a ``portvlm.records.BenchmarkRecord``: the GPU, torch version and the sm70 policy's evidence
here) to ``$OUT`` and benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from portvlm.testing import benchmark  # noqa: E402


def attention(q, k, v, variant: str):
    if variant == "flash":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        if variant == "efficient":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        chunks = int(variant.removeprefix("efficient_split"))
        n = q.shape[2]
        bounds = [round(n * i / chunks) for i in range(chunks + 1)]
        outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e],
                                               attn_mask=causal_lower_right(e - s, e))
                for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        return torch.cat(outs, dim=2)


def time_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 8192])
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("causal_split: needs a CUDA GPU (the kernels timed here do not exist on the CPU)", file=sys.stderr)
        return 2
    # the sm70 policy's kernel family timed here: hardware on a V100 only, emulated (with the GPU named) elsewhere
    rec = benchmark.record("causal_split", archs=["sm70"], device="cuda", heads=args.heads, head_dim=args.head_dim,
                           dtype="float16")
    for tokens in args.tokens:
        rec.rows += measure(tokens, args)
        benchmark.write(rec, "causal_split.json")  # after every length: a run cut short keeps what it measured
    rows = rec.rows
    bad = [f"{r['tokens']} {r['variant']}" for r in rows if not math.isfinite(r["max_abs_diff_vs_efficient"])]
    if bad:  # a non-finite output is a failure, never a figure (issue #22)
        print("FAIL: non-finite output in", ", ".join(bad), file=sys.stderr)
        return 1
    return 0


def measure(tokens: int, args) -> list[dict]:
    """Every variant on one sample of ``tokens`` tokens."""
    torch.manual_seed(0)
    shape = (1, args.heads, tokens, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.float16)
    variants = ["efficient", *[f"efficient_split{c}" for c in args.chunks if c < tokens], "flash"]
    ref = attention(q, k, v, "efficient").detach()
    rows, base = [], None
    for variant in variants:
        def step(variant=variant):
            q.grad = k.grad = v.grad = None
            attention(q, k, v, variant).backward(grad)

        ms = time_ms(step, args.reps)
        with torch.no_grad():
            err = float((attention(q, k, v, variant) - ref).abs().max())
        base = base or ms
        row = {"tokens": tokens, "variant": variant, "fwd_bwd_ms": round(ms, 2), "ratio_to_efficient": round(ms / base, 3),
               "max_abs_diff_vs_efficient": err}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
