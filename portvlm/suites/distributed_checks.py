"""Numerical checks of ``portvlm.distributed`` on the CPU (gloo): N processes against one process.

Used by the tests (tests/torch/test_distributed.py) and the training suite's ``sp`` check. The reference is a
single process running the patched model's OWN forward on every row (vision tower, embedding merge and packed
attention as transformers + portvlm do them, no ``portvlm.distributed`` code), with the loss written out per
sample here: the mean token loss over all rows. The parallel run must give the same loss and, after one SGD step,
the same gradients and parameters.

Workers run under ``portvlm.testing.distributed.spawn`` (a hard deadline; the gloo group has a timeout too), so a
rank that raises, dies or hangs ends every rank with an error naming it, in bounded time.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from portvlm.shims import model_io
from portvlm.testing.distributed import gloo_group, load_result, plant_inf, spawn, straddles  # noqa: F401 - the checks' names

LR = 0.5  # plain SGD: parameters after the step differ by LR × the gradient difference


# ---------------------------------------------------------------------------------------------------------------
# Data: packed rows whose samples and images straddle every rank boundary of the split
# ---------------------------------------------------------------------------------------------------------------


def rows_for(model_id: str, kind: str, seed: int = 0) -> list[dict]:
    """Packed rows: ``"sp"`` one row (3 samples, 4 images + a video); ``"dp"`` two rows, the second text only."""
    from portvlm.distributed.parallel import pack
    from portvlm.models import inputs as model_inputs
    from portvlm.models import tiny

    def s(k, i):
        return tiny.labelled(model_inputs.build(model_id, k, seed=seed + i))

    if kind == "sp":
        return [pack([s("text", 0), s("image", 1), s("packed", 2)])]
    if kind == "sp_two_images":  # fewer vision items than SP ranks: some ranks encode only the dummy frame
        return [pack([s("image", 1), s("text", 0), s("image", 3)])]
    if kind == "dp":
        return [pack([s("image", 1), s("text", 0)]), pack([s("text", 2)])]
    raise KeyError(kind)


# ---------------------------------------------------------------------------------------------------------------
# Reference: one process, the patched model's own forward
# ---------------------------------------------------------------------------------------------------------------


def _model_kwargs(row: dict) -> dict:
    cu = row["cu_seqlens"]
    kw = {k: v for k, v in row.items() if k in ("input_ids", "position_ids", "pixel_values", "image_grid_thw",
                                                 "pixel_values_videos", "video_grid_thw")}
    kw.update(attention_mask=torch.ones_like(row["input_ids"]), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
              max_length_q=row["max_seqlen"], max_length_k=row["max_seqlen"], use_cache=False)
    return kw


def reference(model_id: str, arch: str, state: dict, rows: list[dict], *, matrix=None, dtype=None) -> dict:
    """Loss, gradients and post-SGD-step parameters of one process on all ``rows`` (mean over all target tokens).

    ``matrix``, ``dtype``: the cell's (None: the packaged matrix, the arch's default dtype), whose policy is
    patched in, as in every worker."""
    import torch.nn.functional as F

    model, handle = _patched_model({"model_id": model_id, "arch": arch, "matrix": matrix, "dtype": dtype}, state)
    with handle:
        sums, count = [], 0
        for row in rows:
            model_io.reset_rope_state(model)
            logits = model(**_model_kwargs(row)).logits[0].float()
            bounds = row["cu_seqlens"].tolist()
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):  # per sample: token t predicts t+1 inside the sample
                tgt = row["labels"][0, a + 1 : b]
                sums.append(F.cross_entropy(logits[a : b - 1], tgt, ignore_index=-100, reduction="sum"))
                count += int((tgt != -100).sum())
        loss = torch.stack(sums).sum() / count
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": float(loss.detach()), "grads": grads, "params": params, "tokens": count}


# ---------------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------------


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _patched_model(spec: dict, state: dict):
    """The tiny model with ``state``, in train mode, and ``portvlm.patch`` under the spec's arch, dtype and matrix
    (the cell's policy: every rank and the reference patch alike)."""
    import portvlm
    from portvlm.models import tiny

    model = tiny.build(spec["model_id"], attn_implementation="sdpa")
    model.load_state_dict(state)
    model.train()
    return model, portvlm.patch(model, arch=spec["arch"], dtype=spec.get("dtype"), matrix=spec.get("matrix"))


def worker(rank: int, world: int, port: int, spec: dict) -> None:
    """One gloo rank: each case builds the model, parallelizes it, runs one row, one SGD step; rank 0 saves."""
    from portvlm.distributed import make_mesh, parallelize

    with gloo_group(rank, world, port):
        state = torch.load(spec["state"], weights_only=True)
        rows = torch.load(spec["rows"], weights_only=False)
        results = {}
        mesh = make_mesh(spec["dp"], spec["sp"], "cpu")
        for case in spec["cases"]:
            if spec.get("fail_rank") == rank:
                raise RuntimeError(f"injected failure on rank {rank}")
            model, handle = _patched_model(spec, state)
            with handle:
                pmodel = parallelize(model, handle, mesh, fault=case.get("fault"))
                with pmodel:
                    dp_rank = pmodel.layout.dp_rank
                    t0 = time.perf_counter()
                    out = pmodel(**rows[dp_rank])
                    out.loss.backward()
                    grads = {n.removeprefix("module."): _full(p.grad) for n, p in pmodel.named_parameters()
                             if p.grad is not None}
                    with torch.no_grad():
                        for p in pmodel.parameters():
                            if p.grad is not None:
                                p -= LR * p.grad
                    params = {n.removeprefix("module."): _full(p.detach()) for n, p in pmodel.named_parameters()}
                    results[case["name"]] = {
                        "loss": float(out.loss_value), "tokens": out.tokens, "grads": grads, "params": params,
                        "seconds": time.perf_counter() - t0,
                        "ulysses_calls": pmodel.ulysses.calls if pmodel.ulysses is not None else 0,
                    }
        if rank == 0:
            torch.save(results, spec["out"])


def steps_worker(rank: int, world: int, port: int, spec: dict) -> None:
    """One gloo rank of the FSDP2 check: ``parallelize`` over DP=``world`` (what users call), every rank on the same
    packed row, ``steps`` AdamW steps; rank 0 saves the batch loss per step and what FSDP wrapped."""
    from torch.distributed.fsdp import FSDPModule

    from portvlm.distributed import make_mesh, parallelize

    with gloo_group(rank, world, port):
        model, handle = _patched_model(spec, torch.load(spec["state"], weights_only=True))
        row = torch.load(spec["rows"], weights_only=False)[0]
        with handle, parallelize(model, handle, make_mesh(world, 1, "cpu")) as pmodel:
            opt = torch.optim.AdamW(pmodel.parameters(), lr=spec["lr"], weight_decay=0.0)
            losses = []
            for _ in range(spec["steps"]):
                out = pmodel(**row)
                losses.append(float(out.loss_value))
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            wrapped = [m for m in pmodel.modules() if isinstance(m, FSDPModule) and m is not pmodel]
        if rank == 0:
            torch.save({"losses": losses, "wrapped": len(wrapped),
                        "classes": sorted({type(m).__name__.removeprefix("FSDP") for m in wrapped})}, spec["out"])


def scaler_worker(rank: int, world: int, port: int, spec: dict) -> None:
    """One gloo rank of the fp16 recipe: parallelize (mixed precision by default) + ``torch.amp.GradScaler``, two
    steps; in the first, rank ``plant_rank`` puts an inf into one of its gradient shards. Every rank's record saved."""
    import torch.distributed as dist

    with gloo_group(rank, world, port):
        state = torch.load(spec["state"], weights_only=True)
        all_rows = torch.load(spec["rows"], weights_only=False)
        out = {}
        for dp, sp in spec["meshes"]:
            record = _scaler_case(spec, state, all_rows[f"{dp}x{sp}"], dp, sp, rank)
            records = [None] * world
            dist.all_gather_object(records, record)
            out[(dp, sp)] = records
        if rank == 0:
            torch.save(out, spec["out"])


def _scaler_case(spec, state, rows, dp, sp, rank) -> dict:
    """One mesh of ``scaler_worker``: this rank's record."""
    from portvlm.distributed import make_mesh, parallelize

    model, handle = _patched_model(spec, state)
    with handle:
        model.to(handle.dtype)  # what a user does with the policy's dtype; parallelize keeps fp32 shards
        pmodel = parallelize(model, handle, make_mesh(dp, sp, "cpu"))
        seen: list[str] = []  # the dtype a decoder layer actually computes in (FSDP casts the fp32 shards)
        hook = pmodel._paths.text_layers[0].register_forward_hook(
            lambda m, a, o: seen.append(str((o[0] if isinstance(o, tuple) else o).dtype)))
        record = {"rank": rank, "sharded_dtypes": sorted({str(p.dtype) for p in pmodel.parameters()}), "steps": []}
        with pmodel:
            opt = torch.optim.SGD(pmodel.parameters(), lr=LR)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            row = rows[pmodel.layout.dp_rank]
            for step in range(2):
                out = pmodel(**row)
                scaler.scale(out.loss).backward()
                planted = None
                if step == 0 and spec.get("plant_rank") == rank:
                    planted = plant_inf(pmodel)
                before = [p.detach().to_local().clone() if hasattr(p, "to_local") else p.detach().clone()
                          for p in pmodel.parameters()]
                scale = float(scaler.get_scale())
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                after = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in pmodel.parameters()]
                moved = sum(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
                record["steps"].append({"planted": planted is not None, "planted_in": planted,
                                        "loss": float(out.loss_value), "loss_finite": bool(torch.isfinite(out.loss_value)),
                                        "scale_before": scale, "scale_after": float(scaler.get_scale()),
                                        "params_moved": moved, "skipped": moved == 0})
        hook.remove()
        record["compute_dtype"] = sorted(set(seen))
    return record


def _spawned(fn, world: int, spec: dict, state: dict, rows, timeout_s: float, prefix: str) -> dict:
    """Save ``state`` and ``rows`` for the ranks, run ``fn`` on ``world`` gloo ranks (``spawn``: a deadline, a rank
    that fails named); rank 0's result."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        spec = spec | {"state": os.path.join(tmp, "state.pt"), "rows": os.path.join(tmp, "rows.pt"),
                       "out": os.path.join(tmp, "out.pt")}
        torch.save(state, spec["state"])
        torch.save(rows, spec["rows"])
        spawn(fn, world, spec, timeout_s=timeout_s, what=f"{fn.__name__} ({spec['model_id']}, {world} gloo ranks)")
        return load_result(spec["out"], fn.__name__)


def run_scaler(model_id: str, arch: str, *, meshes: dict, plant_rank: int | None, seed: int = 0,
               timeout_s: float = 240.0, matrix=None) -> dict:
    """``scaler_worker`` on one gloo world for every ``(dp, sp): rows`` of ``meshes`` (equal world sizes); every
    rank's record per mesh (steps: skipped, scale before/after). The policy is ``arch``'s own dtype (fp16: sm70)."""
    from portvlm.models import tiny

    worlds = {dp * sp for dp, sp in meshes}
    if len(worlds) != 1:
        raise ValueError(f"meshes {list(meshes)} need one world size, got {sorted(worlds)}")
    spec = {"model_id": model_id, "arch": arch, "matrix": matrix, "meshes": list(meshes), "plant_rank": plant_rank}
    rows = {f"{dp}x{sp}": r for (dp, sp), r in meshes.items()}
    return _spawned(scaler_worker, worlds.pop(), spec, tiny.build(model_id, seed=seed).state_dict(), rows, timeout_s,
                    "portvlm-scaler-")


def run(model_id: str, arch: str, *, dp: int, sp: int, rows: list[dict], cases: list[dict], seed: int = 0,
        fail_rank: int | None = None, timeout_s: float = 240.0, matrix=None, dtype=None) -> dict:
    """Spawn ``dp × sp`` workers on ``rows`` (one per dp rank) for each case; rank 0's results per case name.

    ``matrix``, ``dtype``: the cell's (None: the packaged matrix, the arch's default dtype): every worker patches
    under that policy."""
    from portvlm.models import tiny

    spec = {"model_id": model_id, "arch": arch, "dp": dp, "sp": sp, "cases": cases, "fail_rank": fail_rank,
            "matrix": matrix, "dtype": dtype}
    return _spawned(worker, dp * sp, spec, tiny.build(model_id, seed=seed).state_dict(), rows, timeout_s,
                    "portvlm-dist-")


def run_steps(model_id: str, arch: str, state: dict, row: dict, *, world: int, steps: int, lr: float,
              timeout_s: float = 240.0, matrix=None, dtype=None) -> dict:
    """``steps_worker`` on ``world`` gloo ranks (FSDP2 through ``parallelize``, DP=``world``, every rank on ``row``):
    ``{"losses", "wrapped", "classes"}`` from rank 0."""
    spec = {"model_id": model_id, "arch": arch, "matrix": matrix, "dtype": dtype, "steps": steps, "lr": lr}
    return _spawned(steps_worker, world, spec, state, [row], timeout_s, "portvlm-fsdp-")


def compare(got: dict, ref: dict, atol: float, rtol: float) -> dict:
    """Worst loss / gradient / parameter errors of a parallel case against the reference, by name."""

    def worst(a: dict, b: dict):
        missing = sorted(set(a) ^ set(b))
        top, name = 0.0, None
        for n, t in b.items():
            if n in a:
                r = float(((a[n].float() - t.float()).abs() / (atol + rtol * t.float().abs())).max()) if t.numel() else 0.0
                if r > top:
                    top, name = r, n
        return top, name, missing

    g, gname, gmiss = worst(got["grads"], ref["grads"])
    p, pname, pmiss = worst(got["params"], ref["params"])
    loss_err = abs(got["loss"] - ref["loss"])
    return {
        "loss": got["loss"], "ref_loss": ref["loss"], "loss_abs_err": loss_err,
        "loss_ok": loss_err <= atol + rtol * abs(ref["loss"]),
        "grad_ratio": g, "grad_worst": gname, "grad_missing": gmiss,
        "param_ratio": p, "param_worst": pname, "param_missing": pmiss,
        "tokens": got["tokens"], "ref_tokens": ref["tokens"],
        "ok": loss_err <= atol + rtol * abs(ref["loss"]) and g <= 1.0 and p <= 1.0 and not gmiss and not pmiss
        and got["tokens"] == ref["tokens"],
    }
