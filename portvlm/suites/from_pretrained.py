"""The path users take: the tiny model saved to disk and loaded with ``from_pretrained`` and default arguments.

The other suites build models with ``_from_config``, which never reaches what ``from_pretrained`` adds: hub kernels
(transformers 5.25.0 kernelizes by default and raises without the ``kernels`` package, ../shared/research/
upstream-5.25.md §5), attention-implementation resolution for the model and its sub-configs, the load dtype. This
suite records each of them beside what ``_from_config`` with default arguments gives, so a difference is visible in
the result; it holds the doctor's prediction ("from_pretrained will raise") to what the load did; and it runs
``portvlm.patch`` and ``portvlm.check`` on the loaded model. Nothing here needs the Hub.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile

import torch

from portvlm.models import inputs as model_inputs
from portvlm.models import tiny
from portvlm.shims import hub_kernels
from portvlm.suites._common import Recorder, SuiteSkip, Timer, patched, report_summary, tol, torch_dtype
from portvlm.suites.parity import _forward
from portvlm.testing import check_from, compare

# What set_use_kernels raises when the kernels package is missing or too old (modeling_utils, 5.25.0).
KERNELS_MISSING = "Kernels are not available"


@contextlib.contextmanager
def _env(name: str, value: str):
    """``os.environ[name] = value`` for the block (transformers reads USE_HUB_KERNELS at each load)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def describe(model) -> dict:
    """How a loaded model resolved: attention implementation (model and vision sub-config), dtype, hub kernels."""
    cfg = model.config
    vision = getattr(cfg, "vision_config", None)
    return {
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "vision_attn_implementation": getattr(vision, "_attn_implementation", None) if vision is not None else None,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "use_kernels": bool(getattr(model, "use_kernels", False)),
        "kernelized": [k.to_dict() for k in hub_kernels.kernelized_layers(model)],
    }


def differences(loaded: dict, built: dict) -> list[str]:
    """What ``from_pretrained`` resolved differently from ``_from_config`` (both with default arguments)."""
    out = []
    for key in ("attn_implementation", "vision_attn_implementation", "dtype", "use_kernels"):
        if loaded[key] != built[key]:
            out.append(f"{key}: from_pretrained {loaded[key]!r}, _from_config {built[key]!r}")
    if loaded["kernelized"]:
        out.append(f"hub kernels: {len(loaded['kernelized'])} layer(s) kernelized by from_pretrained")
    return out


def predicted_raise() -> tuple[bool, str]:
    """The doctor's prediction for this environment (``hub_kernels.default_load``): will the load raise, and why."""
    load = hub_kernels.installed_default_load(os.environ)
    if load.raises:
        return True, f"from_pretrained will raise: transformers {load.raises}"
    return False, ("from_pretrained kernelizes (kernels installed)" if load.kernelizes
                   else "from_pretrained loads no Hub kernels")


def _source_model(model_id: str, seed: int):
    """The model written to disk: llava_mla is saved as the LLaVA it is converted from (users convert after loading)."""
    return tiny.build("llava" if model_id == "llava_mla" else model_id, seed=seed)


def _after_load(model_id: str, model):
    """What ``tiny.build`` does after building: a family variant's conversion (llava_mla: the MLA conversion)."""
    from portvlm import models

    variant = models.by_id(model_id).variant(model_id)
    if variant is not None:
        variant.convert(model)
    return model.eval()


@torch.no_grad()
def run(ctx):
    import transformers

    if ctx.checker is None:
        raise SuiteSkip("no checker handed in (SuiteContext.checker = portvlm.check); the cell child and the tests pass it")
    rec = Recorder("from_pretrained")
    timer = Timer()
    mid = ctx.model_id
    cls = tiny.model_class(mid)
    rec.figures["transformers"] = transformers.__version__
    rec.figures[hub_kernels.ENV] = os.environ.get(hub_kernels.ENV)

    with timer("build"):
        ref = tiny.build(mid, attn_implementation="eager", seed=ctx.seed)  # the suites' model: fp32 eager
        built = describe(cls._from_config(tiny.config(mid)))  # _from_config with default arguments
    with tempfile.TemporaryDirectory(prefix="portvlm-from-pretrained-") as tmp:
        with timer("save"):
            _source_model(mid, ctx.seed).save_pretrained(tmp)
        predicted, prediction = predicted_raise()
        rec.figures["doctor_prediction"] = prediction
        error = None
        with timer("load"):
            try:
                loaded = cls.from_pretrained(tmp)  # exactly as users load it: default arguments
            except Exception as exc:  # noqa: BLE001 - the load's failure is the finding
                error, loaded = f"{type(exc).__name__}: {exc}", None
        rec.figures["default_load"] = error or "ok"
        rec.check("doctor_predicts_default_load", predicted == (error is not None),
                  detail=f"doctor: {'raises' if predicted else 'loads'}; from_pretrained(path): "
                         + (f"raised {error}" if error else "loaded"))
        if error is not None:
            if KERNELS_MISSING not in error:
                rec.check("default_load", False, detail=f"from_pretrained with default arguments raised: {error}")
                return rec.result()
            # 5.25+ without kernels: the fix the doctor names; the suite goes on with it, and says so.
            with timer("load"), _env(hub_kernels.ENV, "0"):
                loaded = cls.from_pretrained(tmp)
            rec.figures["loaded_with"] = f"{hub_kernels.ENV}=0 (the default load raised: {error})"
    # portvlm.check rebuilds its fp32 reference from the model's config and state dict, which an MLA conversion
    # does not describe: it checks llava_mla's LLaVA as loaded from disk; the converted model is held to the
    # suites' own build below (weights and logits).
    checked = copy.deepcopy(loaded) if mid == "llava_mla" else loaded
    loaded = _after_load(mid, loaded)

    state = describe(loaded)
    rec.figures["from_pretrained"] = state
    rec.figures["from_config"] = built
    rec.figures["differences"] = differences(state, built) + (
        [f"default arguments raised ({error}); loaded with {hub_kernels.ENV}=0"] if error else [])
    rec.figures["hub_kernels"] = state["kernelized"]

    # The weights on disk are the weights: bitwise, so a load-time conversion or dtype change cannot hide.
    ref_sd, got_sd = ref.state_dict(), loaded.state_dict()
    missing = sorted(set(ref_sd) ^ set(got_sd))
    worst = max(((got_sd[k].float() - ref_sd[k].float()).abs().max().item() for k in ref_sd if k in got_sd),
                default=0.0)
    rec.check("weights_roundtrip", not missing and worst == 0.0,
              detail=f"{len(ref_sd)} tensors, max abs diff {worst:g}" + (f"; keys differ: {missing[:4]}" if missing else ""),
              value=worst, bound=0.0)

    # Unpatched: the loaded model as the user has it (its resolved attention) against the fp32 eager build.
    atol, rtol = tol(ctx, "fwd")
    inp = model_inputs.build(mid, "image", torch.float32, seed=ctx.seed)
    with timer("forward"):
        c = compare(_forward(loaded, inp).float(), _forward(ref, inp).float(), atol, rtol)
    rec.add(check_from("logits.image.unpatched", c,
                       what=f"from_pretrained ({state['attn_implementation']}) vs the _from_config eager build: "))

    # portvlm.patch and portvlm.check on the loaded model, under the cell's policy.
    if checked is not loaded:
        rec.figures["check_on"] = "the LLaVA loaded from disk, before the MLA conversion"
    with timer("check"), patched(checked, ctx) as handle:
        checked.to(ctx.device, torch_dtype(ctx.dtype))  # the policy's dtype, as the parity suite runs it
        rec.figures["patch_report"] = report_summary(handle)
        rec.figures["patch_hub_kernels"] = handle.report.hub_kernels
        report = ctx.checker(checked, arch=ctx.arch_id)
        rec.figures["check"] = {k: report.figures[k] for k in report.figures if k.endswith("max_abs")}
        rec.check("portvlm.check", report.ok,
                  detail="; ".join(f"{x.name}: {x.detail}" for x in report.failed) or f"{len(report.checks)} checks pass")
    rec.figures["timings"] = dict(timer.t)
    return rec.result()
