"""``parallelize``: a patched VLM over a ``(dp, sp)`` mesh — FSDP2 on every rank, Ulysses SP on the text decoder.

    import portvlm
    from portvlm.distributed import make_mesh, pack, parallelize

    dist.init_process_group(...)                        # torchrun --nproc_per_node N train.py
    handle = portvlm.patch(model, arch="sm70")          # the arch's policy: varlen kernels, dtype
    mesh = make_mesh(dp=N // sp, sp=sp, device_type="cuda")
    pmodel = parallelize(model, handle, mesh)           # fully_shard on vision blocks, decoder layers, root
    out = pmodel(**pack(samples))                        # one packed row per dp rank (samples differ per rank)
    out.loss.backward(); opt.step()                      # out.loss_value: the batch's mean token loss

A row is several samples packed without padding (``cu_seqlens``), with each sample's position ids (Qwen: 3-axis
mrope from ``get_rope_index`` / the processor, per sample) computed on the whole sample BEFORE the row is split:
SP ranks take contiguous slices of the row (``ulysses.split_bounds``) and of its positions. The vision tower is
not replicated (``portvlm.distributed.vision``); text attention runs through ``ulysses.UlyssesBackend``; the loss
is the mean over all tokens of the batch (``portvlm.distributed.loss``) and FSDP sums gradients accordingly.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from portvlm import models
from portvlm.distributed import loss as loss_mod
from portvlm.distributed import ulysses, vision
from portvlm.distributed.mesh import Layout, layout_of
from portvlm.errors import UnsupportedError
from portvlm.shims import model_io

TEXT_SHIMS = ("text_registry", "text_registry_legacy", "text_classes")
FAULTS = (None, "local_cu", "local_positions", "unordered_vision", "average_gradients")  # negative controls (tests)
ROW_KEYS = ("input_ids", "position_ids", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos",
            "video_grid_thw")


class StepOutput(NamedTuple):
    """What the FSDP root returns. A NamedTuple, not a dataclass: FSDP2 finds the tensors to hook its root
    pre-backward (re-gather the root's parameters) with ``tree_flatten`` up to torch 2.12, and pytree treats an
    unregistered dataclass as an opaque leaf — backward then used freed parameters (seen on torch 2.11 + CUDA:
    "setStorage ... out of bounds for storage of size 0", "aten.mm got mixed torch.Tensor and DTensor")."""

    loss: torch.Tensor  # this rank's share (local token-loss sum / batch token count): call backward on it
    loss_value: torch.Tensor  # detached: the batch's mean token loss, identical on every rank
    tokens: int  # target tokens in the whole batch (all dp rows)


def pack(samples: list[dict], *, device=None, dtype=None) -> dict:
    """One packed row from single-sample kwargs (batch 1 each): ids, positions, labels, pixels, ``cu_seqlens``;
    tensors moved to ``device`` and floating-point ones (pixels) cast to ``dtype`` when given."""
    lengths = [int(s["input_ids"].shape[1]) for s in samples]
    row = {"input_ids": torch.cat([s["input_ids"] for s in samples], 1)}
    if all("position_ids" in s for s in samples):
        row["position_ids"] = torch.cat([s["position_ids"] for s in samples], -1)  # each sample's own positions
    row["labels"] = torch.cat([s.get("labels", s["input_ids"]) for s in samples], 1)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [s[key] for s in samples if s.get(key) is not None]
        if parts:
            row[key] = torch.cat(parts, 0)
    row["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    if device is not None or dtype is not None:
        row = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in row.items()}
    row["max_seqlen"] = max(lengths)
    return row


def parallel_reasons(model, handle, layout: Layout) -> list[str]:
    """Why ``model`` cannot be parallelized over this mesh (empty: it can)."""
    reasons = []
    family = getattr(model.config, "model_type", None)
    applied = handle.report.shim_names() if hasattr(handle, "report") else set()
    if not applied & set(TEXT_SHIMS):
        reasons.append("portvlm's text attention is not installed on this model (none of "
                       f"{', '.join(TEXT_SHIMS)} applied): packed rows have no block-diagonal path")
    if layout.sp > 1:
        if family not in models.sequence_parallel_types():
            reasons.append(f"Ulysses SP is implemented for {', '.join(models.sequence_parallel_types())}, not {family}: "
                           "use a mesh with sp=1 (data parallel)")
        else:
            text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
            reasons += ulysses.head_reasons(text.num_attention_heads, text.num_key_value_heads, layout.sp)
    return reasons


class ParallelModel(torch.nn.Module):
    """The FSDP2 root around a patched model; ``forward(**row)`` runs one packed row with this rank's share of it."""

    def __init__(self, model, handle, layout: Layout, *, loss_chunk: int = 8192, fault: str | None = None):
        super().__init__()
        from portvlm.shims import attention, layer_paths

        if fault not in FAULTS:
            raise ValueError(f"fault {fault!r}; known: {FAULTS}")
        self.module = model
        self.layout = layout
        self.handle = handle
        self.fault = fault
        self.loss_chunk = loss_chunk
        self.family = model.config.model_type
        paths = layer_paths.resolve(model)
        self._paths = paths
        self._text_model = attention.text_model_of(model, paths.text_layers)
        self._class_path = "text_classes" in handle.report.shim_names()
        self._stack = contextlib.ExitStack()
        self.ulysses = None
        if layout.sp > 1:
            from portvlm.backends import register_backend

            state = handle.state
            self.ulysses = ulysses.UlyssesBackend(state.text_backend, layout.sp_group, layout.sp_rank, layout.sp,
                                                  fault="local_cu" if fault == "local_cu" else None)
            self._stack.enter_context(register_backend(self.ulysses.declaration(), self.ulysses))
            previous = state.text_backend
            state.text_backend = self.ulysses.name
            self._stack.callback(setattr, state, "text_backend", previous)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Give the handle its own text backend back and unregister the SP backend; idempotent."""
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, input_ids, cu_seqlens, labels=None, position_ids=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, max_seqlen=None) -> StepOutput:
        import torch.distributed as dist

        if input_ids.shape[0] != 1:
            raise ValueError(f"a packed row has batch size 1 (samples side by side, cu_seqlens); got {input_ids.shape[0]}")
        cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
        if int(cu[-1]) != input_ids.shape[1]:
            raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but the row has {input_ids.shape[1]} tokens")
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())
        labels = input_ids if labels is None else labels
        targets = loss_mod.shift_targets(labels, cu)
        row = dict(input_ids=input_ids, position_ids=position_ids, pixel_values=pixel_values,
                   image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        if self.family in models.sequence_parallel_types():
            loss_sum = self._qwen(row, cu, int(max_seqlen), targets)
        else:
            loss_sum = self._whole_model(row, cu, int(max_seqlen), targets)
        tokens = (targets != loss_mod.IGNORE).sum().to(torch.float32)
        if self.layout.dp_group is not None:
            dist.all_reduce(tokens, group=self.layout.dp_group)  # rows of other dp ranks count too
        tokens = tokens.clamp_min(1.0)
        value = loss_sum.detach().clone()
        if self.layout.world > 1:
            dist.all_reduce(value, group=self.layout.fsdp_mesh.get_group())
        return StepOutput(loss=loss_sum / tokens, loss_value=value / tokens, tokens=int(tokens))

    def _qwen(self, row, cu, max_seqlen, targets):
        lay, cfg = self.layout, self.module.config
        ids = row["input_ids"]
        total = ids.shape[1]
        if row["position_ids"] is None:
            raise ValueError("a Qwen packed row needs position_ids [3, 1, S]: each sample's mrope positions "
                             "(get_rope_index / the processor) concatenated, computed before the row is split")
        lo, hi = ulysses.split_bounds(total, lay.sp)[lay.sp_rank]
        feats = vision.distributed_features(self._paths.vision_tower, row, lay.sp_rank, lay.sp, lay.sp_group,
                                            ordered=self.fault != "unordered_vision")
        embeds = self._text_model.get_input_embeddings()(ids)
        embeds = embeds + feats["anchor"].to(embeds.dtype)
        embeds, masks = model_io.merge_vision_embeds(embeds, ids, cfg, feats)
        pos = row["position_ids"][..., lo:hi]
        if self.fault == "local_positions":
            pos = _restart_positions(row["position_ids"], cu, lo, hi)
        kwargs = dict(inputs_embeds=embeds[:, lo:hi], position_ids=pos, use_cache=False,
                      attention_mask=torch.ones(1, hi - lo, dtype=torch.long, device=ids.device))
        visual = masks["image"] | masks["video"]
        if feats["deepstack"] and bool(visual.any()):
            deep = []
            for img, vid in feats["deepstack"]:
                full = embeds.new_zeros(embeds.shape[1:])
                for kind, part in (("image", img), ("video", vid)):
                    if part.shape[0]:
                        full = full.masked_scatter(masks[kind][0, :, None].expand_as(full), part.to(full.dtype))
                deep.append(full[lo:hi][visual[0, lo:hi]])
            kwargs.update(model_io.deepstack_kwargs(visual[:, lo:hi], deep))
        if not self._class_path:
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen, max_length_k=max_seqlen)
        from portvlm.shims.attention import packed_rows

        with packed_rows(cu, max_seqlen):  # <=4.52 class path: the declaration; 4.53+: harmless
            out = self._text_model(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return loss_mod.token_loss_sum(hidden, self._paths.lm_head, targets[:, lo:hi], chunk=self.loss_chunk)

    def _whole_model(self, row, cu, max_seqlen, targets):
        """Data parallel through the model's own forward (LLaVA); a row without images still runs the tower."""
        ids = row["input_ids"]
        pos = row["position_ids"] if row["position_ids"] is not None else torch.arange(ids.shape[1], device=ids.device)[None]
        kwargs = dict(position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False,
                      cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen, max_length_k=max_seqlen)
        patches = models.by_type(self.family).layout == "patches"
        if patches and (row["pixel_values"] is not None or row["pixel_values_videos"] is not None):
            kwargs.update(input_ids=ids, **{k: row[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                                "video_grid_thw") if row[k] is not None})
        elif row["pixel_values"] is not None:
            kwargs.update(input_ids=ids, pixel_values=row["pixel_values"])
        elif patches:  # a Qwen-style family declared data parallel only (Qwen3.5, GLM-V): the same exact-zero anchor
            embeds = self.module.get_input_embeddings()(ids)
            kwargs["inputs_embeds"] = embeds + self._patches_dummy(ids.device).to(embeds.dtype)
        else:
            # The tower runs first, as in a row with images, and feeds the embeddings (an exact zero): every rank
            # all-gathers and reduce-scatters the same FSDP blocks in the same order.
            embeds = self.module.get_input_embeddings()(ids)
            kwargs["inputs_embeds"] = embeds + self._llava_dummy(ids.device).to(embeds.dtype)
        out = self.module(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return torch.nn.functional.cross_entropy(logits[0].float(), targets[0], ignore_index=loss_mod.IGNORE,
                                                 reduction="sum")

    def _patches_dummy(self, device):
        """An exact zero from the patch tower on one blank merge-window image (FSDP gathers its weights everywhere)."""
        from portvlm.shims import model_io

        tower = self._paths.vision_tower
        vc = self.module.config.vision_config
        merge, temporal = vc.spatial_merge_size, vc.temporal_patch_size
        dim = model_io.vision_channels(vc) * temporal * vc.patch_size**2
        dtype = next(p for p in tower.parameters()).dtype
        grid = torch.tensor([[1, merge, merge]], device=device)
        merged, deep = model_io.tower_outputs(tower(torch.zeros(merge * merge, dim, device=device, dtype=dtype),
                                                    grid_thw=grid))
        # the deepstack mergers too (Qwen3-VL-MoE, DP only): without them a text-only rank reduces fewer gradients
        # than a rank with images and gloo aborts ("Received data size doesn't match expected size")
        return sum((vision.zero_anchor(d) for d in deep), vision.zero_anchor(merged))

    def _llava_dummy(self, device):
        """An exact zero from the tower and projector on one blank image (FSDP gathers their weights on every rank)."""
        cfg = self.module.config
        tower = self._paths.vision_tower
        size = cfg.vision_config.image_size
        dtype = next(p for p in tower.parameters()).dtype
        hs = tower(torch.zeros(1, 3, size, size, device=device, dtype=dtype), output_hidden_states=True).hidden_states
        layer = cfg.vision_feature_layer
        feats = hs[layer] if isinstance(layer, int) else torch.cat([hs[i] for i in layer], dim=-1)
        if getattr(cfg, "vision_feature_select_strategy", "default") == "default":
            feats = feats[:, 1:]
        return vision.zero_anchor(self._paths.projector(feats))  # never 0·sum(): an fp16 sum overflows (issue 22)


def _restart_positions(position_ids, cu, lo, hi):
    """Negative control: positions as a rank would compute them from its own slice (the cut sample restarts)."""
    pos = position_ids[..., lo:hi].clone()
    starts = [int(c) for c in cu.tolist()]
    if lo not in starts:
        end = min([s for s in starts if s > lo] + [hi])
        pos[..., : end - lo] -= position_ids[..., lo : lo + 1]
    return pos


AUTO = "auto"


def mixed_precision_for(dtype):
    """FSDP2's policy for a compute dtype: fp16 computes in fp16 over fp32 sharded weights and reduces gradients in
    fp32 (what ``torch.amp.GradScaler`` needs: it refuses fp16 gradients); bf16 and fp32 keep their own (None)."""
    if dtype != torch.float16:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)


def _upcast(module, *, recurse: bool) -> None:
    """Floating-point parameters and buffers of ``module`` to fp32 (exact from fp16/bf16): the master weights."""
    module._apply(lambda t: t.float() if t.is_floating_point() else t, recurse=recurse)


def parallelize(model, handle, mesh=None, *, activation_checkpointing: bool = False, mp_policy=AUTO,
                reshard_after_forward: bool = True, loss_chunk: int = 8192, fault: str | None = None) -> ParallelModel:
    """Shard a ``portvlm.patch``-ed model with FSDP2 over ``mesh`` (dims "dp", "sp") and run Ulysses SP over "sp".

    ``fully_shard`` wraps every vision block and decoder layer (the classes ``portvlm.shims.layer_paths`` finds) and
    the returned root; gradients are summed (divide factor 1) because the loss is already the batch mean.
    ``activation_checkpointing`` turns on the model's own non-reentrant gradient checkpointing.
    ``mesh=None``: one process, nothing sharded (``Layout.single()``): the same packed-row forward and loss as the
    sharded runs, their single-process reference; ``mp_policy`` does not apply (the model runs in its own dtype).
    ``mp_policy``: ``"auto"`` (default) is ``mixed_precision_for(handle.dtype)`` — for an fp16 policy (sm70) the
    sharded weights become fp32 master weights, each block computes in fp16 and gradients are reduced in fp32, so
    ``torch.amp.GradScaler`` works; ``None`` shards the parameters as they are; a ``MixedPrecisionPolicy`` is used
    as given (the model's dtype is then the caller's choice).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model = _model_inside(model)
    layout = Layout.single() if mesh is None else layout_of(mesh)
    reasons = parallel_reasons(model, handle, layout)
    if reasons:
        raise UnsupportedError("portvlm.distributed.parallelize: " + "; ".join(reasons))
    if mesh is None:
        if activation_checkpointing:
            enable_activation_checkpointing(model)
        return ParallelModel(model, handle, layout, loss_chunk=loss_chunk, fault=fault)
    upcast = False
    if isinstance(mp_policy, str):
        if mp_policy != AUTO:
            raise ValueError(f"mp_policy {mp_policy!r}: pass {AUTO!r}, None or a torch MixedPrecisionPolicy")
        mp_policy = mixed_precision_for(getattr(handle, "dtype", None))
        upcast = mp_policy is not None
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    pmodel = ParallelModel(model, handle, layout, loss_chunk=loss_chunk, fault=fault)
    kwargs = {"mesh": layout.fsdp_mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    paths = pmodel._paths
    blocks = list(paths.vision_blocks) + list(paths.text_layers)
    for block in blocks:
        if upcast:  # block by block: only one block's fp32 copy exists unsharded at a time
            _upcast(block, recurse=True)
        fully_shard(block, **kwargs)
    if upcast:
        inside = {id(m) for b in blocks for m in b.modules()}
        for m in pmodel.modules():
            if id(m) not in inside:
                _upcast(m, recurse=False)
    # The root keeps FSDP's own default: its parameters (embeddings, lm_head, merger) stay gathered from forward
    # through backward, where the chunked loss recomputes lm_head. Forcing True would free them after forward.
    fully_shard(pmodel, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
    for m in pmodel.modules():
        if isinstance(m, FSDPModule) and fault != "average_gradients":  # the fault keeps FSDP's mean over ranks
            sum_gradients(m)
    return pmodel


def _model_inside(model):
    """The transformers model to shard: PEFT is looked through (its LoRA layers are sharded inside their decoder
    layers); a model another data-parallel wrapper or torch.compile already holds is refused, since parallelize shards
    the model itself and compiling comes after sharding."""
    from portvlm.wrappers import unwrap

    held = unwrap(model)
    other = [w.label for w in held.chain if w.package != "peft"]
    if other:
        raise UnsupportedError(
            f"portvlm.distributed.parallelize: the model is already inside {' -> '.join(other)}; parallelize shards the "
            "model with FSDP2 itself: pass the model before DDP / FSDP / DeepSpeed wrapping, and torch.compile after")
    return held.model


def enable_activation_checkpointing(model, *, use_reentrant: bool = False) -> None:
    """The model's own (non-reentrant) activation checkpointing, by whichever name this transformers has.

    transformers 5.23 renamed ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=…)`` to
    ``activation_checkpointing_enable(activation_checkpointing_kwargs=…)``; the old name warns (FutureWarning,
    removal in v6). Probe the new name first.
    """
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def sum_gradients(module) -> None:
    """Make FSDP2 SUM this module's gradients across ranks (the loss is the batch mean already; never average)."""
    if not hasattr(module, "set_gradient_divide_factor"):
        raise UnsupportedError(f"torch {torch.__version__}: FSDPModule has no set_gradient_divide_factor (torch >= 2.6); "
                               "portvlm needs summed gradients for a loss that is already the batch mean")
    module.set_gradient_divide_factor(1.0)
    # Factor 1 alone becomes ReduceOp.PREMUL_SUM(1.0), which gloo lacks; forcing sum-only comms gives plain SUM.
    if hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)
