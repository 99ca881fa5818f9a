"""What an fp16 policy does to a model: exact residual-stream rescaling, fp32 islands, and a guard that names overflow.

``portvlm.patch(model, arch="sm70", calibration=batch)`` calls :func:`protect` when the policy's dtype is float16
(sm70; the ROCm policies when they run fp16):

- **rescaling** by a power of two α per tower (scan-chosen): every module that writes the residual stream (text
  ``embed_tokens``/``o_proj``/``down_proj``; vision patch embedding, learned positions, attention ``proj``, MLP down
  projection; the mergers' last linear at the *text* α, so image tokens enter the text stream at its scale) computes
  α× its output — its input and bias scaled by α, its weights untouched — and every norm reading the stream gets
  eps × α². ``Norm(αx) = Norm(x)``, so the logits do not change (up to fp16 rounding), and since no parameter is
  edited, gradients and any optimizer's trajectory are the unscaled model's (see :func:`rescale`).
- **fp32 islands** where the overflow sits inside a block (an MLP intermediate before its down projection, Qwen3-VL's
  vision ``linear_fc1``, unsloth-zoo #787): that module runs on fp32 copies of its weights and hands fp16 on.
- **the guard**: one max-|x| per block written into a device tensor (no host sync), one finiteness check per model
  forward; a non-finite activation raises :class:`FP16OverflowError` naming the first module (found by re-running that
  forward only on failure) and the fix, instead of returning NaN.
- never a clamp: it changes the function (transformers #35151) and cannot undo a NaN (vLLM #14126).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from portvlm.errors import FP16OverflowError, UnsupportedError
from portvlm.shims.fp16 import FP16_MAX
from portvlm.shims.fp16.scan import ISLAND_ATTR, Layout, ScanReport, layout_of, scan
from portvlm.shims.model_io import reset_rope_state

FIX = ("calibrate: portvlm.patch(model, arch=..., calibration=batch) with inputs like the failing ones (the policy "
       "rescales the residual stream by a power of two and runs overflowing MLPs as fp32 islands); or run this model "
       "in float32 (portvlm.patch(..., dtype=torch.float32))")


@dataclass(frozen=True)
class Change:
    """One thing the fp16 policy changed on the model, and why."""

    kind: str  # "rescale" | "eps" | "island" | "guard"
    target: str
    why: str


@dataclass
class Protection:
    """The fp16 policy on one model: what it changed (``changes``), the scans it based that on, its guard."""

    layout: Layout
    changes: list[Change] = field(default_factory=list)
    scan: ScanReport | None = None  # the calibration scan before the fix
    verified: ScanReport | None = None  # the same batch after it (every peak fits)
    guard: Guard | None = None
    alpha: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The report's fp16 section: α per tower, then each change and why."""
        out = []
        for tower, a in self.alpha.items():
            if a != 1.0:
                out.append(f"{tower} residual stream × 2^{int(math.log2(a))}")
        for c in self.changes:
            out.append(f"{c.kind} {c.target}: {c.why}")
        return out


# --------------------------------------------------------------------------------------------------------------
# Rescaling (exact for powers of two), on the activations: the parameters are never edited
# --------------------------------------------------------------------------------------------------------------
# Why not multiply the writers' weights by α (what anemll and NovelAI's t5 do for inference): the function is the
# same, but training is not. Adam-family optimizers move every parameter by ~lr whatever its scale, so a weight
# stored α× smaller learns 1/α× faster (SGD: 1/α²×), and a LoRA adapter beside an edited base layer writes at the
# unscaled magnitude. Measured: at Qwen2.5-VL-7B widths one AdamW step (lr 1e-5) on the weight-edited model moved
# the planted down_proj's peak from 1.5e4 to 7.9e4 on an H200 (and 4.3e3 -> 13 on the CPU at 3584/18944 widths),
# where the unscaled model's step barely moves it. Scaling the writer's *input* (and its bias) by α instead gives
# bitwise the same fp16 forward (a power of two scales every product and sum exactly, subnormals aside) and leaves
# every parameter, its gradient and so any optimizer's trajectory exactly the unscaled model's.


def _scaled_forward(module, a: float):
    """A forward computing ``a`` × ``module``'s output with its parameters untouched, and how (for the report)."""
    import torch
    import torch.nn.functional as F

    inner = module.__dict__.get("forward")  # an instance forward already installed (another patch) or None
    if inner is None and type(module) is torch.nn.Linear:
        def linear(x):
            return F.linear(x * a, module.weight, None if module.bias is None else module.bias * a)
        return linear, "input and bias × α"
    if inner is None and isinstance(module, torch.nn.modules.conv._ConvNd) and module.padding_mode == "zeros":
        def conv(x):
            return module._conv_forward(x * a, module.weight, None if module.bias is None else module.bias * a)
        return conv, "input and bias × α"
    base = inner or type(module).forward.__get__(module)
    if isinstance(module, torch.nn.Embedding):
        def embedding(*args, **kwargs):
            return base(*args, **kwargs) * a  # a lookup: scaling what it returns is exact
        return embedding, "output × α (a lookup)"
    if any(n.rsplit(".", 1)[-1] == "bias" for n, _ in module.named_parameters()):
        raise ValueError(f"{type(module).__module__}.{type(module).__name__} has a bias and no exact input scaling here")

    def linear_map(x, *args, **kwargs):  # bias-free and linear in x (a PEFT-wrapped projection too): exact
        if not x.is_floating_point():  # token ids (a wrapped embedding): its output is table rows, scale those
            return base(x, *args, **kwargs) * a
        return base(x * a, *args, **kwargs)
    return linear_map, "input × α"


def _lora_parts(module):
    """A PEFT LoRA layer's (base layer, its adapters' first projections) — each scaled on its own, which is exact with
    a biased base layer too — or None (not a LoRA layer, or DoRA, whose weight norm is not linear in the weights)."""
    import torch

    base, first = getattr(module, "base_layer", None), getattr(module, "lora_A", None)
    if not isinstance(base, torch.nn.Module) or not isinstance(first, torch.nn.ModuleDict) or not len(first):
        return None
    if len(getattr(module, "lora_magnitude_vector", None) or ()):
        return None
    return base, list(first.values())


def _unwrapped_only(model, path: str, module, forward):
    """``forward``, refusing once ``module`` is no longer at ``path``: a wrapper installed after the rescale (PEFT's
    LoRA layer holds the writer as its ``base_layer``) would add its own output unscaled, 1/α× too strong."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model

    def checked(*args, **kwargs):
        current = getattr(parent, attr, None)
        if current is not module:
            raise UnsupportedError(
                f"fp16 rescale: {path} was wrapped ({type(current).__name__}) after portvlm.patch(..., calibration=...) "
                "scaled its output; the wrapper's own output (a LoRA adapter's) would enter the residual stream "
                "unscaled. Fix: wrap first (get_peft_model), then portvlm.patch; or revert, wrap, and patch again")
        return forward(*args, **kwargs)

    return checked


def rescale(model, layout: Layout, alpha: dict[str, float], patcher) -> list[Change]:
    """Each tower's stream writers compute α× their output (the bridges at the text α), norms' eps × α²; undone by
    ``patcher``. No parameter changes: training sees the unscaled model's parameters and gradients."""
    from portvlm.shims.fp16.scan import _eps_attr

    changes: list[Change] = []

    def scale(path: str, a: float, what: str) -> None:
        module = model.get_submodule(path)
        lora = _lora_parts(module)
        if lora is not None:  # base(x) + B(A(x))·s: α× each of base and A gives α× the sum, whatever base's bias
            base, firsts = lora
            for part in (base, *firsts):
                forward, _ = _scaled_forward(part, a)
                patcher.set_attr(part, "forward", forward)
            patcher.set_attr(module, "forward", _unwrapped_only(model, path, module, module.forward))
            changes.append(Change("rescale", path, f"{what}: output × 2^{int(math.log2(a))} (a LoRA layer: its base "
                                  "layer's input and bias and each adapter's input × α; weights untouched)"))
            return
        try:
            forward, how = _scaled_forward(module, a)
        except ValueError as exc:
            raise UnsupportedError(f"fp16 rescale of {path}: {exc}; portvlm.shims.fp16.protect._scaled_forward "
                                   "needs a case for it (or run this model in float32)") from None
        patcher.set_attr(module, "forward", _unwrapped_only(model, path, module, forward))
        changes.append(Change("rescale", path, f"{what}: output × 2^{int(math.log2(a))} ({how}; weights untouched)"))

    text_a = alpha.get("text", 1.0)
    for tower, a in alpha.items():
        if a == 1.0:
            continue
        k = int(math.log2(a))
        for path in layout.writers[tower]:
            scale(path, a, f"writes the {tower} residual stream")
        for path in layout.norms[tower]:
            norm = model.get_submodule(path)
            attr = _eps_attr(norm)
            patcher.set_attr(norm, attr, getattr(norm, attr) * a * a)
            changes.append(Change("eps", path, f"reads the {tower} stream: {attr} × 2^{2 * k} (Norm(αx) = Norm(x))"))
    if text_a != 1.0:
        for path in layout.bridges:
            scale(path, text_a, "writes image tokens into the text stream")
    return changes


# --------------------------------------------------------------------------------------------------------------
# fp32 islands
# --------------------------------------------------------------------------------------------------------------


def _cast(value, dtype):
    import torch

    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value


def _first_float_dtype(args, kwargs):
    import torch

    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return None


def island(module, why: str, patcher) -> None:
    """Make ``module`` compute in fp32 (fp32 copies of its weights, fp32 inputs) and hand on its input's dtype."""
    import torch

    own = module.__dict__.get("forward") or type(module).forward.__get__(module)  # a rescaled writer's, if any
    inside = [False]

    def forward(*args, **kwargs):
        if inside[0]:  # functional_call below calls the module again: run its own forward
            return own(*args, **kwargs)
        dtype = _first_float_dtype(args, kwargs)
        state = {n: t.float() for n, t in (*module.named_parameters(), *module.named_buffers())
                 if t.is_floating_point()}
        inside[0] = True
        device = next(iter(state.values())).device.type if state else "cpu"
        try:
            with torch.autocast(device, enabled=False):  # under autocast the Linear inside would run fp16 again
                out = torch.func.functional_call(module, state, _cast(args, torch.float32),
                                                 {k: _cast(v, torch.float32) for k, v in kwargs.items()})
        finally:
            inside[0] = False
        return out if dtype is None else _cast(out, dtype)

    patcher.set_attr(module, "forward", forward)
    patcher.set_attr(module, ISLAND_ATTR, why)


# --------------------------------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------------------------------


class _Found(Exception):
    def __init__(self, path, module, args, kwargs, input_bad):
        self.path, self.module, self.args, self.kwargs, self.input_bad = path, module, args, kwargs, input_bad


class Guard:
    """Per-block max |x| into one device tensor (no host sync), one finiteness check per forward of the model."""

    def __init__(self, model, layout: Layout, lm_head: str | None):
        import weakref

        self._model = weakref.ref(model)  # weak: the handle outlives a revert, and must not keep the model alive
        self.paths = [*layout.blocks["vision"], *layout.bridge_owners, *layout.blocks["text"]]
        if lm_head:
            self.paths.append(lm_head)
        self.peaks = None  # torch tensor [len(paths)] on the activations' device, made at the first forward
        self.handles: list = []
        self.checks = 0  # forwards checked (one host sync each)
        self._call = None

    @property
    def model(self):
        return self._model()

    def install(self, patcher) -> None:
        for i, path in enumerate(self.paths):
            self.handles.append(self.model.get_submodule(path).register_forward_hook(self._block_hook(i)))
        self.handles.append(self.model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(self._post, with_kwargs=True))
        patcher.on_restore(self.remove)

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def _block_hook(self, i: int):
        import torch

        def hook(module, args, out):
            t = out if isinstance(out, torch.Tensor) else next(
                (o for o in (out if isinstance(out, (tuple, list)) else getattr(out, "values", lambda: ())())
                 if isinstance(o, torch.Tensor) and o.is_floating_point()), None)
            if t is None or not t.is_floating_point():
                return
            if self.peaks is None or self.peaks.device != t.device:
                self.peaks = torch.zeros(len(self.paths), dtype=torch.float32, device=t.device)
            # max |x| in the activation's dtype (a max cannot overflow); inf and NaN propagate into it
            self.peaks[i] = torch.linalg.vector_norm(t.detach(), float("inf")).float()
        return hook

    def _pre(self, module, args, kwargs):
        if self.peaks is not None:
            self.peaks.zero_()
        self._call = (args, kwargs)

    def _post(self, module, args, kwargs, out):
        import torch

        call, self._call = self._call, None
        if self.peaks is None:
            return None
        self.checks += 1
        if bool(torch.isfinite(self.peaks).all()):  # the one host sync per forward
            return None
        first = next(i for i, ok in enumerate(torch.isfinite(self.peaks).tolist()) if not ok)
        self.peaks.zero_()
        raise locate(self.model, call, self.paths[first])


def locate(model, call, block: str) -> FP16OverflowError:
    """Re-run the failing forward (no grad) to find the first module whose output is not finite; the error for it."""
    import torch

    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def finite(v) -> bool:
        if isinstance(v, torch.Tensor):
            return not v.is_floating_point() or bool(torch.isfinite(v).all())
        if isinstance(v, (tuple, list)):
            return all(finite(x) for x in v)
        return True

    def hook(module, args, kwargs, out):
        if not finite(out):
            raise _Found(names[id(module)], module, args, kwargs, not (finite(args) and finite(tuple(kwargs.values()))))

    for path, module in model.named_modules():
        if path:
            hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    found = None
    try:
        if call is not None:
            args, kwargs = call
            reset_rope_state(model)  # Qwen keeps rope deltas between calls
            with torch.no_grad():
                type(model).forward(model, *args, **kwargs)
    except _Found as exc:
        found = exc
    finally:
        for h in hooks:
            h.remove()
    if found is None:
        return FP16OverflowError(f"fp16 overflow in {block}: its output is not finite (the re-run to locate the "
                                 f"module did not reproduce it). Fix: {FIX}", module=block)
    if found.input_bad:
        return FP16OverflowError(
            f"fp16 overflow before {found.path}: its input is not finite (a residual add outside any module left "
            f"fp16's range, |x| > {FP16_MAX:.0f}). Fix: {FIX}", module=found.path)
    peak = _fp32_peak(found.module, found.args, found.kwargs)
    size = f"|x| up to {peak:.3g} > {FP16_MAX:.0f}" if peak is not None else "non-finite even in fp32"
    return FP16OverflowError(f"fp16 overflow at {found.path}: {size} (its fp16 output is not finite; first module "
                             f"in block {block}). Fix: {FIX}", module=found.path, peak=peak)


def _fp32_peak(module, args, kwargs) -> float | None:
    """The module's max |output| recomputed in fp32 on the same inputs (None when that is not finite or fails)."""
    import torch

    state = {n: t.float() for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()}
    device = next(iter(state.values())).device.type if state else "cpu"
    try:
        # the guard fires inside the caller's autocast region: without disabling it the Linear runs fp16 again
        with torch.no_grad(), torch.autocast(device, enabled=False):
            out = torch.func.functional_call(module, state, _cast(args, torch.float32),
                                             {k: _cast(v, torch.float32) for k, v in kwargs.items()})
    except Exception:  # noqa: BLE001 - the error names the module either way
        return None
    t = out if isinstance(out, torch.Tensor) else next((o for o in out if isinstance(o, torch.Tensor)), None)
    if t is None:
        return None
    peak = float(torch.linalg.vector_norm(t.float(), float("inf")))
    return peak if math.isfinite(peak) else None


# --------------------------------------------------------------------------------------------------------------
# Entry point (portvlm.patch calls it)
# --------------------------------------------------------------------------------------------------------------


def protect(model, patcher, *, calibration=None, guard: bool = True, arch: str | None = None) -> Protection:
    """Apply the fp16 policy to ``model`` (rescale + islands from a calibration scan; the guard); undone by ``patcher``."""
    layout = layout_of(model)
    prot = Protection(layout)
    if calibration is not None:
        before = scan(model, calibration, layout=layout, arch=arch)
        prot.scan, prot.alpha = before, dict(before.alpha)
        for why in before.unfixable:
            raise FP16OverflowError(f"{why}. Fix: run this model in float32")
        prot.changes += rescale(model, layout, before.alpha, patcher)
        for path, why in before.islands.items():
            island(model.get_submodule(path), why, patcher)
            prot.changes.append(Change("island", path, f"computes in fp32, hands fp16 on: {why}"))
        after = scan(model, calibration, layout=layout, arch=arch)
        prot.verified = after
        if not after.ok:
            raise FP16OverflowError(f"the fp16 policy could not fit the calibration batch: {after.overflows[0]} "
                                    "after rescaling and islands; run this model in float32", module=after.overflows[0].path,
                                    peak=after.overflows[0].peak)
    if guard:
        from portvlm.shims.layer_paths import resolve

        names = {id(m): n for n, m in model.named_modules()}
        prot.guard = Guard(model, layout, names.get(id(resolve(model).lm_head)))
        prot.guard.install(patcher)
        prot.changes.append(Change("guard", f"{len(prot.guard.paths)} blocks", "max |x| per block on device, one "
                                   "finiteness check per forward: a non-finite activation raises FP16OverflowError "
                                   "naming the first module"))
    return prot


__all__ = ["Change", "FIX", "Guard", "Protection", "island", "locate", "protect", "rescale"]
