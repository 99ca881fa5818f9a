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
- two comparisons per tower: vs the fp32 reference, within ``portvlm.testing.tolerances.budget`` keyed by (device
  kind, dtype, backend, "fwd") and, for text, the family's declared ``tolerance_scale`` (Qwen3.5: its DeltaNet
  gated RMSNorm amplifies rounding ~85x, so bf16's distance to fp32 is too; 0.16 on one H200 against an unscaled
  0.1); and packed vs the same patched model on each item alone in the same dtype (the leak check: the dtype's
  table budget with no scale, or twice the model's own distance to fp32 on each item alone where larger); the evidence (``hardware`` or ``emulated`` + what differs) is the patch report's;
- Qwen3.5 negative control: the unpatched model in the policy dtype over the packed row without portvlm (upstream's
  torch fallback: silent mixing up to 5.17, a ValueError from 5.23) against the model on each alone: it must miss the
  leak check's bound (otherwise that check could not see a leak).
- GLM-4.1V at real widths takes the released checkpoint's text rope (partial_rotary_factor 0.5, mrope 8/12/12):
  ``Glm4vConfig()``'s defaults leave the factor at 1.0, which no checkpoint uses and the mrope split rejects.
A non-finite output, an error or a parity miss is a failure: the script exits 1.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import portvlm  # noqa: E402
from portvlm import models  # noqa: E402
from portvlm.testing import benchmark  # noqa: E402
from portvlm.testing.tolerances import budget, device_kind, tolerance  # noqa: E402

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
        if not tiny:
            # GLM-4.1V-9B's released text rope (config.json): rotary on half of each 128-wide head, 32 frequencies
            # split t/h/w 8/12/12. Glm4vConfig()'s defaults leave partial_rotary_factor at 1.0 (64 frequencies),
            # which no checkpoint uses and which the mrope split rejects ("split_sizes [8, 12, 12] ... 64").
            text.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12],
                                    "partial_rotary_factor": 0.5}
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


def tight(kind: str, dtype: str, floor: float) -> tuple[float, float]:
    """The leak check's bound: packed vs each alone through the SAME patched model in the SAME dtype.

    Only kernel shapes differ between the two runs (one block-diagonal call vs one call per item), so what may differ
    is the policy dtype's rounding: the table's entry for that dtype (no family scale), or twice the rounding this
    very model shows on each item alone against fp32 (``floor``, measured in the same run) where that is larger —
    Qwen3.5's DeltaNet gated RMSNorm amplifies any rounding difference ~85x, shape-dependent ones in bf16 too. A leak
    across items moves outputs by O(1) (the negative control: ~5 on Qwen3.5), which this bound must see.
    """
    atol, rtol = tolerance(kind, dtype, None, "fwd")
    return max(atol, 2 * floor), rtol


def tight_figures(kind: str, dtype: str, floor: float) -> dict:
    atol, rtol = tight(kind, dtype, floor)
    return {"atol": atol, "rtol": rtol, "alone_vs_fp32_max_abs_err": floor,
            "bound": f"the table's {dtype} budget ({kind}, no family scale) or 2x this model's own distance to fp32 "
                     "on each item alone, the larger: same model, same dtype, packed vs each alone"}


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
    # evidence from the policy's own match of this host (hardware on the arch itself, else emulated and why)
    rec = benchmark.record("families_gpu", archs=[arch], device=device, smoke=args.tiny, family=family, arch=arch,
                           widths="tiny" if args.tiny else "config defaults (released checkpoint widths)",
                           text_layers=args.text_layers, vision_depth=args.vision_depth,
                           text_hidden=cfg.text_config.hidden_size, vision_hidden=cfg.vision_config.hidden_size)
    record = rec.figures  # the figures below go into the record's header
    handle = portvlm.patch(test, arch=arch)
    try:
        dtype = handle.dtype
        test.to(dtype)
        rep = handle.report
        record.update(dtype=rep.dtype, vision_backend=rep.vision_backend.name, text_backend=rep.text_backend.name,
                      shims=sorted(rep.shim_names()))
        kind = device_kind(arch, device)
        grids = TINY_GRIDS if args.tiny else GRIDS
        lengths = TINY_TEXT if args.tiny else TEXT_LENGTHS
        vc = cfg.vision_config
        pdim = getattr(vc, "in_channels", 3) * vc.temporal_patch_size * vc.patch_size**2
        gen = torch.Generator(device="cpu").manual_seed(1)
        pix = [torch.randn(t * h * w, pdim, generator=gen).to(device) for t, h, w in grids]
        grid_t = torch.tensor(grids, device=device)

        family_record = models.by_type(family)
        # vision: three images in one tower call (patched, policy dtype) vs each alone (fp32 eager reference), and
        # vs the same patched tower on each alone (what packing adds: the leak check, tight)
        with torch.no_grad():
            want = [image_features(ref, p, grid_t[i:i + 1])[0] for i, p in enumerate(pix)]
            alone = [image_features(test, p.to(dtype), grid_t[i:i + 1])[0] for i, p in enumerate(pix)]
            t0 = time.perf_counter()
            got = image_features(test, torch.cat(pix).to(dtype), grid_t)
            record["vision_s"] = time.perf_counter() - t0
        vb = budget(kind, rep.dtype, rep.vision_backend.name, "fwd", family=family_record, output="vision")
        record["vision"] = compare(torch.cat(got), torch.cat(want), *vb) | vb.figures()
        floor = compare(torch.cat(alone), torch.cat(want), *vb)["max_abs_err"]
        record["vision_packing"] = compare(torch.cat(got), torch.cat(alone), *tight(kind, rep.dtype, floor)) | (
            tight_figures(kind, rep.dtype, floor))

        # text: three samples packed in one row (cu_seq_lens_q) vs each alone
        vocab = cfg.text_config.vocab_size
        ids = [torch.randint(3, min(vocab, 30000), (1, n), generator=gen).to(device) for n in lengths]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        row = torch.cat(ids, 1)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
        packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
        with torch.no_grad():
            want = torch.cat([text_states(ref, x, torch.arange(x.shape[1], device=device)[None]) for x in ids], 1)
            alone = torch.cat([text_states(test, x, torch.arange(x.shape[1], device=device)[None]) for x in ids], 1)
            t0 = time.perf_counter()
            got = text_states(test, row, positions, **packed)
            record["text_s"] = time.perf_counter() - t0
        # vs fp32 eager: the table's budget for this dtype and backend, times the family's declared scale (Qwen3.5's
        # gated RMSNorm amplifies the policy dtype's rounding as it does fp32's; portvlm.testing.tolerances.budget)
        tb = budget(kind, rep.dtype, rep.text_backend.name, "fwd", family=family_record, output="text")
        record["text"] = compare(got, want, *tb) | tb.figures()
        floor = compare(alone, want, *tb)["max_abs_err"]
        record["text_packing"] = compare(got, alone, *tight(kind, rep.dtype, floor)) | tight_figures(kind, rep.dtype,
                                                                                                      floor)
        record["calls"] = dict(handle.state.calls)  # portvlm's vision / text / linear-attention calls seen
    finally:
        handle.revert()

    if family == "qwen3_5":  # the leak portvlm prevents: upstream's fallback over the same packed row
        control = {}
        try:
            with torch.no_grad():
                leaked = text_states(test, row, positions, **packed)
            control = {"outcome": "upstream ran the packed row"}
        except ValueError as exc:  # 5.23+: refuses without flash-linear-attention
            control = {"outcome": f"upstream refused: {exc}"}
            with torch.no_grad():
                leaked = text_states(test, row, positions)  # no boundaries at all: what a packed row would do
        # held to the same tight bound as portvlm's packed row against the same model alone: it must miss it
        control |= compare(leaked, alone, *tight(kind, rep.dtype, floor)) | {"vs_fp32_max_abs_err": compare(
            leaked, want, *tb)["max_abs_err"]}
        record["negative_control"] = control
    return rec


def failures(rec: dict) -> list[str]:
    bad = []
    for part in ("vision", "text", "vision_packing", "text_packing"):
        r = rec.get(part)
        key = {"vision": "vision", "text": "text_packed"}[part.split("_")[0]]
        if r is not None and rec.get("calls", {}).get(key, 0) == 0:
            bad.append(f"{part}: portvlm's attention never ran (calls {rec.get('calls')})")
        if r is None:
            bad.append(f"{part}: not run")
        elif not r["finite"]:
            bad.append(f"{part}: non-finite output")
        elif not r["within"]:
            bad.append(f"{part}: max |err| {r['max_abs_err']:.3g} outside atol {r['atol']:g} rtol {r['rtol']:g}")
    if rec["family"] == "qwen3_5":
        if rec.get("calls", {}).get("linear_packed", 0) == 0:
            bad.append("text: the DeltaNet layers never took portvlm's packed path")
        ctl = rec.get("negative_control", {})
        if ctl.get("within", False):
            bad.append("negative control matched the reference: the check cannot see a leak")
    return bad


def _fig(d: dict) -> str:
    return f"{d['max_abs_err']:.2e}/{d['max_abs_ref']:.1e}" if "max_abs_err" in d else "-"


def _err(d: dict) -> str:
    return f"{d['max_abs_err']:.2e}" if "max_abs_err" in d else "-"


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
                rec.figures["failures"] = failures(rec.figures)
            except Exception as exc:  # noqa: BLE001 - recorded as a failure, never a figure
                rec = benchmark.record("families_gpu", archs=[arch], device=args.device, smoke=args.tiny, family=family,
                                       arch=arch, failures=[f"{type(exc).__name__}: {exc}"],
                                       traceback=traceback.format_exc())
            rec.figures["seconds"] = round(time.perf_counter() - t0, 1)
            failed += bool(rec.figures["failures"])
            benchmark.write(rec, f"families_gpu_{family}_{arch}.json", out_dir=args.out, results=False)
            rows.append(rec.figures | {"evidence": rec.evidence})
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'family':8} {'arch':5} {'dtype':8} {'evidence':9} {'vision vs fp32':>16} {'vision pack':>11} "
          f"{'text vs fp32':>16} {'text pack':>10} {'control':>9} {'s':>5}  result")
    for r in rows:
        v, t, c = r.get("vision", {}), r.get("text", {}), r.get("negative_control", {})
        print(f"{r['family']:8} {r['arch']:5} {r.get('dtype', '-'):8} {r.get('evidence', '-'):9} {_fig(v):>16} "
              f"{_err(r.get('vision_packing', {})):>11} {_fig(t):>16} {_err(r.get('text_packing', {})):>10} "
              f"{_err(c):>9} {r['seconds']:5.0f}  " + ("PASS" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])))
    print("vs fp32: the policy dtype's table budget (text x the family's declared scale); pack: packed vs the same "
          "patched model on each alone, the dtype's budget unscaled or 2x the model's own alone-vs-fp32 distance; control: upstream's fallback on the packed row vs "
          "alone (must miss that bound)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
