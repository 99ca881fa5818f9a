"""Training step: gradients of the patched model against the reference, several optimizer steps on a fixed batch,
a frozen vision tower, two samples packed into one row (position ids reset; no flash-attn), FSDP2 over two gloo
processes on the CPU, and — in fp16 (the sm70 policy) — loss scaling with fp32 master weights.

The reference (unpatched fp32 eager, same state dict) runs before ``portvlm.patch`` is entered: the patch swaps
class-level forwards, which would otherwise reach the reference instance too.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from portvlm import models
from portvlm.models import inputs as model_inputs
from portvlm.models import tiny
from portvlm.shims import model_io
from portvlm.suites import precision
from portvlm.suites._common import (
    PATCHED_BUILD_ATTN,
    Recorder,
    Timer,
    check_from,
    compare,
    dtype_name,
    logits_of,
    patched,
    report_summary,
    resolve_paths,
    tol,
    torch_dtype,
)
from portvlm.testing import tolerances
from portvlm.testing.distributed import RankError

STEPS = 5
LR = 3e-3
FSDP_STEPS = 2
FSDP_WORLD = 2


def batch(model_id: str, dtype, seed: int = 0) -> dict:
    """The fixed training batch: the one-image sequence, labels = input ids with vision tokens ignored."""
    return tiny.labelled(model_inputs.build(model_id, "image", dtype, seed=seed))


def _reset_rope(model):
    model_io.reset_rope_state(model)


def loss_of(model, inp) -> torch.Tensor:
    _reset_rope(model)
    out = model(**inp, use_cache=False)
    return out.loss


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


class LossScaler:
    """Dynamic loss scaling with fp32 master weights: what fp16 training needs where there is no bf16 (Volta).

    A skipped step records why (``reasons``): ``fp16 overflow in <module> forward`` when the loss is not finite
    (``locate`` re-runs the forward to find the first module whose output is not), ``in gradients`` when only the
    scaled gradients are.
    """

    def __init__(self, model, lr: float, init_scale: float = 2.0**12):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, weight_decay=0.0)
        self.scale = init_scale
        self.skipped = 0
        self.scales: list[float] = []
        self.reasons: list[str | None] = []  # per step; None: the step was taken

    def step(self, loss: torch.Tensor, locate=None) -> bool:
        """Backward ``loss × scale``, unscale in fp32, step or skip (halving the scale); ``locate()``: a forward
        module path where the loss is not finite."""
        (loss * self.scale).backward()
        grads = [None if p.grad is None else p.grad.float() / self.scale for p in self.params]
        finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        self.scales.append(self.scale)
        if finite:
            for m, g in zip(self.master, grads, strict=True):
                m.grad = g
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(self.params, self.master, strict=True):
                    p.copy_(m.to(p.dtype))
            self.reasons.append(None)
        else:
            self.skipped += 1
            self.reasons.append(self._why(loss, locate))
            self.scale /= 2.0
        for p in self.params:
            p.grad = None
        return finite

    def _why(self, loss, locate) -> str:
        if not bool(torch.isfinite(loss.detach()).all()):
            where = locate() if locate is not None else None
            return f"fp16 overflow in {where or 'an unlocated module'} forward"
        names = {id(p): n for n, p in self.model.named_parameters()}
        # backward reaches the last registered modules first: name the last parameter with a non-finite gradient
        bad = [names[id(p)] for p in self.params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        where = bad[-1].rsplit(".", 1)[0] if bad else "an unlocated module"
        return f"fp16 overflow in gradients (scale {self.scale:g}; {where}" + (f" and {len(bad) - 1} more parameters)" if len(bad) > 1 else ")")

    def summary(self) -> str:
        """``N of M steps skipped: <why> (steps …)``; one clause per distinct reason."""
        by: dict[str, list[int]] = {}
        for i, why in enumerate(self.reasons):
            if why is not None:
                by.setdefault(why, []).append(i)
        head = f"{self.skipped} of {len(self.reasons)} steps skipped"
        if not by:
            return head
        return head + ": " + "; ".join(f"{why} (step{'s' if len(ix) > 1 else ''} {', '.join(map(str, ix))})"
                                       for why, ix in by.items())


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [t for t in values if isinstance(t, torch.Tensor)]


def first_nonfinite_module(model, inp) -> str | None:
    """The first module (in call order) whose forward output holds an inf/NaN on ``inp``, by its path; None: none."""
    found: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module, args, output):
        # forward hooks fire when a module returns: a leaf (down_proj) before its parent (mlp), so the first hit is
        # the innermost module that produced the inf
        if not found and any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(output)):
            found.append(names.get(id(module)) or type(module).__name__)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            loss_of(model, inp)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _sync(model) -> None:
    """Wait for the device, so a step's wall time covers its backward and optimizer kernels too."""
    p = next(model.parameters(), None)
    if p is not None and p.is_cuda:
        torch.cuda.synchronize(p.device)


def _vision_rotary(model):
    """The rotary function portvlm's vision forward applies for this model, if its tower has one."""
    from portvlm.shims.attention import rotary_of

    for module in model.modules():
        name = type(module).__name__  # Qwen2_5_VLVisionAttention, …VisionSdpaAttention (<=4.52), Qwen3VLVisionAttention
        fn = rotary_of(type(module)) if "Vision" in name and name.endswith("Attention") else None
        if fn is not None:
            return fn
    return None


def train_steps(model, inp, steps: int, dtype) -> tuple[list[float], dict]:
    """``steps`` optimizer steps on one batch; fp16 goes through ``LossScaler``. Returns losses and extras."""
    extra: dict = {}
    times = []
    if dtype == torch.float16:
        scaler = LossScaler(model, LR)
        losses = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = loss_of(model, inp)
            losses.append(float(loss.detach().float()))
            scaler.step(loss, locate=lambda: first_nonfinite_module(model, inp))
            _sync(model)
            times.append(time.perf_counter() - t0)
        extra.update(loss_scales=scaler.scales, skipped_steps=scaler.skipped, skipped_summary=scaler.summary())
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
        losses = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = loss_of(model, inp)
            losses.append(float(loss.detach().float()))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(model)
            times.append(time.perf_counter() - t0)
    extra["step_times_s"] = [round(t, 4) for t in times]
    # The published step time: median after the first (warm-up) step.
    extra["step_time_s"] = round(statistics.median(times[1:] or times), 4)
    return losses, extra


def _trajectory_checks(rec, losses, ref_losses, upstream_losses, l_atol, l_rtol, noise) -> None:
    """fp32 steps vs the eager reference's (and, for a family declaring ``trajectory_noise``, vs upstream's sdpa run)."""
    got, ref = torch.tensor(losses), torch.tensor(ref_losses)
    # several optimizer steps compound the single-step loss budget; 1e-4 floors it for every family
    atol, rtol = max(l_atol, 1e-4), max(l_rtol, 1e-4)
    what = ""
    if upstream_losses is not None:
        upstream = torch.tensor(upstream_losses)
        spread = float((upstream - ref).abs().max())
        rec.figures.update(upstream_sdpa_losses=upstream_losses, upstream_spread_max_abs=spread,
                           trajectory_noise=noise)
        near = compare(got, upstream, l_atol, l_rtol)
        rec.figures["steps_vs_upstream_sdpa_max_abs_err"] = near.max_abs_err
        rec.add(check_from("steps.match_upstream_sdpa_trajectory", near,
                           what="vs upstream's unpatched sdpa model over the same steps; "))
        if 2 * spread > atol:
            atol = 2 * spread
            what = f"held to 2x upstream's own eager-vs-sdpa spread {spread:.3g} (the family declares: {noise}); "
    lc = compare(got, ref, atol, rtol)
    rec.figures["steps_vs_reference_max_abs_err"] = lc.max_abs_err
    rec.add(check_from("steps.match_reference_trajectory", lc, what=what))


# ---------------------------------------------------------------------------------------------------------------
# Packing: two samples in one row, position ids reset per sample, no padding (lmms-engine's rmpad, portably)
# ---------------------------------------------------------------------------------------------------------------


def pack_samples(model_id: str, dtype, seed: int = 0) -> tuple[dict, list[dict], list[int]]:
    """``(packed_kwargs, [sample_kwargs, ...], lengths)``: an image sample and a text sample in one row."""
    samples = [model_inputs.build(model_id, "image", dtype, seed=seed), model_inputs.build(model_id, "text", dtype, seed=seed + 1)]
    lengths = [s["input_ids"].shape[1] for s in samples]
    packed = {
        "input_ids": torch.cat([s["input_ids"] for s in samples], 1),
        "position_ids": torch.cat([s["position_ids"] for s in samples], -1),  # reset to 0 at every sample
    }
    # An all-ones mask, so no version infers segments from position ids itself (4.53's packed-sequence
    # detection expands 3-D mrope position ids and crashes); the segments travel as cu_seq_lens below.
    packed["attention_mask"] = torch.ones_like(packed["input_ids"])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [s[key] for s in samples if key in s]
        if parts:
            packed[key] = torch.cat(parts, 0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    # The packed-row kwargs transformers' attention functions receive (FlashAttentionKwargs); portvlm's text
    # attention reads them for a block-diagonal causal call with no flash-attn (portvlm.shims.attention).
    packed.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return packed, samples, lengths


# The shims that give a patched model a block-diagonal causal path for a packed row (portvlm.shims.patch.SHIMS):
# the registry (4.53+), the registry without masks (<=4.52 LLaVA backbones), per-backend classes (<=4.52 Qwen2.5-VL).
TEXT_SHIMS = ("text_registry", "text_registry_legacy", "text_classes")


def _packing_reasons(handle) -> list[str]:
    """Why the patched model cannot take a packed row here (empty: it can) — read from the patch report."""
    rep = handle.report
    if rep.shim_names() & set(TEXT_SHIMS):
        return []
    why = [f"{n.shim}: {'; '.join(n.reasons)}" for n in rep.not_applied if n.shim in TEXT_SHIMS]
    return why or ["portvlm's text attention is not installed, so a packed row has no block-diagonal causal path"]


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 over 2 CPU processes (gloo)
# ---------------------------------------------------------------------------------------------------------------


def fsdp_losses(ctx, state_dict: dict, steps: int = FSDP_STEPS) -> dict:
    """``steps`` AdamW steps through ``portvlm.distributed.parallelize`` (FSDP2, what users call) over
    ``FSDP_WORLD`` gloo processes, every rank on the fixed batch as one packed row, under the cell's policy (arch,
    dtype, matrix): ``{"losses": [batch loss per step], "wrapped": n, "classes": [...]}`` from rank 0."""
    from portvlm.distributed import pack
    from portvlm.suites import distributed_checks as check

    row = pack([batch(ctx.model_id, torch.float32, seed=ctx.seed)])
    return check.run_steps(ctx.model_id, ctx.arch_id, state_dict, row, world=FSDP_WORLD, steps=steps, lr=LR,
                           matrix=ctx.matrix, dtype=torch_dtype(ctx.dtype))


# ---------------------------------------------------------------------------------------------------------------


def _to(v, dtype, device):
    if not isinstance(v, torch.Tensor):
        return v
    return (v.to(dtype) if v.is_floating_point() else v).to(device)


def _fresh(ref, mid, ctx):
    return tiny.clone(ref, attn_implementation=PATCHED_BUILD_ATTN, model_id=mid).to(ctx.device)


def _gloo_skip_reason(ctx, fast_what: str, check: str) -> str | None:
    """Why a multi-process gloo check does not run in this cell (None: it runs)."""
    if ctx.fast:
        return f"fast=True: {fast_what}"
    if ctx.device != "cpu":
        return f"{check} on the CPU with gloo; this cell's device is {ctx.device}"
    if dtype_name(ctx.dtype) != "float32":
        # the gloo checks compare N processes with one at fp32 tolerances; the fp16 recipe over gloo (scaler, inf
        # skips) is tests/torch/test_distributed_fp16.py
        return f"{check} in float32 (fp32 tolerances); this cell's dtype is {dtype_name(ctx.dtype)}"
    return None


def run(ctx):
    rec = Recorder("training")
    timer = Timer()
    dtype = torch_dtype(ctx.dtype)
    mid = ctx.model_id
    atol_b, rtol_b = tol(ctx, "bwd")
    atol_f, rtol_f = tol(ctx, "fwd")
    l_atol, l_rtol = tolerances.loss_budget(dtype, family=models.by_id(mid))
    rec.figures.update(dtype=str(dtype).removeprefix("torch."), steps=STEPS, lr=LR, bwd_atol=atol_b, bwd_rtol=rtol_b)
    skipped: dict[str, str] = {}

    # ---- reference (unpatched fp32 eager), all before the patch is entered ----
    with timer("reference"):
        ref = tiny.build(mid, attn_implementation="eager", seed=ctx.seed).train()
        state_dict = {k: v.clone() for k, v in ref.state_dict().items()}
        inp32 = batch(mid, torch.float32, seed=ctx.seed)
        ref_loss = loss_of(ref, inp32)
        ref_loss.backward()
        ref_grads = _grads(ref)
        ref.zero_grad(set_to_none=True)
        ref_losses, _ = train_steps(tiny.clone(ref, model_id=mid).train(), inp32, STEPS, torch.float32)
        noise = models.by_id(mid).trajectory_noise
        upstream_losses = None
        if noise and dtype == torch.float32:  # upstream's own sdpa run: the family's declared trajectory noise
            upstream = tiny.clone(ref, attn_implementation=PATCHED_BUILD_ATTN, model_id=mid).train()
            upstream_losses, _ = train_steps(upstream, inp32, STEPS, torch.float32)
            del upstream
        packed, samples, lengths = pack_samples(mid, torch.float32, seed=ctx.seed)
        with torch.no_grad():
            alone = [logits_of(ref(**s, use_cache=False))[0] for s in samples]
    rec.figures["reference_losses"] = ref_losses

    model = _fresh(ref, mid, ctx).train()
    with patched(model, ctx) as handle:
        model.to(dtype)
        rec.figures["patch_report"] = report_summary(handle)
        inp = {k: (v.to(dtype) if v.is_floating_point() else v).to(ctx.device) for k, v in batch(mid, dtype, seed=ctx.seed).items()}

        # 1. gradients of the patched model vs the reference
        with timer("grads"):
            loss = loss_of(model, inp)
            loss.backward()
            grads = _grads(model)
            model.zero_grad(set_to_none=True)
        lc = compare(loss.detach().float().cpu().view(1), ref_loss.detach().view(1), l_atol, l_rtol)
        rec.add(check_from("loss_matches_reference", lc))
        missing = sorted(set(ref_grads) ^ set(grads))
        rec.check("grads.same_parameters", not missing, detail=f"{len(grads)} parameters with gradients" + (f"; differ: {missing[:5]}" if missing else ""))
        worst, per_group = None, {}
        for name, g in ref_grads.items():
            if name not in grads:
                continue
            c = compare(grads[name].cpu(), g, atol_b, rtol_b)
            group = "vision" if ("visual" in name or "vision" in name) else ("projector" if "projector" in name else "text")
            per_group[group] = max(per_group.get(group, 0.0), c.max_abs_err)
            if worst is None or c.ratio > worst[1].ratio:
                worst = (name, c)
        rec.figures["grad_max_abs_err"] = max(per_group.values()) if per_group else None
        rec.figures["grad_max_abs_err_by_group"] = per_group
        if worst is not None:
            rec.figures["grad_max_rel_err"] = worst[1].max_rel_err
            rec.add(check_from("grads.match_reference", worst[1], what=f"worst parameter {worst[0]}: "))

        # 2. two samples packed into one row, position ids reset, no flash-attn
        why = _packing_reasons(handle)
        if why:
            skipped["packing"] = "; ".join(why)
        else:
            with timer("packing"), torch.no_grad():
                model.eval()
                pk = {k: _to(v, dtype, ctx.device) for k, v in packed.items()}
                _reset_rope(model)
                got = logits_of(model(**pk, use_cache=False))[0].float().cpu()
                model.train()
            starts = [0, lengths[0]]
            errs = []
            for i, (a, n) in enumerate(zip(alone, lengths, strict=True)):
                c = compare(got[starts[i] : starts[i] + n], a, atol_f, rtol_f)
                errs.append(c)
                rec.add(check_from(f"packing.sample{i}_matches_alone", c, what=f"sample {i} ({n} tokens) in a packed row of {sum(lengths)}; "))
            rec.figures["packing_max_abs_err"] = max(c.max_abs_err for c in errs)
            rec.figures["packing_text_packed_calls"] = handle.state.calls["text_packed"]

        # 3. several optimizer steps (after packing: the steps change the weights) on the fixed batch: finite, falling
        with timer("steps"):
            losses, extra = train_steps(model, inp, STEPS, dtype)
        rec.figures["losses"] = losses
        rec.figures.update(extra)
        rec.check("steps.finite", all(math.isfinite(x) for x in losses), detail=f"losses {[f'{x:.4f}' for x in losses]}")
        rec.check("steps.loss_falls", losses[-1] < losses[0], detail=f"{losses[0]:.4f} -> {losses[-1]:.4f} over {STEPS} steps", value=losses[-1], bound=losses[0])
        if dtype == torch.float32:
            _trajectory_checks(rec, losses, ref_losses, upstream_losses, l_atol, l_rtol, noise)
        if dtype == torch.float16:
            rec.check("fp16.no_skipped_steps_at_end", extra["skipped_steps"] < STEPS, detail=f"{extra['skipped_summary']} (loss scaler); scales {extra['loss_scales']}")
            rec.add(precision.softmax_check(handle.state.vision_backend, device=ctx.device))  # the one that runs
            rope = _vision_rotary(model)
            if rope is not None:
                rec.add(precision.rotary_check(rope, device=ctx.device))
            else:
                rec.figures["fp16_rotary"] = "no vision rotary in this family (CLIP tower): not checked"

    # 3. frozen vision tower (its own instance, its own patch: the text attention is switched per instance)
    frozen = _fresh(ref, mid, ctx).train()
    with patched(frozen, ctx):
        with timer("frozen_vision"):
            frozen.to(dtype)
            tower = resolve_paths(frozen).vision_tower
            for p in tower.parameters():
                p.requires_grad_(False)
            before_v = {n: p.detach().clone() for n, p in tower.named_parameters()}
            before_t = {n: p.detach().clone() for n, p in frozen.named_parameters() if p.requires_grad}
            f_losses, _ = train_steps(frozen, inp, 3, dtype)
            v_same = all(torch.equal(p, before_v[n]) for n, p in tower.named_parameters())
            t_moved = sum(not torch.equal(p, before_t[n]) for n, p in frozen.named_parameters() if p.requires_grad)
        rec.figures["frozen_vision_losses"] = f_losses
        rec.check("frozen_vision.tower_unchanged", v_same, detail=f"{len(before_v)} vision parameters")
        rec.check("frozen_vision.text_trains", t_moved > 0 and f_losses[-1] < f_losses[0], detail=f"{t_moved} of {len(before_t)} trainable parameters moved; loss {f_losses[0]:.4f} -> {f_losses[-1]:.4f}")

    # 4. FSDP2 across 2 gloo processes: loss equal to the single-process run (fp32)
    # 5. sp: Ulysses SP=2 (2 gloo processes, one packed row cut through a sample and an image) vs one process;
    #    LLaVA has no SP (data parallel only): DP=2 on different rows vs one process on their union instead.
    sp_name = "sp.loss_and_grads_equal_one_process" if _has_sp(ctx) else "sp.dp2_equals_union"
    for key, name, run_check, fast_what, runs in (
        ("fsdp2", "fsdp2.loss_equals_single_process", lambda: _fsdp2_check(rec, ctx, ref, state_dict),
         "FSDP2 over 2 processes not run", "FSDP2 check runs"),
        ("sp", sp_name, lambda: _sp_check(rec, ctx), "the SP=2 check over 2 processes not run", "the sp check runs"),
    ):
        reason = _gloo_skip_reason(ctx, fast_what, runs)
        if reason:
            skipped[key] = reason
            continue
        with timer(key):
            try:
                run_check()
            except RankError as err:  # a rank raised, died or hung (named): this check fails, the others stand
                rec.check(name, False, detail=str(err)[-2000:])
    if skipped:
        rec.figures["skipped"] = skipped
    rec.figures["times_s"] = timer.t
    return rec.result()


def _has_sp(ctx) -> bool:
    """Whether the cell's family has Ulysses SP (else its sp check is DP=2 vs the union)."""
    return models.by_id(ctx.model_id).model_type in models.sequence_parallel_types()


def _fsdp2_check(rec, ctx, ref, state_dict) -> None:
    """FSDP2 through ``parallelize`` over 2 gloo processes vs the same steps in one process (fp32)."""
    got = fsdp_losses(ctx, state_dict)
    single = _fresh(ref, ctx.model_id, ctx).train()
    with patched(single, ctx):
        single_losses, _ = train_steps(single, batch(ctx.model_id, torch.float32, seed=ctx.seed), FSDP_STEPS,
                                       torch.float32)
    rec.figures["fsdp2"] = {"losses": got["losses"], "single_process_losses": single_losses,
                            "wrapped_layers": got["wrapped"], "layer_classes": got["classes"]}
    # fp32 losses after FSDP_STEPS steps: the loss budget, the family's declared scale on top (Qwen3.5: FSDP's gradient
    # reduction order is rounding its gated RMSNorm amplifies, 1.7e-4 after one step like upstream's eager vs sdpa)
    c = compare(torch.tensor(got["losses"]), torch.tensor(single_losses),
                *tolerances.loss_budget(torch.float32, family=models.by_id(ctx.model_id)))
    rec.add(check_from("fsdp2.loss_equals_single_process", c, what=f"{FSDP_WORLD} gloo processes, parallelize: "
                       f"fully_shard on {got['wrapped']} {got['classes']} + root, {FSDP_STEPS} steps; "))


def _sp_check(rec, ctx) -> None:
    """SP=2 vs SP=1 (Qwen) or DP=2 vs the union (LLaVA) through ``portvlm.distributed`` on gloo."""
    from portvlm import models
    from portvlm.suites import distributed_checks as check

    family = models.by_id(ctx.model_id).model_type
    sp = family in models.sequence_parallel_types()
    dp, spd, kind = (1, 2, "sp") if sp else (2, 1, "dp")
    rows = check.rows_for(ctx.model_id, kind, seed=ctx.seed)
    policy = {"matrix": ctx.matrix, "dtype": torch_dtype(ctx.dtype)}  # the cell's, in the reference and every worker
    ref = check.reference(ctx.model_id, ctx.arch_id, tiny.build(ctx.model_id, seed=ctx.seed).state_dict(), rows,
                          **policy)
    got = check.run(ctx.model_id, ctx.arch_id, dp=dp, sp=spd, rows=rows, cases=[{"name": "ok"}], seed=ctx.seed,
                    timeout_s=240, **policy)["ok"]
    # the cell's dtype in the reference and every worker: this cell's budget (the family's scale on top)
    atol, rtol = tol(ctx, "fwd")
    c = check.compare(got, ref, atol, rtol)
    c["cuts"] = check.straddles(rows[0], spd) if sp else None
    c["mesh"] = {"dp": dp, "sp": spd}
    rec.figures["sp"] = c
    if not sp:
        rec.figures["sp"]["not_applicable"] = f"Ulysses SP is implemented for {', '.join(models.sequence_parallel_types())}, not {family}; DP=2 checked instead"
    what = (f"SP=2 over 1 row of {rows[0]['input_ids'].shape[1]} tokens cut at {c['cuts']['cuts']}" if sp
            else "DP=2 over 2 different rows vs one process on both") + f"; loss {c['loss']:.6f} vs {c['ref_loss']:.6f}, "
    rec.check("sp.loss_and_grads_equal_one_process" if sp else "sp.dp2_equals_union", c["ok"],
              detail=what + f"worst grad {c['grad_worst']} ratio {c['grad_ratio']:.3g}, worst param ratio "
              f"{c['param_ratio']:.3g} (atol {atol:g}, rtol {rtol:g})", value=max(c["grad_ratio"], c["param_ratio"]), bound=1.0)
