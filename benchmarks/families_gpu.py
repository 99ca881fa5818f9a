"""Qwen3.5 and GLM-4.1V vision and text parity under the sm70 (fp16, emulated) and sm90 (bf16) policies, real widths.

    OUT=/tmp/out python3 benchmarks/families_gpu.py          # one H200: ~2-4 min; JSON under $OUT, a table last
    python3 benchmarks/families_gpu.py --tiny --device cpu   # the CPU check of the script itself (tiny widths)

What runs, per family x policy:
- the model is built from its config class's defaults (the released checkpoint's widths: Qwen3.5's and
  GLM-4.1V-9B's hidden sizes, heads, head dims, vocab, ViT width) with FEW layers (``--text-layers``,
  ``--vision-depth``; Qwen3.5 keeps its linear/full pattern: 3 Gated DeltaNet layers then 1 full attention), random
  weights from one seed;
- reference: an unpatched fp32 copy, eager attention, each image / each text sample ALONE (per-segment oracle);
- tested: a copy in the policy's dtype under ``portvlm.patch(model, arch=...)``: the images packed in one tower call
  (block-diagonal varlen), the text samples packed in one row (``cu_seq_lens_q``; Qwen3.5's DeltaNet layers through
  ``portvlm.shims.linear_attention``);
- tolerance: ``portvlm``'s table keyed by (device kind, dtype, backend, "fwd"); the evidence (``hardware`` or
  ``emulated`` + what differs) is the patch report's;
- Qwen3.5 negative control: the unpatched model in the policy dtype over the packed row without portvlm (upstream's
  torch fallback: silent mixing up to 5.17, a ValueError from 5.23): recorded, and it must NOT match the reference
  (otherwise the check could not see a leak).
A non-finite output, an error or a parity miss is a failure: the script exits 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import portvlm  # noqa: E402
from portvlm.testing.tolerances import device_kind, tolerance  # noqa: E402

GRIDS = [(1, 16, 16), (1, 24, 32), (1, 32, 16)]  # three images, patches (t, h, w): 256 + 768 + 512 rows
TEXT_LENGTHS = [300, 77, 513]  # three samples in one packed row (longer and shorter than the 64-token chunks)
TINY_GRIDS = [(1, 4, 4), (1, 8, 4), (1, 4, 8)]
TINY_TEXT = [70, 3, 40]


def build_config(family: str, tiny: bool, text_layers: int, vision_depth: int):
    """The family's config at its defaults' widths (or tiny), with few layers."""
    import transformers

    if family == "qwen3_5":
        cfg = transformers.Qwen3_5Config()
        text = cfg.text_config
        text.num_hidden_layers = text_layers
        text.layer_types = (["linear_attention"] * 3 + ["full_attention"]) * (text_layers // 4) or ["full_attention"]
    elif family == "glm4v":
        cfg = transformers.Glm4vConfig()
        text = cfg.text_config
        text.num_hidden_layers = text_layers
    else:
        raise SystemExit(f"unknown family {family}")
    cfg.vision_config.depth = vision_depth
    if tiny:  # CPU check of this script: same structure, small widths
        text.hidden_size, text.intermediate_size, text.vocab_size = 64, 128, 512
        text.num_attention_heads, text.num_key_value_heads, text.head_dim = 4, 2, 16
        if family == "qwen3_5":
            text.linear_num_value_heads, text.linear_num_key_heads = 4, 2
            text.linear_key_head_dim = text.linear_value_head_dim = 16
        else:
            text.rope_parameters["mrope_section"] = [2, 3, 3]  # head_dim 16 -> 8 frequencies
        v = cfg.vision_config
        v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size = 32, 64, 2, 64
        if hasattr(v, "image_size"):
            v.image_size = 56
    return cfg


def image_features(model, pixels, grid):
    """Per-image merged features ``[tokens, hidden]`` (list), whatever ``get_image_features`` returns here."""
    out = model.model.get_image_features(pixels, grid)
    out = getattr(out, "pooler_output", out)
    if isinstance(out, torch.Tensor):
        merge = model.config.vision_config.spatial_merge_size
        out = torch.split(out, [int(t * h * w) // merge**2 for t, h, w in grid.tolist()])
    return list(out)


def text_states(model, ids, positions, **packed):
    out = model.model(input_ids=ids, position_ids=positions, use_cache=False, **packed)
    return out.last_hidden_state


def compare(got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> dict:
    got, ref = got.float(), ref.float()
    diff = (got - ref).abs()
    return {
        "max_abs_err": float(diff.max()),
        "max_abs_ref": float(ref.abs().max()),
        "rel_err": float(diff.max() / ref.abs().max().clamp_min(1e-12)),
        "finite": bool(torch.isfinite(got).all()),
        # the table's elementwise bound, and the same budget relative to the output's scale (random-init towers
        # give small outputs, where an absolute atol alone would pass anything)
        "within": bool((diff <= atol + rtol * ref.abs()).all()) and float(diff.max()) <= max(atol, rtol) * float(
            ref.abs().max()),
    }


def run_case(family: str, arch: str, args, device: str) -> dict:
    """One family under one arch's policy: vision and text parity against the fp32 per-segment reference."""
    torch.manual_seed(0)
    import transformers

    cfg = build_config(family, args.tiny, args.text_layers, args.vision_depth)
    cfg._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        getattr(cfg, sub)._attn_implementation = "eager"
    ref = transformers.AutoModelForImageTextToText.from_config(cfg).to(device).eval()
    test = copy.deepcopy(ref)
    record = {"family": family, "arch": arch, "transformers": transformers.__version__, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "widths": "tiny" if args.tiny else "config defaults (released checkpoint widths)",
              "text_layers": args.text_layers, "vision_depth": args.vision_depth,
              "text_hidden": cfg.text_config.hidden_size, "vision_hidden": cfg.vision_config.hidden_size}
    handle = portvlm.patch(test, arch=arch)
    try:
        dtype = handle.dtype
        test.to(dtype)
        rep = handle.report
        record.update(dtype=rep.dtype, evidence="emulated" if rep.emulation else "hardware", emulation=rep.emulation,
                      vision_backend=rep.vision_backend.name, text_backend=rep.text_backend.name,
                      shims=sorted(rep.shim_names()))
        kind = device_kind(arch, device)
        grids = TINY_GRIDS if args.tiny else GRIDS
        lengths = TINY_TEXT if args.tiny else TEXT_LENGTHS
        vc = cfg.vision_config
        pdim = getattr(vc, "in_channels", 3) * vc.temporal_patch_size * vc.patch_size**2
        gen = torch.Generator(device="cpu").manual_seed(1)
        pix = [torch.randn(t * h * w, pdim, generator=gen).to(device) for t, h, w in grids]
        grid_t = torch.tensor(grids, device=device)

        # vision: three images in one tower call (patched, policy dtype) vs each alone (fp32 eager reference)
        with torch.no_grad():
            want = [image_features(ref, p, grid_t[i:i + 1])[0] for i, p in enumerate(pix)]
            t0 = time.perf_counter()
            got = image_features(test, torch.cat(pix).to(dtype), grid_t)
            record["vision_s"] = time.perf_counter() - t0
        atol, rtol = tolerance(kind, rep.dtype, rep.vision_backend.name, "fwd")
        record["vision"] = compare(torch.cat(got), torch.cat(want), atol, rtol) | {"atol": atol, "rtol": rtol}

        # text: three samples packed in one row (cu_seq_lens_q) vs each alone
        vocab = cfg.text_config.vocab_size
        ids = [torch.randint(3, min(vocab, 30000), (1, n), generator=gen).to(device) for n in lengths]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        row = torch.cat(ids, 1)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
        packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
        with torch.no_grad():
            want = torch.cat([text_states(ref, x, torch.arange(x.shape[1], device=device)[None]) for x in ids], 1)
            t0 = time.perf_counter()
            got = text_states(test, row, positions, **packed)
            record["text_s"] = time.perf_counter() - t0
        atol, rtol = tolerance(kind, rep.dtype, rep.text_backend.name, "fwd")
        record["text"] = compare(got, want, atol, rtol) | {"atol": atol, "rtol": rtol}
        record["calls"] = dict(handle.state.calls)  # portvlm's vision / text / linear-attention calls seen
    finally:
        handle.revert()

    if family == "qwen3_5":  # the leak portvlm prevents: upstream's fallback over the same packed row
        control = {}
        try:
            with torch.no_grad():
                leaked = text_states(test, row, positions, **packed)
            control = compare(leaked, want, atol, rtol) | {"outcome": "upstream ran the packed row"}
        except ValueError as exc:  # 5.23+: refuses without flash-linear-attention
            control = {"outcome": f"upstream refused: {exc}"}
            with torch.no_grad():
                leaked = text_states(test, row, positions)  # no boundaries at all: what a packed row would do
            control |= compare(leaked, want, atol, rtol)
        record["negative_control"] = control
    return record


def failures(rec: dict) -> list[str]:
    bad = []
    for part in ("vision", "text"):
        r = rec.get(part)
        key = {"vision": "vision", "text": "text_packed"}[part]
        if r is not None and rec.get("calls", {}).get(key, 0) == 0:
            bad.append(f"{part}: portvlm's attention never ran (calls {rec.get('calls')})")
        if r is None:
            bad.append(f"{part}: not run")
        elif not r["finite"]:
            bad.append(f"{part}: non-finite output")
        elif not r["within"]:
            bad.append(f"{part}: max |err| {r['max_abs_err']:.3g} outside atol {r['atol']} rtol {r['rtol']}")
    if rec["family"] == "qwen3_5":
        if rec.get("calls", {}).get("linear_packed", 0) == 0:
            bad.append("text: the DeltaNet layers never took portvlm's packed path")
        ctl = rec.get("negative_control", {})
        if ctl.get("within", False):
            bad.append("negative control matched the reference: the check cannot see a leak")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "families_gpu_out"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (the CPU check of this script)")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--families", default="qwen3_5,glm4v")
    parser.add_argument("--archs", default="sm70,sm90")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    os.makedirs(args.out, exist_ok=True)
    rows, failed = [], 0
    for family in args.families.split(","):
        for arch in args.archs.split(","):
            t0 = time.perf_counter()
            try:
                rec = run_case(family, arch, args, args.device)
                rec["failures"] = failures(rec)
            except Exception as exc:  # noqa: BLE001 - recorded as a failure, never a figure
                rec = {"family": family, "arch": arch, "failures": [f"{type(exc).__name__}: {exc}"],
                       "traceback": traceback.format_exc()}
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            failed += bool(rec["failures"])
            with open(os.path.join(args.out, f"families_gpu_{family}_{arch}.json"), "w") as fh:
                json.dump(rec, fh, indent=1, default=str)
            rows.append(rec)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'family':8} {'arch':5} {'dtype':8} {'evidence':9} {'vision err/ref':>16} {'text err/ref':>16} "
          f"{'control err':>12} {'s':>5}  result")
    for r in rows:
        v, t, c = r.get("vision", {}), r.get("text", {}), r.get("negative_control", {})
        fig = (lambda d: f"{d['max_abs_err']:.2e}/{d['max_abs_ref']:.1e}" if "max_abs_err" in d else "-")
        print(f"{r['family']:8} {r['arch']:5} {r.get('dtype', '-'):8} {r.get('evidence', '-'):9} {fig(v):>16} "
              f"{fig(t):>16} {c.get('max_abs_err', float('nan')):12.2e} {r['seconds']:5.0f}  "
              + ("PASS" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
