"""Qwen2.5-VL-7B vision tower fwd+bwd: transformers' sdpa path vs flash varlen (registry) vs portvlm's patch.

    python benchmarks/vision_attention.py            # H100: full size, fp16 + bf16, < 8 min; prints the ratio table
    python benchmarks/vision_attention.py --smoke    # tiny, CPU is fine: a syntax / wiring check

Workload (issue): 32 blocks, hidden 1280, 16 heads, window 112, full-attention blocks 7/15/23/31, random weights;
10,240 patches = 4 images of 448x448 + 2 of 896x672; forward + backward in fp16 and bf16. Rows per dtype:

* ``transformers_sdpa``  — transformers' own sdpa vision attention, unpatched;
* ``flash_varlen_ref``   — ``torch.nn.attention.varlen.varlen_attn`` routed through the attention registry under
  the ``flash_attention_2`` key (as ``../shared/anchors/bench_vit.py`` did), the reference for the ratios;
* ``portvlm_sm70``       — ``portvlm.patch(model, arch="sm70")``: the non-flash (Volta / ROCm) policy, fp16 only;
* ``portvlm_sm90``       — ``portvlm.patch(model, arch="sm90")``: the sm80+ policy.

Headline ratios (fp16, one run): ``nonflash_vs_flash_varlen`` = portvlm_sm70 / flash_varlen_ref time (target
<= 1.2) and ``speedup_vs_transformers_sdpa`` = transformers_sdpa / portvlm_sm70 time (target >= 1.7). Also
portvlm_sm90 / flash (<= 1.05), peak memory vs transformers_sdpa (<= 1) and host syncs per forward (<= 1, from
portvlm's own counter; the CUDA sync-debug count of the whole forward, transformers' own syncs included, is
reported beside it). A text-side figure: a packed training step (two samples in one row) on Qwen2.5-VL-3B-sized
text layers with portvlm's packed attention vs the padded batch, as a tokens/s ratio.

Writes ``benchmarks/results/vision_attention.json`` (and a copy under ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from portvlm.backends import backend_reasons, select  # noqa: E402
from portvlm.backends import kernels as K  # noqa: E402
from portvlm.testing import benchmark  # noqa: E402

FULL = dict(
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
    grid=[[1, 32, 32]] * 4 + [[1, 64, 48]] * 2,  # 4 x 448x448 + 2 x 896x672 in 14px patches = 10,240 patches
    text=dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2, num_hidden_layers=4),
    text_lengths=(2600, 1400),
    iters=5,
    warmup=2,
)
SMOKE = dict(
    vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
    grid=[[1, 8, 8], [1, 16, 12], [1, 4, 4]],
    text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2),
    text_lengths=(40, 24),
    iters=2,
    warmup=1,
)
TARGETS = {"nonflash_vs_flash_varlen": ("<=", 1.2), "speedup_vs_transformers_sdpa": (">=", 1.7),
           "sm80_vs_flash_varlen": ("<=", 1.05), "peak_memory_vs_transformers_sdpa": ("<=", 1.0),
           "portvlm_syncs_per_forward": ("<=", 1)}


# --------------------------------------------------------------------------------------------------------------
def timer(device):
    """Median-of-N wall time of ``fn`` in ms: CUDA events on GPU, perf_counter on CPU."""

    def run(fn, iters, warmup):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def peak_gib(device, fn):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def count_syncs(device, fn):
    """(portvlm's sync counter, CUDA sync-debug warnings) during one call of ``fn``."""
    K.reset_sync_count()
    total = None
    if device == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        total = sum("synchroniz" in str(w.message) for w in caught)
    else:
        fn()
    return K.sync_count(), total


def first_tensor(o):
    if torch.is_tensor(o):
        return o
    pooled = getattr(o, "pooler_output", None)
    return pooled if pooled is not None else o[0]


# --------------------------------------------------------------------------------------------------------------
# The language model around the tower is tiny: only the vision tower runs; portvlm.patch wants the whole model.
_TINY_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})


def build_model(spec, dtype, device):
    """A Qwen2.5-VL model with the benchmark's vision tower (random weights) and a tiny text part; ``(model, tower)``."""
    import transformers

    kwargs = dict(vision_config=dict(spec), text_config=dict(_TINY_TEXT), image_token_id=250, video_token_id=251,
                  vision_start_token_id=252, vision_end_token_id=253)
    if "text_config" not in getattr(transformers.Qwen2_5_VLConfig, "sub_configs", {}):
        kwargs.update(kwargs.pop("text_config"))  # <= 4.51: the text fields are flat on Qwen2_5_VLConfig
    cfg = transformers.Qwen2_5_VLConfig(**kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", torch_dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    tower = getattr(model, "visual", None) or model.model.visual  # <= 4.51: model.visual; later: model.model.visual
    return model, tower


@contextlib.contextmanager
def flash_varlen_registry(model):
    """The anchor's reference: varlen_attn under the ``flash_attention_2`` registry key; restored afterwards."""
    from torch.nn.attention.varlen import varlen_attn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def varlen_fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        cu = kw.get("cu_seq_lens_q")
        if cu is None:
            cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        mx = kw.get("max_length_q") or int(cu.diff().max())
        o = varlen_attn(q, k, v, cu.to(torch.int32), cu.to(torch.int32), int(mx), int(mx), scale=scaling)
        return o[None], None

    mapping = getattr(ALL_ATTENTION_FUNCTIONS, "_global_mapping", ALL_ATTENTION_FUNCTIONS)
    had = "flash_attention_2" in mapping
    old = mapping.get("flash_attention_2")
    configs = {id(m.config): (m.config, m.config._attn_implementation) for m in model.modules() if hasattr(m, "config")}
    mapping["flash_attention_2"] = varlen_fn
    try:
        for cfg, _ in configs.values():
            cfg._attn_implementation = "flash_attention_2"
        yield "varlen_attn via ALL_ATTENTION_FUNCTIONS['flash_attention_2']"
    finally:
        for cfg, impl in configs.values():
            cfg._attn_implementation = impl
        if had:
            mapping["flash_attention_2"] = old
        else:
            mapping.pop("flash_attention_2", None)


@contextlib.contextmanager
def portvlm_patch(model, arch, dtype):
    import portvlm

    with portvlm.patch(model, arch=arch, dtype=dtype) as handle:
        yield str(getattr(handle, "report", ""))[:600]


def _vision_dtype(conf, device, dtype, grid, npatch, patch_dim, flash_ok, run):
    """All modes of one dtype on one freshly built model."""
    rows = []
    v = conf["vision"]
    torch.manual_seed(1)
    px = torch.randn(npatch, patch_dim, device=device, dtype=dtype)
    model, tower = build_model(v, dtype, device)
    base = None
    modes = [("transformers_sdpa", contextlib.nullcontext)]
    modes.append(("flash_varlen_ref", (lambda: flash_varlen_registry(model)) if flash_ok else None))
    if dtype == torch.float16 or device == "cpu":  # sm70 has no bf16; on CPU (smoke) the wiring runs in fp32
        modes.append(("portvlm_sm70", lambda: portvlm_patch(model, "sm70", dtype)))
    modes.append(("portvlm_sm90", lambda: portvlm_patch(model, "sm90", dtype)))
    for mode, ctx in modes:
        row = {"dtype": str(dtype).removeprefix("torch."), "mode": mode, "npatch": npatch}
        if ctx is None:
            row["error"] = "flash varlen reference needs CUDA sm80+ and torch.nn.attention.varlen (not here)"
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        try:
            with ctx() as info:
                if info:
                    row["info"] = info

                def forward():
                    return first_tensor(tower(px, grid_thw=grid))

                def step():
                    model.zero_grad(set_to_none=True)
                    forward().float().pow(2).mean().backward()

                with torch.no_grad():
                    out = forward().float()
                if base is None:
                    base = out
                row["rel_diff_vs_sdpa"] = float((out - base).norm() / base.norm())
                row["finite"] = bool(torch.isfinite(out).all())
                row["fwdbwd_ms"] = round(run(step, conf["iters"], conf["warmup"]), 2)
                row["peak_GiB"] = peak_gib(device, step)
                row["portvlm_syncs_per_forward"], row["cuda_syncs_per_forward"] = count_syncs(device, forward)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
            traceback.print_exc()
        model.zero_grad(set_to_none=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def vision_rows(conf, device, dtypes):
    run = timer(device)
    rows = []
    grid = torch.tensor(conf["grid"], device=device)
    v = conf["vision"]
    patch_dim = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    npatch = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    flash_ok = device == "cuda" and not backend_reasons("torch_varlen", _platform(), "bfloat16", v["hidden_size"] // v["num_heads"])
    for dtype in dtypes:
        rows.extend(_vision_dtype(conf, device, dtype, grid, npatch, patch_dim, flash_ok, run))
    return rows


# --------------------------------------------------------------------------------------------------------------
def _platform():
    from portvlm.platform import detect

    return detect()


def _text_case(conf, device, dtype, forced, platform, head_dim, run):
    """One packed-vs-padded text training step comparison."""
    from transformers import AttentionInterface, Qwen2Config, Qwen2Model

    t = conf["text"]
    lens = conf["text_lengths"]
    row = {"dtype": str(dtype).removeprefix("torch."), "lengths": list(lens)}
    try:
        backend = forced or select(None, platform, dtype, head_dim, need_backward=True).name
        if forced and backend_reasons(forced, platform, dtype, head_dim, need_backward=True):
            backend = select(None, platform, dtype, head_dim, need_backward=True).name
        row["backend"] = backend

        def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
            q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [S, H, D]
            o = K.varlen_attention(q, k, v, kw["cu_seq_lens_q"], kw["max_length_q"], backend=backend, scale=scaling, causal=True)
            return o[None], None

        name = "portvlm_packed_bench"
        AttentionInterface.register(name, packed_attention)
        with contextlib.suppress(Exception):
            from transformers.masking_utils import AttentionMaskInterface

            AttentionMaskInterface.register(name, lambda *a, **kw: None)  # the varlen kernel masks by itself
        cfg = Qwen2Config(vocab_size=1024, max_position_embeddings=8192, **t)
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2Model(cfg).to(dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        x = [torch.randn(n, t["hidden_size"], device=device, dtype=dtype, generator=gen) for n in lens]
        # packed: one row, positions restart per sample
        packed = torch.cat(x)[None]
        pos = torch.cat([torch.arange(n, device=device) for n in lens])[None]
        cu = torch.tensor([0, lens[0], lens[0] + lens[1]], dtype=torch.int32, device=device)
        mx = max(lens)
        # padded: batch of 2, right padding to the longest
        padded = torch.zeros(2, mx, t["hidden_size"], device=device, dtype=dtype)
        mask = torch.zeros(2, mx, dtype=torch.long, device=device)
        for i, (n, xi) in enumerate(zip(lens, x, strict=False)):
            padded[i, :n], mask[i, :n] = xi, 1

        def packed_step():
            cfg._attn_implementation = name
            model.zero_grad(set_to_none=True)
            h = model(inputs_embeds=packed, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=mx, max_length_k=mx).last_hidden_state
            h.float().pow(2).mean().backward()
            return h

        def padded_step():
            cfg._attn_implementation = "sdpa"
            model.zero_grad(set_to_none=True)
            h = model(inputs_embeds=padded, attention_mask=mask).last_hidden_state
            (h.float().pow(2) * mask[..., None]).sum().div(mask.sum() * h.shape[-1]).backward()
            return h

        hp, hb = packed_step().detach().float(), padded_step().detach().float()
        ref = torch.cat([hb[i, :n] for i, n in enumerate(lens)])[None]
        row["rel_diff_packed_vs_padded"] = float((hp - ref).norm() / ref.norm())
        packed_ms = run(packed_step, conf["iters"], conf["warmup"])
        padded_ms = run(padded_step, conf["iters"], conf["warmup"])
        tokens = sum(lens)
        row.update(packed_ms=round(packed_ms, 2), padded_ms=round(padded_ms, 2),
                   packed_tokens_per_s=round(tokens / packed_ms * 1e3), padded_tokens_per_s=round(tokens / padded_ms * 1e3),
                   packed_vs_padded_tokens_per_s=round(padded_ms / packed_ms, 3))
        cfg._attn_implementation = "sdpa"
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        traceback.print_exc()
    return row


def text_rows(conf, device):
    """Packed row (two samples, portvlm varlen attention, causal per sample) vs the padded batch (sdpa + mask)."""
    run = timer(device)
    t = conf["text"]
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    platform = _platform()
    rows = []
    cases = [(torch.float16, "efficient_varlen" if device == "cuda" else None), (torch.bfloat16, None)]
    for dtype, forced in cases:
        row = _text_case(conf, device, dtype, forced, platform, head_dim, run)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------
def ratios(rows):
    def get(mode, dtype, key="fwdbwd_ms"):
        for r in rows:
            if r["mode"] == mode and r["dtype"] == dtype and key in r:
                return r[key]
        return None

    def div(a, b):
        return round(a / b, 3) if a is not None and b else None

    out = {
        "nonflash_vs_flash_varlen": div(get("portvlm_sm70", "float16"), get("flash_varlen_ref", "float16")),
        "speedup_vs_transformers_sdpa": div(get("transformers_sdpa", "float16"), get("portvlm_sm70", "float16")),
    }
    for dt in ("float16", "bfloat16"):
        out[f"sm80_vs_flash_varlen_{dt}"] = div(get("portvlm_sm90", dt), get("flash_varlen_ref", dt))
        out[f"sm80_speedup_vs_transformers_sdpa_{dt}"] = div(get("transformers_sdpa", dt), get("portvlm_sm90", dt))
        for mode in ("portvlm_sm70", "portvlm_sm90"):
            out[f"peak_memory_vs_transformers_sdpa_{mode}_{dt}"] = div(get(mode, dt, "peak_GiB"), get("transformers_sdpa", dt, "peak_GiB"))
            out[f"portvlm_syncs_per_forward_{mode}_{dt}"] = get(mode, dt, "portvlm_syncs_per_forward")
    return out


def verdicts(r):
    checks = {}
    for key, value in r.items():
        for prefix, (op, limit) in TARGETS.items():
            if key.startswith(prefix) and value is not None:
                checks[key] = bool(value <= limit if op == "<=" else value >= limit)
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU (wiring check)")
    ap.add_argument("--iters", type=int, help="timed iterations (median)")
    ap.add_argument("--no-text", action="store_true", help="skip the text-side packed-vs-padded figure")
    ap.add_argument("--out", help="result JSON path (default: benchmarks/results/vision_attention.json; smoke: none)")
    args = ap.parse_args(argv)
    conf = dict(SMOKE if args.smoke else FULL)
    if args.iters:
        conf["iters"] = args.iters
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    rec = benchmark.record("vision_attention", archs=("sm70", "sm90"), device=device, smoke=args.smoke,
                           iters=conf["iters"], warmup=conf["warmup"])
    print(json.dumps(rec.to_json()), flush=True)
    dtypes = (torch.float16, torch.bfloat16) if device == "cuda" else (torch.float32,)
    if args.smoke and device == "cpu":
        dtypes = (torch.float32,)
    rows = vision_rows(conf, device, dtypes)
    text = [] if args.no_text else text_rows(conf, device)
    r = ratios(rows)
    rec.figures.update({k: r[k] for k in ("nonflash_vs_flash_varlen", "speedup_vs_transformers_sdpa")}, ratios=r,
                       targets={k: f"{op} {v}" for k, (op, v) in TARGETS.items()}, met=verdicts(r),
                       anchors_ms={"transformers_sdpa": {"float16": 700, "bfloat16": 743},
                                   "flash_varlen_registry": {"float16": 305, "bfloat16": 311}},
                       vision=rows, text=text, wall_s=round(time.perf_counter() - t0, 1))
    result = rec.figures

    print(f"\n{'dtype':9} {'mode':18} {'fwd+bwd ms':>11} {'peak GiB':>9} {'rel diff':>9} {'syncs pv/cuda':>14}  note")
    for row in rows:
        if "error" in row:
            print(f"{row['dtype']:9} {row['mode']:18} {'-':>11} {'-':>9} {'-':>9} {'-':>14}  ERROR {row['error'][:100]}")
        else:
            syncs = f"{row['portvlm_syncs_per_forward']}/{row['cuda_syncs_per_forward']}"
            peak = "-" if row["peak_GiB"] is None else f"{row['peak_GiB']:.2f}"
            print(f"{row['dtype']:9} {row['mode']:18} {row['fwdbwd_ms']:11.1f} {peak:>9} {row['rel_diff_vs_sdpa']:9.2e} {syncs:>14}")
    for row in text:
        if "error" in row:
            print(f"text {row['dtype']:9} ERROR {row['error'][:120]}")
        else:
            print(f"text {row['dtype']:9} {row['backend']:17} packed {row['packed_tokens_per_s']} tok/s vs padded "
                  f"{row['padded_tokens_per_s']} tok/s: x{row['packed_vs_padded_tokens_per_s']} (rel diff {row['rel_diff_packed_vs_padded']:.1e})")
    print("\nratio                                              value   target   met")
    for key, value in r.items():
        target = next((f"{op} {v}" for p, (op, v) in TARGETS.items() if key.startswith(p)), "")
        met = result["met"].get(key)
        print(f"{key:50} {('-' if value is None else value)!s:>7}  {target:>7}   {'-' if met is None else ('yes' if met else 'NO')}")
    print(f"wall {result['wall_s']} s")

    name = "vision_attention" + ("_smoke" if args.smoke else "") + ".json"
    for path in benchmark.write(rec, name, path=args.out):  # $OUT, and --out or benchmarks/results/ (not a smoke)
        print("wrote", path)
    # A non-finite forward is a failure, never a figure (issue #22): exit non-zero after the results are written.
    bad = [f"{row['dtype']} {row['mode']}" for row in rows if "error" not in row and not row.get("finite", True)]
    if bad:
        print("FAIL: non-finite output in", ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
