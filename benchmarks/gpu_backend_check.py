"""GPU check of every attention backend usable here: forward + backward against a per-segment fp32 reference.

    python benchmarks/gpu_backend_check.py            # prints a table; writes $OUT/gpu_backend_check.json if OUT is set

Scenarios: 6 images packed in one sequence (D=80, 16 heads, as the Qwen2.5-VL-7B tower), 64-token windows over the
same kind of packing (the window layers), and a small GQA + causal case. Exits 1 if any usable backend is wrong;
backends the declarations refuse (with their reasons) are listed, not failed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from portvlm.backends import BACKENDS, backend_reasons  # noqa: E402
from portvlm.backends import kernels as K  # noqa: E402
from portvlm.platform import detect  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
DEV = "cuda"

SCENARIOS = {
    # name: (segment lengths, q heads, kv heads, head dim, causal)
    "images6_D80": ([1024, 4096, 2304, 576, 9216, 1024], 16, 16, 80, False),
    "windows64_D80": ([64] * 240 + [48, 32, 16, 36] * 4 + [1], 16, 16, 80, False),
    "gqa_causal_D128": ([300, 1, 77, 512, 129], 16, 4, 128, True),
}
# (fwd max-abs error, grad relative error) limits per dtype: unit-normal inputs, fp32 reference
TOL = {torch.float16: (1e-2, 2e-2), torch.bfloat16: (4e-2, 6e-2), torch.float32: (1e-4, 1e-4)}


def reference(q, k, v, cu, causal):
    groups = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(cu[:-1], cu[1:], strict=False):
        qi = q[a:b].float().transpose(0, 1)[None]
        ki = k[a:b].float().repeat_interleave(groups, 1).transpose(0, 1)[None]
        vi = v[a:b].float().repeat_interleave(groups, 1).transpose(0, 1)[None]
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            outs.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=causal)[0].transpose(0, 1))
    return torch.cat(outs)


def grads(fn, q, k, v, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    (out.float() * g).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_backend_check: needs a CUDA GPU (it checks the GPU kernels of every declared backend)", file=sys.stderr)
        return 2
    platform = detect()
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)} ({platform.arch_id})", flush=True)
    rows, bad = [], 0
    for scen, (lens, hq, hkv, d, causal) in SCENARIOS.items():
        cu_list = [0]
        for n in lens:
            cu_list.append(cu_list[-1] + n)
        total = cu_list[-1]
        gen = torch.Generator(device=DEV).manual_seed(0)
        q32 = torch.randn(total, hq, d, device=DEV, generator=gen)
        k32 = torch.randn(total, hkv, d, device=DEV, generator=gen)
        v32 = torch.randn(total, hkv, d, device=DEV, generator=gen)
        g = torch.randn(total, hq, d, device=DEV, generator=gen)
        ref_out, ref_grads = grads(lambda q, k, v, cu_list=cu_list, causal=causal: reference(q, k, v, cu_list, causal), q32, k32, v32, g)
        for dtype in (torch.float16, torch.bfloat16):
            q, k, v = (t.to(dtype) for t in (q32, k32, v32))
            for name in BACKENDS:
                if name == "eager" and total > 8192:
                    continue  # O(S^2) fp32 scores: the oracle path, not a GPU backend to check at this size
                row = {"scenario": scen, "backend": name, "dtype": str(dtype).removeprefix("torch."), "tokens": total,
                       "segments": len(lens), "causal": causal, "gqa": hq != hkv}
                reasons = backend_reasons(name, platform, dtype, d, need_backward=True)
                if reasons:
                    row.update(usable=False, reasons=reasons)
                    rows.append(row)
                    continue
                cu = torch.tensor(cu_list, dtype=torch.int32, device=DEV)
                try:
                    K.reset_sync_count()
                    mx = K.max_seqlen(cu)
                    fn = lambda q, k, v, cu=cu, mx=mx, name=name, causal=causal: K.varlen_attention(q, k, v, cu, mx, backend=name, causal=causal)  # noqa: E731
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out, gs = grads(fn, q, k, v, g)
                    torch.cuda.synchronize()
                    row["first_call_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
                    row["syncs"] = K.sync_count()
                    row["fwd_err"] = float((out.float() - ref_out).abs().max())
                    row["grad_err"] = max(rel(a, b) for a, b in zip(gs, ref_grads, strict=False))
                    fwd_tol, grad_tol = TOL[dtype]
                    row["ok"] = bool(
                        math.isfinite(row["fwd_err"]) and row["fwd_err"] <= fwd_tol and row["grad_err"] <= grad_tol and row["syncs"] <= 1
                    )
                except Exception as exc:
                    row.update(ok=False, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
                row["usable"] = True
                bad += not row["ok"]
                rows.append(row)
                torch.cuda.empty_cache()
    print(f"\n{'scenario':17} {'backend':19} {'dtype':9} {'fwd err':>9} {'grad err':>9} {'syncs':>5}  ok")
    for r in rows:
        if not r["usable"]:
            print(f"{r['scenario']:17} {r['backend']:19} {r['dtype']:9} {'-':>9} {'-':>9} {'-':>5}  skipped: {'; '.join(r['reasons'])[:90]}")
        elif "error" in r:
            print(f"{r['scenario']:17} {r['backend']:19} {r['dtype']:9} {'-':>9} {'-':>9} {'-':>5}  FAIL {r['error'][:120]}")
        else:
            print(f"{r['scenario']:17} {r['backend']:19} {r['dtype']:9} {r['fwd_err']:9.2e} {r['grad_err']:9.2e} {r['syncs']:5d}  {'ok' if r['ok'] else 'FAIL'}")
    result = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "arch_id": platform.arch_id, "rows": rows, "failures": bad}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_backend_check.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{bad} failing usable backend/dtype/scenario combination(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
