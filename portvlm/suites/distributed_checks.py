"""Numerical checks of ``portvlm.distributed`` on the CPU (gloo): N processes against one process.

Used by the tests (tests/torch/test_distributed.py) and the training suite's ``sp`` check. The reference is a
single process running the patched model's OWN forward on every row (vision tower, embedding merge and packed
attention as transformers + portvlm do them, no ``portvlm.distributed`` code), with the loss written out per
sample here: the mean token loss over all rows. The parallel run must give the same loss and, after one SGD step,
the same gradients and parameters.

Workers are spawned with ``torch.multiprocessing`` under a hard deadline; the gloo group has a timeout too, so a
rank that raises (or hangs) ends every rank with that error in bounded time.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback

import torch

from portvlm.shims import model_io

PG_TIMEOUT_S = 60
LR = 0.5  # plain SGD: parameters after the step differ by LR × the gradient difference


# ---------------------------------------------------------------------------------------------------------------
# Data: packed rows whose samples and images straddle every rank boundary of the split
# ---------------------------------------------------------------------------------------------------------------


def _labelled(sample: dict) -> dict:
    from portvlm.models import tiny

    labels = sample["input_ids"].clone()
    for tok in (tiny.IMG, tiny.VID, tiny.VSTART, tiny.VEND, tiny.LLAVA_IMG):
        labels[labels == tok] = -100
    return {**sample, "labels": labels}


def rows_for(model_id: str, kind: str, seed: int = 0) -> list[dict]:
    """Packed rows: ``"sp"`` one row (3 samples, 4 images + a video); ``"dp"`` two rows, the second text only."""
    from portvlm.distributed.parallel import pack
    from portvlm.models import inputs as model_inputs

    def s(k, i):
        return _labelled(model_inputs.build(model_id, k, seed=seed + i))

    if kind == "sp":
        return [pack([s("text", 0), s("image", 1), s("packed", 2)])]
    if kind == "sp_two_images":  # fewer vision items than SP ranks: some ranks encode only the dummy frame
        return [pack([s("image", 1), s("text", 0), s("image", 3)])]
    if kind == "dp":
        return [pack([s("image", 1), s("text", 0)]), pack([s("text", 2)])]
    raise KeyError(kind)


def straddles(row: dict, sp: int, vision_tokens=None) -> dict:
    """Which SP rank boundaries cut a sample / a vision-token run (the cases a wrong implementation gets wrong)."""
    from portvlm.distributed.ulysses import split_bounds
    from portvlm.models import tiny

    vision_tokens = vision_tokens or (tiny.IMG, tiny.VID)
    ids = row["input_ids"][0]
    cu = set(int(c) for c in row["cu_seqlens"].tolist())
    cuts = [lo for lo, _ in split_bounds(ids.shape[0], sp)[1:]]
    is_vis = torch.isin(ids, torch.tensor(vision_tokens))
    return {
        "cuts": cuts,
        "sample_cut": [c for c in cuts if c not in cu],
        "vision_cut": [c for c in cuts if 0 < c < ids.shape[0] and bool(is_vis[c - 1]) and bool(is_vis[c])],
    }


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


def reference(model_id: str, arch: str, state: dict, rows: list[dict], *, matrix=None) -> dict:
    """Loss, gradients and post-SGD-step parameters of one process on all ``rows`` (mean over all target tokens).

    ``matrix``: the cell's (a ``Matrix`` or a path; None: the packaged one), whose ``arch`` policy is patched in."""
    import torch.nn.functional as F

    from portvlm.models import tiny
    from portvlm.shims.patch import patch

    model = tiny.build(model_id, attn_implementation="sdpa")
    model.load_state_dict(state)
    model.train()
    with patch(model, arch=arch, matrix=matrix):
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def worker(rank: int, world: int, port: int, spec: dict) -> None:
    """One gloo rank: each case builds the model, parallelizes it, runs one row, one SGD step; rank 0 saves."""
    import torch.distributed as dist

    from portvlm.distributed import make_mesh, parallelize
    from portvlm.models import tiny
    from portvlm.shims.patch import patch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        state = torch.load(spec["state"], weights_only=True)
        rows = torch.load(spec["rows"], weights_only=False)
        results = {}
        mesh = make_mesh(spec["dp"], spec["sp"], "cpu")
        for case in spec["cases"]:
            if spec.get("fail_rank") == rank:
                raise RuntimeError(f"injected failure on rank {rank}")
            model = tiny.build(spec["model_id"], attn_implementation="sdpa")
            model.load_state_dict(state)
            model.train()
            with patch(model, arch=spec["arch"], matrix=spec.get("matrix")) as handle:
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
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _plant_inf(model) -> str:
    """Put an inf into this rank's shard of one gradient (the last decoder layer's first non-empty one); its name."""
    for name, p in reversed(list(model.named_parameters())):
        local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if local is not None and local.numel() and "layers" in name:
            with torch.no_grad():
                local.view(-1)[0] = float("inf")
            return name.removeprefix("module.")
    raise RuntimeError("no decoder-layer gradient shard on this rank to plant an inf in")


def scaler_worker(rank: int, world: int, port: int, spec: dict) -> None:
    """One gloo rank of the fp16 recipe: parallelize (mixed precision by default) + ``torch.amp.GradScaler``, two
    steps; in the first, rank ``plant_rank`` puts an inf into one of its gradient shards. Every rank's record saved."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
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
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _scaler_case(spec, state, rows, dp, sp, rank) -> dict:
    """One mesh of ``scaler_worker``: this rank's record."""
    from portvlm.distributed import make_mesh, parallelize
    from portvlm.models import tiny
    from portvlm.shims.patch import patch

    model = tiny.build(spec["model_id"], attn_implementation="sdpa")
    model.load_state_dict(state)
    model.train()
    with patch(model, arch=spec["arch"]) as handle:
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
                    planted = _plant_inf(pmodel)
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


def run_scaler(model_id: str, arch: str, *, meshes: dict, plant_rank: int | None, seed: int = 0,
               timeout_s: float = 240.0) -> dict:
    """``scaler_worker`` on one gloo world for every ``(dp, sp): rows`` of ``meshes`` (equal world sizes); every
    rank's record per mesh (steps: skipped, scale before/after)."""
    from portvlm.models import tiny

    worlds = {dp * sp for dp, sp in meshes}
    if len(worlds) != 1:
        raise ValueError(f"meshes {list(meshes)} need one world size, got {sorted(worlds)}")
    state = tiny.build(model_id, seed=seed).state_dict()
    with tempfile.TemporaryDirectory(prefix="portvlm-scaler-") as tmp:
        spec = {"model_id": model_id, "arch": arch, "meshes": list(meshes), "plant_rank": plant_rank,
                "state": os.path.join(tmp, "state.pt"), "rows": os.path.join(tmp, "rows.pt"),
                "out": os.path.join(tmp, "out.pt")}
        torch.save(state, spec["state"])
        torch.save({f"{dp}x{sp}": rows for (dp, sp), rows in meshes.items()}, spec["rows"])
        return spawn(spec, worlds.pop(), timeout_s, fn=scaler_worker)


def spawn(spec: dict, world: int, timeout_s: float = 240.0, *, fn=worker) -> dict:
    """Run ``fn`` (``worker``) in ``world`` gloo processes under a hard deadline; rank 0's results."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world, free_port(), spec), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} gloo workers did not finish within {timeout_s:.0f}s")
    return torch.load(spec["out"], weights_only=False)


def run(model_id: str, arch: str, *, dp: int, sp: int, rows: list[dict], cases: list[dict], seed: int = 0,
        fail_rank: int | None = None, timeout_s: float = 240.0, matrix=None) -> dict:
    """Spawn ``dp × sp`` workers on ``rows`` (one per dp rank) for each case; rank 0's results per case name.

    ``matrix``: the cell's (a ``Matrix`` or a path; None: the packaged one): every worker patches under its policy."""
    from portvlm.models import tiny

    state = tiny.build(model_id, seed=seed).state_dict()
    with tempfile.TemporaryDirectory(prefix="portvlm-dist-") as tmp:
        spec = {"model_id": model_id, "arch": arch, "dp": dp, "sp": sp, "cases": cases, "fail_rank": fail_rank,
                "matrix": matrix,
                "state": os.path.join(tmp, "state.pt"), "rows": os.path.join(tmp, "rows.pt"),
                "out": os.path.join(tmp, "out.pt")}
        torch.save(state, spec["state"])
        torch.save(rows, spec["rows"])
        return spawn(spec, dp * sp, timeout_s)


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
