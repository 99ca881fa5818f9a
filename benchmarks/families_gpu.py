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
- upstream: an unpatched copy in the policy's dtype, sdpa, no portvlm, on each image / each text sample ALONE: its
  distance to the fp32 reference (``upstream_alone_vs_fp32``) is what this model in this dtype has anyway;
- two comparisons per tower. vs the fp32 reference: within ``portvlm.testing.tolerances.budget`` keyed by (device
  kind, dtype, backend, "fwd") times, for text, the family's declared ``tolerance_scale`` (Qwen3.5: its DeltaNet
  gated RMSNorm amplifies rounding ~85x), or within twice upstream's own distance measured in the same run (the
  dtype's rtol unscaled), whichever admits it (the bound applied, both figures and their ratio are recorded): at
  real widths the dtype's own error outgrows a table tuned on tiny models (GLM-4.1V's text in bf16, 4096 wide x 4
  layers: 0.28 from fp32 on each sample alone, no packing involved; on the CPU at tiny widths GLM is no noisier
  than Qwen2.5-VL, so it declares no scale: the bound is measured, not declared).
  And packed vs the same patched model on each item alone in the same dtype (the leak check: the dtype's table
  budget with no scale, or twice the model's own distance to fp32 on each item alone where larger). Upstream's copy
  non-finite or failing is a failure, never a bound. The evidence (``hardware`` or ``emulated`` + what differs) is
  the patch report's;
- Qwen3.5 negative control: the unpatched model in the policy dtype over the packed row without portvlm (upstream's
  torch fallback: silent mixing up to 5.17, a ValueError from 5.23) against the model on each alone: it must miss the
  leak check's bound (otherwise that check could not see a leak) and the vs-fp32 check's measured bound (otherwise
  twice upstream's distance could hide one); whether the declared-scale table budget admits it is recorded, not held
  (Qwen3.5's x30 does at tiny widths: there the leak check is what sees a leak).
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


def vs_fp32(got: torch.Tensor, want: torch.Tensor, upstream: torch.Tensor, table, rtol: float) -> dict:
    """portvlm's output vs the fp32 reference: within ``table`` or within twice upstream's own distance to it.

    ``upstream``: the unpatched model in the same dtype (sdpa, each item alone) — what this model in this dtype
    carries without portvlm, measured in the same run; the question at real widths is whether the port adds error
    beyond it. The measured bound is ``tight``'s pattern: atol twice upstream's max |err|, ``rtol`` the dtype's
    table entry UNscaled (a family's declared scale stands in for a measurement; where one is made it is not
    stacked on it). A non-finite upstream output is no bound: ``upstream_finite`` False, which ``failures`` rejects.
    """
    up = compare(upstream, want, *table)
    up_err = up["max_abs_err"]
    usable = up["finite"] and up_err == up_err  # NaN compares unequal: never a bound
    res = compare(got, want, *table)
    res["within_table"] = res["within"]
    res["within_upstream"] = usable and compare(got, want, 2 * up_err, rtol)["within"]
    # the bound that admits the result (the declared table first); a miss is reported against the larger atol
    bound = "table" if res["within_table"] else "upstream" if res["within_upstream"] else (
        "upstream" if usable and 2 * up_err > table.atol else "table")
    return res | {
        "within": res["within_table"] or res["within_upstream"], "bound": bound,
        "atol": 2 * up_err if bound == "upstream" else table.atol, "rtol": rtol if bound == "upstream" else table.rtol,
        "table_atol": table.atol, "table_rtol": table.rtol, "upstream_atol": 2 * up_err, "upstream_rtol": rtol,
        "upstream_alone_vs_fp32": up_err, "upstream_finite": usable,
        # portvlm's distance over upstream's: ~1 where the dtype explains it all; above 2 only the table can pass it
        "ratio_to_upstream": res["max_abs_err"] / up_err if usable and up_err > 0 else None,
    } | {k: v for k, v in table.figures().items() if k.startswith("tolerance_")}


def run_case(family: str, arch: str, args, device: str) -> dict:
    """One family under one arch's policy: vision and text parity against the fp32 per-segment reference."""
    torch.manual_seed(0)
    import transformers

    cfg = build_config(family, args.tiny, args.text_layers, args.vision_depth)
    cfg._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        getattr(cfg, sub)._attn_implementation = "eager"
    ref = transformers.AutoModelForImageTextToText.from_config(cfg).to(device).eval()
    # evidence from the policy's own match of this host (hardware on the arch itself, else emulated and why)
    rec = benchmark.record("families_gpu", archs=[arch], device=device, smoke=args.tiny, family=family, arch=arch,
                           widths="tiny" if args.tiny else "config defaults (released checkpoint widths)",
                           text_layers=args.text_layers, vision_depth=args.vision_depth,
                           text_hidden=cfg.text_config.hidden_size, vision_hidden=cfg.vision_config.hidden_size)
    record = rec.figures  # the figures below go into the record's header
    dtype = getattr(torch, portvlm.resolve_policy(arch).dtype)
    kind = device_kind(arch, device)
    family_record = models.by_type(family)

    grids = TINY_GRIDS if args.tiny else GRIDS
    lengths = TINY_TEXT if args.tiny else TEXT_LENGTHS
    vc = cfg.vision_config
    pdim = getattr(vc, "in_channels", 3) * vc.temporal_patch_size * vc.patch_size**2
    gen = torch.Generator(device="cpu").manual_seed(1)
    pix = [torch.randn(t * h * w, pdim, generator=gen).to(device) for t, h, w in grids]
    grid_t = torch.tensor(grids, device=device)
    vocab = cfg.text_config.vocab_size
    ids = [torch.randint(3, min(vocab, 30000), (1, n), generator=gen).to(device) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    row = torch.cat(ids, 1)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))

    def each_image(model, cast):
        return torch.cat([image_features(model, p.to(cast), grid_t[i:i + 1])[0] for i, p in enumerate(pix)])

    def each_sample(model):
        return torch.cat([text_states(model, x, torch.arange(x.shape[1], device=device)[None]) for x in ids], 1)

    # the fp32 eager reference and upstream's own copy in the policy dtype (sdpa, no portvlm), each item alone, both
    # before portvlm patches anything; an error here fails the case (main records it), never a missing bound
    upstream = copy.deepcopy(ref)
    upstream.set_attn_implementation("sdpa")
    upstream.to(dtype)
    record["upstream"] = {"attn_implementation": upstream.config.text_config._attn_implementation,
                          "vision_attn_implementation": upstream.config.vision_config._attn_implementation,
                          "dtype": str(dtype).removeprefix("torch.")}
    with torch.no_grad():
        want_v, up_v = each_image(ref, torch.float32), each_image(upstream, dtype)
        want_t, up_t = each_sample(ref), each_sample(upstream)
    del upstream
    if device == "cuda":
        torch.cuda.empty_cache()

    test = copy.deepcopy(ref)
    handle = portvlm.patch(test, arch=arch)
    try:
        if handle.dtype != dtype:
            raise RuntimeError(f"the patch's dtype {handle.dtype} is not the policy's {dtype}: upstream's copy was "
                               "cast to the wrong one")
        test.to(dtype)
        rep = handle.report
        record.update(dtype=rep.dtype, vision_backend=rep.vision_backend.name, text_backend=rep.text_backend.name,
                      shims=sorted(rep.shim_names()))
        # vision: three images in one tower call (patched, policy dtype) vs each alone (fp32 eager reference; upstream's
        # own dtype error beside it), and vs the same patched tower on each alone (what packing adds: the leak check)
        with torch.no_grad():
            alone = each_image(test, dtype)
            t0 = time.perf_counter()
            got = torch.cat(image_features(test, torch.cat(pix).to(dtype), grid_t))
            record["vision_s"] = time.perf_counter() - t0
        vb = budget(kind, rep.dtype, rep.vision_backend.name, "fwd", family=family_record, output="vision")
        record["vision"] = vs_fp32(got, want_v, up_v, vb, tolerance(kind, rep.dtype, rep.vision_backend.name, "fwd")[1])
        floor = compare(alone, want_v, *vb)["max_abs_err"]
        record["vision_packing"] = compare(got, alone, *tight(kind, rep.dtype, floor)) | (
            tight_figures(kind, rep.dtype, floor))

        # text: three samples packed in one row (cu_seq_lens_q) vs each alone
        with torch.no_grad():
            alone = each_sample(test)
            t0 = time.perf_counter()
            got = text_states(test, row, positions, **packed)
            record["text_s"] = time.perf_counter() - t0
        # vs fp32 eager: the table's budget for this dtype and backend, times the family's declared scale (Qwen3.5's
        # gated RMSNorm amplifies the policy dtype's rounding as it does fp32's; portvlm.testing.tolerances.budget),
        # or twice upstream's own distance in this dtype, whichever admits it
        tb = budget(kind, rep.dtype, rep.text_backend.name, "fwd", family=family_record, output="text")
        record["text"] = vs_fp32(got, want_t, up_t, tb, tolerance(kind, rep.dtype, rep.text_backend.name, "fwd")[1])
        floor = compare(alone, want_t, *tb)["max_abs_err"]
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
        # held to the same tight bound as portvlm's packed row against the same model alone (the leak check), and to
        # the vs-fp32 check's measured bound (2x upstream's distance): it must miss both, or either could hide a leak
        control |= compare(leaked, alone, *tight(kind, rep.dtype, floor))
        txt = record["text"]
        control |= {"vs_fp32_max_abs_err": compare(leaked, want_t, *tb)["max_abs_err"],
                    "vs_fp32_within_upstream": compare(leaked, want_t, txt["upstream_atol"], txt["upstream_rtol"])[
                        "within"],
                    # recorded, not held: a declared scale (Qwen3.5's x30, rtol too) can admit O(1) errors; the
                    # leak check above is what sees a leak there
                    "vs_fp32_within_table": compare(leaked, want_t, *tb)["within"]}
        record["negative_control"] = control
    return rec


def failures(rec: dict) -> list[str]:
    """Every reason this case's record fails (empty: it passes)."""
    bad = []
    for part in ("vision", "text", "vision_packing", "text_packing"):
        r = rec.get(part)
        key = {"vision": "vision", "text": "text_packed"}[part.split("_")[0]]
        if r is not None and rec.get("calls", {}).get(key, 0) == 0:
            bad.append(f"{part}: portvlm's attention never ran (calls {rec.get('calls')})")
        if r is None:
            bad.append(f"{part}: not run")
            continue
        if r.get("upstream_finite") is False:  # vs fp32 only: upstream's own copy is the bound's other half
            bad.append(f"{part}: upstream's own {rec.get('dtype')} copy gave non-finite output (no bound)")
        if not r["finite"]:
            bad.append(f"{part}: non-finite output")
        elif not r["within"]:
            how = (f" (table {r['table_atol']:g}/{r['table_rtol']:g}; 2x upstream's {r['upstream_alone_vs_fp32']:.3g}"
                   f"/{r['upstream_rtol']:g})") if "table_atol" in r else ""
            bad.append(f"{part}: max |err| {r['max_abs_err']:.3g} outside atol {r['atol']:g} rtol {r['rtol']:g}{how}")
    if rec["family"] == "qwen3_5":
        if rec.get("calls", {}).get("linear_packed", 0) == 0:
            bad.append("text: the DeltaNet layers never took portvlm's packed path")
        ctl = rec.get("negative_control", {})
        if "vs_fp32_within_upstream" not in ctl:
            bad.append("negative control: not run")
        if ctl.get("within", False):
            bad.append("negative control matched the reference: the check cannot see a leak")
        if ctl.get("vs_fp32_within_upstream", False):
            bad.append("negative control within 2x upstream's distance to fp32: the vs-fp32 check's measured bound "
                       "could hide a leak")
    return bad


def _fig(d: dict) -> str:
    return f"{d['max_abs_err']:.2e}/{d['max_abs_ref']:.1e}" if "max_abs_err" in d else "-"


def _up(d: dict) -> str:
    if "upstream_alone_vs_fp32" not in d:
        return "-"
    ratio = "-" if d["ratio_to_upstream"] is None else f"{d['ratio_to_upstream']:.2f}"
    return f"{d['upstream_alone_vs_fp32']:.2e} x{ratio} {d['bound'][0].upper()}"


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
    print(f"\n{'family':8} {'arch':5} {'dtype':8} {'evidence':9} {'vision vs fp32':>16} {'upstream':>17} "
          f"{'pack':>8} {'text vs fp32':>16} {'upstream':>17} {'pack':>8} {'control':>8} {'s':>4}  result")
    for r in rows:
        v, t, c = r.get("vision", {}), r.get("text", {}), r.get("negative_control", {})
        print(f"{r['family']:8} {r['arch']:5} {r.get('dtype', '-'):8} {r.get('evidence', '-'):9} {_fig(v):>16} "
              f"{_up(v):>17} {_err(r.get('vision_packing', {})):>8} {_fig(t):>16} {_up(t):>17} "
              f"{_err(r.get('text_packing', {})):>8} {_err(c):>8} {r['seconds']:4.0f}  "
              + ("PASS" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])))
    print("vs fp32: portvlm (packed) vs the fp32 eager reference (each alone), |err|/|ref|; upstream: the unpatched "
          "model in the same dtype (sdpa, each alone) vs fp32, portvlm's error over it, and the bound that applied "
          "(T: the dtype's table budget, text x the family's declared scale; U: 2x upstream's with the dtype's "
          "unscaled rtol, where only that admits it); pack: packed vs the same patched model on each alone, the "
          "dtype's budget unscaled or 2x the model's own alone-vs-fp32 distance; control: upstream's fallback on the "
          "packed row vs alone (must miss the pack bound and 2x upstream's)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
