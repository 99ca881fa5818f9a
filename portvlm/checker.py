"""``portvlm.check``: hold a user's model, as it is in their process, to portvlm's independent fp32 reference.

    import portvlm
    report = portvlm.check(model)          # the model with whatever port / patches the user applied
    print(report); assert report.ok

    $ portvlm check mypkg.models:build     # a factory returning the model; exit 1 when a check fails

The model under test runs untouched (its dtype, device and class patches, portvlm's or anyone's). The reference is
a fresh fp32 CPU copy built from the model's config and state dict with ``attn_implementation="eager"``, whose
vision attention modules run a per-segment eager attention written here (one softmax per image / frame group, from
``cu_seqlens``) — so neither a class-level port nor portvlm's own kernels are in the reference. Inputs are built
from the model's config (token ids, patch / merge / temporal sizes, window): several images of different sizes and
a video packed in one sequence, a padded batch, text only.

Checks (Qwen-VL; LLaVA packs one image per batch row, so only the logits and the per-image tower run):
- ``vision.packed_vs_alone``: the model's tower on all items packed in one call vs the reference on each alone —
  the total leak (attention crossing images, frames or windows).
- ``vision.across_items``: the model's tower packed vs the same tower on each item alone — what packing adds.
- ``vision.alone`` (``vision.windows`` on Qwen2.5-VL): the model's tower on each item alone vs the reference — on
  Qwen2.5-VL, where an item spans several windows, what window blocks leak across windows (full blocks agree).
- ``logits.<case>``: text, image, packed, padded batch (left / right, padded positions not compared) vs fp32.
Tolerances: ``portvlm.testing.tolerances.budget`` keyed by the model's device kind and dtype (forward), the
family's declared ``tolerance_scale`` applied to the logits (never to the vision features), as in the suites.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckReport:
    """What ``check`` measured: each check with its value and bound, the figures, and what ran the attention."""

    family: str
    arch: str
    device_kind: str
    dtype: str
    checks: list = field(default_factory=list)  # portvlm.records.Check
    figures: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # attention forward -> what runs it for this model
    warnings: list[str] = field(default_factory=list)
    wrappers: list[str] = field(default_factory=list)  # what the model was found inside (portvlm.wrappers)
    reference: str = "the model's own weights"  # what the fp32 reference was built from (LoRA: merged or not)
    policy: str | None = None  # the arch policy portvlm.patch applied to this model ("sm70"), None: unpatched
    fp16: Any = None  # portvlm.shims.fp16.scan.ScanReport when the fp16 range was scanned

    @property
    def ok(self) -> bool:
        """True when every check passed (and there was at least one)."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failed(self) -> list:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "family": self.family, "arch": self.arch, "device_kind": self.device_kind,
            "dtype": self.dtype, "checks": [dict(c.__dict__) for c in self.checks], "figures": self.figures,
            "runs": dict(self.runs), "warnings": list(self.warnings), "wrappers": list(self.wrappers),
            "reference": self.reference, "policy": self.policy,
            "fp16": None if self.fp16 is None else {k: v for k, v in self.fp16.to_dict().items() if k != "peaks"},
        }

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        policy = f"arch {self.policy} policy (portvlm.patch)" if self.policy else f"arch {self.arch}, unpatched"
        lines = [f"portvlm check: {verdict} — {self.family} in {self.dtype}, {policy}, tolerances of "
                 f"{self.device_kind}, against an independent fp32 eager reference"]
        if self.wrappers:
            lines.append(f"  found inside: {' -> '.join(self.wrappers)}")
        lines.append(f"  reference built from {self.reference}")
        if self.figures.get("tolerance_scale"):
            lines.append(f"  logits tolerance x{self.figures['tolerance_scale']:g} declared by the family: "
                         f"{self.figures['tolerance_why']}")
        lines += [f"  {target}: {who}" for target, who in self.runs.items()]
        for c in self.checks:
            lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        for key in ("leak_max_abs", "across_items_max_abs", "across_windows_max_abs", "logits_max_abs"):
            if self.figures.get(key) is not None:
                lines.append(f"  {key} = {self.figures[key]:.3g}")
        if self.fp16 is not None:
            lines.append(f"  fp16 range ({self.fp16.batches} calibration batch(es), fp32 arithmetic):")
            lines += ["  " + line for line in self.fp16.lines()]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Inputs from the model's config
# --------------------------------------------------------------------------------------------------------------


def geometry(model):
    """The model's input geometry (token ids, patch / merge / temporal sizes, window), read from its config."""
    from portvlm.models import inputs as model_inputs

    return model_inputs.geometry(model.config)


def inputs(geo, kind: str, dtype, side: str = "left", seed: int = 0) -> dict:
    """Model kwargs for ``kind`` (text / image / packed / padded_batch): ``portvlm.models.inputs.build`` from the
    model's geometry; LLaVA prompts start with BOS, as a real prompt does."""
    from portvlm.models import inputs as model_inputs

    return model_inputs.build(geo, kind, dtype, padding_side=side, seed=seed, llava_bos=True)


def vision_items(geo, dtype, seed: int = 0) -> list[dict]:
    """The packed input's images and video one at a time, in the order the tower's features come out."""
    from portvlm.models import inputs as model_inputs

    return model_inputs.vision_items(geo, "packed", dtype, seed)


# --------------------------------------------------------------------------------------------------------------
# The independent reference
# --------------------------------------------------------------------------------------------------------------


def reference_vision_forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
    """Vision attention as the oracle: the module's q/k/v and rotary, then one fp32 softmax per ``cu_seqlens`` segment."""
    import torch

    from portvlm.shims.attention import rotary_of

    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    if getattr(self, "q_norm", None) is not None:  # GLM-OCR: per-head RMS norms on q and k before rotary (upstream order)
        q, k = self.q_norm(q), self.k_norm(k)
    if position_embeddings is None:
        emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
        position_embeddings = (emb.cos(), emb.sin())
    q, k = rotary_of(type(self))(q, k, *position_embeddings)
    scale = getattr(self, "scaling", None) or 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1).float() for t in (q, k, v))  # [H, L, D]
        probs = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
        out[start:end] = (probs @ vs).transpose(0, 1).to(out.dtype)
    return self.proj(out.reshape(seq, -1))


# The submodules the reference vision forward applies; any other would be silently skipped, so it refuses instead.
REFERENCE_VISION_CHILDREN = ("qkv", "proj", "q_norm", "k_norm")


def _vision_attention(model) -> list:
    from portvlm.shims.layer_paths import resolve

    return [b.attn for b in resolve(model).vision_blocks if hasattr(getattr(b, "attn", None), "qkv")]


def _text_attention(model) -> list:
    from portvlm.shims.layer_paths import resolve

    return [layer.self_attn for layer in resolve(model).text_layers if hasattr(layer, "self_attn")]


def reference(model):
    """A fresh fp32 CPU eager copy of ``model`` (config + state dict), vision attention per segment; foreign notes."""
    ref, notes, _ = reference_from(model)
    return ref, notes


def _active_adapters(model) -> tuple[list[str], bool]:
    """The adapter names the model's LoRA layers run, and whether the adapters are disabled (``disable_adapter()``)."""
    from portvlm.wrappers import is_lora_layer

    layer = next(m for m in model.modules() if is_lora_layer(m))
    return list(layer.active_adapters), bool(layer.disable_adapters)


def _with_adapters(ref, model, adapters: dict):
    """``ref`` (fresh, base weights only) given the same PEFT adapters as ``model``; returns (PeftModel, active, off)."""
    from peft import get_peft_model

    names = list(adapters)
    peft_ref = get_peft_model(ref, copy.deepcopy(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_ref.add_adapter(name, copy.deepcopy(adapters[name]))
    active, disabled = _active_adapters(model)
    peft_ref.base_model.set_adapter(active if len(active) > 1 else active[0])
    return peft_ref, active, disabled


def reference_from(model):
    """``reference`` plus what it was built from: the model's weights, or LoRA adapters merged into them in fp32.

    A model PEFT injected adapters into (``get_peft_model``; ``model.peft_config`` names them) gets the same adapters
    on a fresh fp32 copy (its state dict then has the model's keys), and PEFT's ``merge_and_unload`` merges them there
    in fp32 — the user's model is never merged or modified. An adapter type PEFT cannot merge stays unmerged (base +
    adapters, fp32), and the report says so.
    """
    import torch

    from portvlm.errors import UnsupportedError
    from portvlm.wrappers import adapters_of

    cfg = copy.deepcopy(model.config)
    cls = type(model)
    ref = cls._from_config(cfg, attn_implementation="eager")
    source = "the model's own weights"
    adapters = adapters_of(model)
    peft_ref = None
    if adapters:
        try:
            peft_ref, active, disabled = _with_adapters(ref, model, adapters)
        except ImportError as exc:
            raise UnsupportedError(f"the model carries PEFT adapters ({', '.join(adapters)}) but peft cannot be "
                                   f"imported here ({exc}): install peft to check it") from exc
        ref = peft_ref.get_base_model()
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in model.state_dict().items()}
    try:
        ref.load_state_dict(state)
    except RuntimeError as exc:
        raise UnsupportedError(
            f"portvlm check cannot build its reference: {type(model).__name__}'s weights do not load into a fresh "
            f"{cls.__name__} from its config ({str(exc).splitlines()[0]} …). Adapters or wrappers portvlm does not "
            "know change the state dict: check the model before adding them, or merge them first") from exc
    if peft_ref is not None:
        names = ", ".join(repr(a) for a in active)
        if disabled:
            ref = peft_ref.unload()
            source = f"the base weights (the model's PEFT adapters {names} are disabled)"
        else:
            try:
                ref = peft_ref.merge_and_unload()
                source = f"the base weights with PEFT adapter(s) {names} merged in fp32 (peft merge_and_unload on the reference copy)"
            except (ValueError, NotImplementedError, TypeError) as exc:
                source = (f"the base weights plus PEFT adapter(s) {names}, unmerged in fp32 (peft cannot merge them: "
                          f"{exc})")
    ref = ref.to(torch.float32).eval()
    for module in _vision_attention(ref):
        unknown = sorted(set(dict(module.named_children())) - set(REFERENCE_VISION_CHILDREN))
        if unknown:
            raise UnsupportedError(f"portvlm check's reference vision attention would skip {type(module).__name__}'s "
                                   f"{', '.join(unknown)}: teach checker.reference_vision_forward that step first")
        module.forward = reference_vision_forward.__get__(module)
    notes = []
    for module in _text_attention(ref):
        origin = _upstream_reasons(type(module), "forward")
        if origin:
            notes.append(origin)
    return ref, sorted(set(notes)), source


def _upstream_reasons(cls, attr: str) -> str | None:
    """Why the reference's ``cls.attr`` is not transformers' own for an unpatched module (None: it is)."""
    from portvlm.shims import dispatch

    hook = dispatch.HOOKS.get((cls, attr))
    fn = hook.fallback if hook is not None else getattr(cls, attr)  # portvlm's dispatcher runs the fallback for it
    origin = dispatch.foreign_origin(fn)
    if origin is None:
        return None
    return f"{cls.__qualname__}.{attr} is not transformers' own ({origin}): the reference's text attention runs it too"


def runs(model) -> dict[str, str]:
    """What runs each attention class's forward for ``model``: transformers, portvlm (which handle), or a foreign port."""
    from portvlm.shims import dispatch

    out = {}
    owner = dispatch.OWNERS.get(model)
    for module in _vision_attention(model) + _text_attention(model):
        cls = type(module)
        key = f"{cls.__qualname__}.forward"
        if key in out:
            continue
        if "forward" in vars(module):
            out[key] = f"an instance attribute: {dispatch.code_origin(vars(module)['forward'])}"
            continue
        hook = dispatch.HOOKS.get((cls, "forward"))
        if hook is not None and owner is not None:
            out[key] = f"portvlm ({owner.name})" + (f", in place of {hook.foreign}" if hook.foreign else "")
            continue
        origin = dispatch.foreign_origin(hook.fallback if hook is not None else cls.forward)
        out[key] = "transformers" if origin is None else f"not transformers' own: {origin}"
    return out


# --------------------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------------------


def _forward(model, inp):
    from portvlm.shims.model_io import reset_rope_state
    from portvlm.testing import logits_of

    reset_rope_state(model)
    return logits_of(model(**inp, use_cache=False))


def _tower_features(layout, tower, items, device, dtype) -> dict:
    import torch

    from portvlm.shims.model_io import vision_features

    outs: dict[str, list] = {}
    for item in items:
        grid = None if item["grid_thw"] is None else item["grid_thw"].to(device)
        for key, t in vision_features(layout, tower, item["pixel_values"].to(device, dtype), grid).items():
            outs.setdefault(key, []).append(t.float().cpu())
    return {k: torch.cat(v, 0) for k, v in outs.items()}


def _packed(items) -> dict:
    import torch

    grids = [i["grid_thw"] for i in items]
    return {"pixel_values": torch.cat([i["pixel_values"] for i in items], 0),
            "grid_thw": None if grids[0] is None else torch.cat(grids, 0)}


def _device_kind(model_device, arch: str | None) -> tuple[str, str]:
    from portvlm.testing.tolerances import device_kind

    if model_device.type == "cpu":
        return "cpu", arch or "cpu"
    if arch is None:
        from portvlm.platform import detect

        arch = detect().arch_id
    return device_kind(arch, "cuda"), arch or "unknown"


def check(model, arch: str | None = None, *, seed: int = 0, inputs=None, dtype=None) -> CheckReport:
    """Run the parity checks on ``model`` as it is (its patches included) against portvlm's fp32 reference.

    ``dtype=torch.float16`` (automatic for a model in fp16) adds the fp16 range scan: the model runs ``inputs`` (its
    forward kwargs, a dict or a list; default: the built-in geometry's packed row) in fp32 arithmetic and every peak
    is held against 65504 (``fp16.range``); a non-finite parity result is then named as the overflow it is.
    """
    import torch

    from portvlm import models
    from portvlm.errors import FP16OverflowError, UnsupportedError
    from portvlm.shims.patch import handle_of
    from portvlm.testing import tolerances
    from portvlm.wrappers import unwrap

    held = unwrap(model)  # PEFT, DDP, DeepSpeed, torch.compile: the checks run on the transformers model inside
    reasons = held.check_reasons()
    if reasons:
        raise UnsupportedError("portvlm.check: " + "; ".join(reasons))
    model = held.model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in models.model_types():
        raise UnsupportedError(f"portvlm.check knows {', '.join(models.model_types())}; this model is {model_type!r} "
                               f"({type(model).__name__}); portvlm/models/ says how to declare a family")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    kind, arch_id = _device_kind(device, arch)
    dtype_name = str(dtype).removeprefix("torch.")
    family = models.by_type(model_type)  # its declared tolerance_scale (and why) holds for the logits, as in the suites
    budgets = {out: tolerances.budget(kind, dtype_name, None, "fwd", family=family, output=out)
               for out in tolerances.OUTPUTS}
    handle = handle_of(model)
    policy = handle.report.arch if handle is not None else None
    report = CheckReport(model_type, arch_id, kind, dtype_name, runs=runs(model), wrappers=held.labels, policy=policy)
    report.figures.update(**budgets["text"].figures(), **budgets["vision"].figures("vision_"))
    geo = geometry(model)
    if dtype_name == "float16" or (dtype is not None and str(dtype).removeprefix("torch.") == "float16"):
        report.fp16 = _fp16_scan(report, model, geo, inputs, seed, policy)
    ref, notes, report.reference = reference_from(model)
    report.warnings += notes

    was_training = model.training
    model.eval()  # dropout off for the comparison; the caller's mode is put back below
    try:
        with torch.no_grad():
            try:
                _run_checks(report, model, ref, geo, device, dtype, budgets, seed)
            except FP16OverflowError as exc:  # the fp16 policy's guard stopped a forward: that is the finding
                report.checks.append(_check("fp16.guard", False, str(exc)))
    finally:
        model.train(was_training)
    _name_overflow(report)
    if notes:
        report.checks.append(_check("reference.independent", False,
                                    "; ".join(notes) + " — fix or remove that port to get an independent verdict"))
    return report


def _fp16_scan(report, model, geo, batch, seed, policy):
    """The fp16 range scan on ``batch`` (default: the built-in packed row) as the ``fp16.range`` check."""
    import torch

    from portvlm.shims.fp16.scan import scan

    if batch is None:
        batch = inputs(geo, "packed", torch.float32, seed=seed)
    result = scan(model, batch, arch=policy)
    if result.ok:
        detail = "every calibrated peak fits fp16: " + "; ".join(
            f"{t} stream x{result.headroom(t)[0]:.3g} below 65504" for t in sorted(result.stream_peak))
    else:
        first = result.overflows[0]
        detail = f"{first}; the fp16 policy (sm70, ROCm fp16) {first.fix}" + (
            f" (+{len(result.overflows) - 1} more)" if len(result.overflows) > 1 else "")
    report.checks.append(_check("fp16.range", result.ok, detail, max(result.stream_peak.values(), default=0.0), 65504.0))
    return result


def _name_overflow(report) -> None:
    """A non-finite parity result is an fp16 overflow (named when scanned), never an attention leak of inf."""
    bad = [c for c in report.checks if c.name != "fp16.range" and not c.ok and "non-finite" in c.detail]
    if not bad:
        return
    if report.fp16 is not None and report.fp16.overflows:
        why = f"not an attention leak: {report.fp16.overflows[0]} (see fp16.range)"
    else:
        why = ("not an attention leak: the output is not finite (an fp16 overflow? portvlm check --fp16 / "
               "portvlm.check(model, dtype=torch.float16) names the module)")
    for c in bad:
        c.detail = c.detail.replace("(non-finite values)", f"({why})")
    for key in ("leak_max_abs", "across_items_max_abs", "across_windows_max_abs", "alone_max_abs", "logits_max_abs"):
        if key in report.figures and not math.isfinite(report.figures[key]):
            report.figures[key] = None  # no leak figure from a non-finite output
    report.figures["non_finite"] = sorted(c.name for c in bad)


def _check(name, ok, detail, value=None, bound=None):
    from portvlm.records import Check

    return Check(name=name, ok=bool(ok), detail=detail, value=value, bound=bound)


def _run_checks(report, model, ref, geo, device, dtype, budgets, seed):
    import torch

    from portvlm.models import inputs as model_inputs
    from portvlm.shims.layer_paths import resolve
    from portvlm.testing import check_from, compare

    items = vision_items(geo, torch.float32, seed)
    ref_tower, tower = resolve(ref).vision_tower, resolve(model).vision_tower
    alone_ref = _tower_features(geo.layout, ref_tower, items, torch.device("cpu"), torch.float32)
    alone = _tower_features(geo.layout, tower, items, device, dtype)
    packed = _tower_features(geo.layout, tower, [_packed(items)], device, dtype)
    windowed = geo.window is not None  # Qwen2.5-VL: window blocks beside full-attention ones
    name_alone = "vision.windows" if windowed else "vision.alone"
    figures: dict[str, list] = {}
    vision = budgets["vision"]
    for key in alone_ref:
        total = compare(packed[key], alone_ref[key], *vision)
        across = compare(packed[key], alone[key], *vision)
        each = compare(alone[key], alone_ref[key], *vision)
        n = len(items)
        report.checks.append(check_from(f"vision.packed_vs_alone.{key}", total,
                                        f"{n} items packed in one call vs the reference on each alone; "))
        report.checks.append(check_from(f"vision.across_items.{key}", across,
                                        f"{n} items packed vs the same tower on each alone; "))
        report.checks.append(check_from(f"{name_alone}.{key}", each, "each item alone vs the reference; "))
        figures.setdefault("leak_max_abs", []).append(total.max_abs_err)
        figures.setdefault("across_items_max_abs", []).append(across.max_abs_err)
        figures.setdefault("across_windows_max_abs" if windowed else "alone_max_abs", []).append(each.max_abs_err)
    report.figures.update({k: max(v) for k, v in figures.items() if v})
    report.figures["items"] = [list(map(int, i["grid_thw"][0])) if i["grid_thw"] is not None else "image" for i in items]
    if windowed:
        vc = model.config.vision_config
        full = list(getattr(vc, "fullatt_block_indexes", []) or [])
        spans = [model_inputs.num_windows(tuple(map(int, i["grid_thw"][0])), geo.window) for i in items]
        report.figures.update(full_attention_blocks=full, windows_per_item=spans)
        report.checks.append(_check(
            "vision.window_and_full_blocks_exercised", bool(full) and len(full) < vc.depth and max(spans) > 1,
            f"full blocks {full} of {vc.depth}, windows per item {spans}", max(spans), 2))

    errors = {}
    text = budgets["text"]
    scaled = f"table x{text.scale:g} (the family's declared tolerance_scale); " if text.scale != 1.0 else ""
    for kind, side in model_inputs.CASES:
        name = model_inputs.case_name(kind, side)
        expected = _forward(ref, inputs(geo, kind, torch.float32, side or "left", seed))
        inp = {k: v.to(device) for k, v in inputs(geo, kind, dtype, side or "left", seed).items()}
        got = _forward(model, inp).float().cpu()
        c = compare(got, expected, *budgets["text"], mask=inp["attention_mask"].bool().cpu())
        errors[name] = c.max_abs_err
        report.checks.append(check_from(f"logits.{name}", c, what=scaled))
    report.figures["logits_max_abs"] = max(errors.values())
    report.figures["logits_errors"] = errors


# --------------------------------------------------------------------------------------------------------------
# Command line: portvlm check module:function
# --------------------------------------------------------------------------------------------------------------


def load_factory(spec: str):
    """``"pkg.module:function"`` -> the function (the current directory is importable, as with ``python -m``)."""
    import importlib
    import os

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r}: expected module:function (e.g. mypkg.models:build_model)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{spec}: {attr} is not callable")
    return fn


def _where(exc: BaseException) -> str:
    """`` (at file:line in function)`` of the innermost frame of ``exc``'s traceback."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="portvlm check",
        description="Run portvlm's parity checks on YOUR model (as your factory builds it, patches included) against "
                    "an independent fp32 eager reference. Exit 0: every check passed; 1: a check failed; 2: usage, or a model "
                    "portvlm cannot check (the reason is printed); 3: portvlm itself failed (report it).")
    parser.add_argument("factory", help="module:function that returns the model (e.g. mypkg.models:build_model)")
    parser.add_argument("--arch", help="arch id whose tolerances apply to a GPU model (default: the host's)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--fp16", action="store_true",
                        help="scan the fp16 range: every module's peak in fp32 arithmetic vs 65504, and what the sm70 "
                             "policy does about an overflow (automatic for a model in fp16)")
    parser.add_argument("--inputs", metavar="MODULE:FUNCTION",
                        help="a function returning the forward kwargs to scan on (a dict or a list of dicts: your own "
                             "images/videos through your processor); default: the built-in geometry")
    args = parser.parse_args(argv)
    try:
        model = load_factory(args.factory)()
        batch = load_factory(args.inputs)() if args.inputs else None
    except Exception as exc:  # noqa: BLE001 - the user's factory: say what failed, never a traceback
        print(f"error: cannot build the model with {args.factory}: {type(exc).__name__}: {exc}{_where(exc)}",
              file=sys.stderr)
        return 2
    from portvlm.errors import PortvlmError

    try:
        report = check(model, arch=args.arch, inputs=batch, dtype="float16" if args.fp16 else None)
    except PortvlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - no raw exception escapes the command; exit 3 says "portvlm failed"
        print(f"error: portvlm check failed on {type(model).__name__} with {type(exc).__name__}: {exc}{_where(exc)}. "
              "This is portvlm's failure, not a parity verdict: please report it with this line", file=sys.stderr)
        return 3
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report)
    return 0 if report.ok else 1


__all__ = ["CheckReport", "check", "geometry", "inputs", "main", "reference", "reference_from", "runs", "vision_items"]
