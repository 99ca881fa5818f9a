"""Numeric parity: the patched model's logits and vision features against an unpatched fp32 eager reference.

Inputs: text only, one image, ≥3 images of different sizes plus a short video packed in ONE sequence (Qwen; LLaVA
packs several images), and a padded batch of 2 (left and right padding; padded positions are not compared).
Beyond the logits, the vision tower is checked directly: the patched tower on all images packed into one call
against the reference tower on each image *alone* (``packed_vs_alone``) — an oracle that holds by construction
(attention must not cross images, frames or Qwen2.5-VL windows), so a dropped mask, a layout swap or a wrong
scale in the vision attention cannot hide behind the language model.
"""

from __future__ import annotations

import torch

from portvlm.models import inputs as model_inputs
from portvlm.models import tiny
from portvlm.shims import model_io
from portvlm.suites._common import (
    PATCHED_BUILD_ATTN,
    Recorder,
    Timer,
    check_from,
    compare,
    logits_of,
    patched,
    report_summary,
    resolve_paths,
    tol,
    torch_dtype,
    vision_features,
)
from portvlm.testing import tolerances


def _inputs(ctx, kind, side, dtype):
    kw = {} if side is None else {"padding_side": side}
    return model_inputs.build(ctx.model_id, kind, dtype, seed=ctx.seed, **kw)


def _forward(model, inp):
    model_io.reset_rope_state(model)
    return logits_of(model(**inp, use_cache=False))


def _alone(model_id, tower, items):
    """Reference vision features of each image/video run alone, concatenated in sequence order."""
    outs: dict[str, list[torch.Tensor]] = {}
    for item in items:
        for key, t in vision_features(model_id, tower, item["pixel_values"], item["grid_thw"]).items():
            outs.setdefault(key, []).append(t)
    return {k: torch.cat(v, 0) for k, v in outs.items()}


def window_figures(model) -> dict:
    """Qwen2.5-VL: which ViT blocks are windowed and how many windows each packed item spans."""
    vc = model.config.vision_config
    full = list(getattr(vc, "fullatt_block_indexes", []) or [])
    depth = vc.depth
    win_patches = vc.window_size // vc.patch_size
    items = [*model_inputs.PACKED_IMAGES, model_inputs.PACKED_VIDEO]
    return {
        "full_attention_blocks": full,
        "window_blocks": [i for i in range(depth) if i not in full],
        "windows_per_item": [model_inputs.num_windows(g, win_patches) for g in items],
    }


@torch.no_grad()
def run(ctx):
    rec = Recorder("parity")
    timer = Timer()
    dtype = torch_dtype(ctx.dtype)
    mid = ctx.model_id
    text_budget, vision_budget = tol(ctx, "fwd"), tol(ctx, "fwd", output="vision")
    atol, rtol = text_budget
    rec.figures.update(dtype=str(dtype).removeprefix("torch."), device_kind=ctx.device_kind, **text_budget.figures(),
                       **vision_budget.figures("vision_"))

    with timer("build"):
        ref = tiny.build(mid, attn_implementation="eager", seed=ctx.seed)  # unpatched fp32 eager reference
        model = tiny.clone(ref, attn_implementation=PATCHED_BUILD_ATTN, model_id=mid).to(ctx.device)

    # Reference outputs first, with nothing of portvlm applied anywhere.
    expected = {}
    with timer("reference"):
        for kind, side in model_inputs.CASES:
            expected[model_inputs.case_name(kind, side)] = _forward(ref, _inputs(ctx, kind, side, torch.float32))
        ref_tower = resolve_paths(ref).vision_tower
        items = model_inputs.vision_items(mid, "packed", torch.float32, seed=ctx.seed)
        alone = _alone(mid, ref_tower, items)
        vb = model_inputs.vision_batch(mid, "packed", torch.float32, seed=ctx.seed)
        ref_packed = vision_features(mid, ref_tower, vb["pixel_values"], vb["grid_thw"])

    # The oracle must agree with itself: the reference tower packed vs alone (eager masks / splits per segment).
    for key, t in ref_packed.items():
        c = compare(t, alone[key], *tolerances.tolerance("cpu", "float32", "eager", "fwd"))
        rec.figures[f"reference_packed_vs_alone_err.{key}"] = c.max_abs_err

    errors = {}
    with patched(model, ctx) as handle:
        model.to(dtype)
        rec.figures["patch_report"] = report_summary(handle)
        with timer("patched"):
            for kind, side in model_inputs.CASES:
                name = model_inputs.case_name(kind, side)
                inp = {k: v.to(ctx.device) for k, v in _inputs(ctx, kind, side, dtype).items()}
                got = _forward(model, inp).float().cpu()
                mask = inp["attention_mask"].bool().cpu()  # padded positions are not compared
                c = compare(got, expected[name], atol, rtol, mask=mask)
                errors[name] = {"max_abs_err": c.max_abs_err, "max_rel_err": c.max_rel_err}
                rec.add(check_from(f"logits.{name}", c))
            tower = resolve_paths(model).vision_tower
            vb_d = model_inputs.vision_batch(mid, "packed", dtype, seed=ctx.seed)
            got_packed = vision_features(
                mid, tower, vb_d["pixel_values"].to(ctx.device), None if vb_d["grid_thw"] is None else vb_d["grid_thw"].to(ctx.device)
            )
        for key, t in got_packed.items():
            c = compare(t.float().cpu(), alone[key], *vision_budget)
            rec.figures[f"packed_vs_alone_err.{key}"] = c.max_abs_err
            rec.add(check_from(f"vision.packed_vs_alone.{key}", c, what=f"{len(items)} items packed into one tower call; "))

    rec.figures["errors"] = errors
    rec.figures["max_abs_err"] = max(e["max_abs_err"] for e in errors.values())
    rec.figures["max_rel_err"] = max(e["max_rel_err"] for e in errors.values())
    rec.figures["packed_vs_alone_err"] = rec.figures.get("packed_vs_alone_err.features")
    rec.figures["packed_items"] = [list(map(int, i["grid_thw"][0])) if i["grid_thw"] is not None else "image" for i in items]

    if tiny.geometry(mid).window is not None:  # Qwen2.5-VL: window blocks beside full-attention ones
        wf = window_figures(ref)
        rec.figures.update(wf)
        rec.check(
            f"{mid}.window_and_full_blocks_exercised",
            bool(wf["full_attention_blocks"]) and bool(wf["window_blocks"]) and max(wf["windows_per_item"]) > 1,
            detail=f"full blocks {wf['full_attention_blocks']}, windowed blocks {wf['window_blocks']}, windows per packed item {wf['windows_per_item']}",
            value=max(wf["windows_per_item"]),
            bound=2,
        )
    if mid == "llava_mla":  # the family's own oracles: full rank vs MHA, cached decoding at reduced rank
        from portvlm.suites import mla_checks

        mla_checks.parity_checks(ctx, rec, timer)
    rec.figures["times_s"] = timer.t
    return rec.result()
