"""Hub kernels (``kernels.kernelize``): which layers of a model run code fetched from the Hugging Face Hub.

transformers 5.25.0 made them the default of ``from_pretrained``: ``use_kernels=None`` becomes True unless
``USE_HUB_KERNELS`` disables it, and ``set_use_kernels(True)`` calls ``kernelize(model)``
(../shared/research/upstream-5.25.md §5). ``kernelize`` swaps the ``forward`` of every layer whose class carries
``kernel_layer_name`` (``@use_kernel_forward_from_hub("RMSNorm")``) for the hub layer's, as an *instance* attribute
(``module.forward = MethodType(layer.forward, module)``, huggingface/kernels ``layer/layer.py: _replace_forward``);
where no kernel matches the device it sets the class's own forward back the same way. So a layer is kernelized when
its instance ``forward`` is a function other than its class's. Without the ``kernels`` package the decorators are
no-ops and ``from_pretrained`` raises ``ValueError: Kernels are not available`` instead.

Nothing here needs the Hub or the ``kernels`` package: it reads the model. ``keep_off`` puts transformers' own
forward back on the layers an arch policy does not allow hub kernels on (sm70, ROCm: ``Arch.no_hub_kernels``),
recorded by the patch's ``Patcher`` so revert restores the hub forward.
"""

from __future__ import annotations

from dataclasses import dataclass

# The transformers env switch (integrations/hub_kernels.py: _kernels_enabled, default "YES").
ENV = "USE_HUB_KERNELS"
_FALSE = {"0", "false", "no", "off", "n", "f"}


@dataclass(frozen=True)
class KernelizedLayer:
    """One layer whose forward is not its class's: ``kernelize`` put a hub layer's there."""

    path: str  # "model.language_model.layers.0.input_layernorm"
    cls: str  # "Qwen2RMSNorm"
    layer_name: str | None  # the class's kernel_layer_name ("RMSNorm"); None: replaced without a kernels mark
    origin: str  # where the running forward comes from: "module.Qualname.forward"

    def to_dict(self) -> dict:
        return {"path": self.path, "class": self.cls, "layer_name": self.layer_name, "origin": self.origin}


def _origin(func) -> str:
    func = getattr(func, "__func__", func)
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def kernelized_layers(model) -> list[KernelizedLayer]:
    """The layers of ``model`` whose instance ``forward`` replaces their class's (hub-kernelized), in module order.

    Only layers whose class is marked for hub kernels (``kernel_layer_name``) count: other instance forwards are
    someone else's patch, which ``portvlm.patch`` reports as foreign where it claims the class.
    """
    out = []
    for path, module in model.named_modules():
        own = vars(module).get("forward")
        layer_name = getattr(type(module), "kernel_layer_name", None)
        if own is None or layer_name is None:
            continue
        if getattr(own, "__func__", own) is getattr(type(module), "forward", None):
            continue  # kernelize's fallback: the class's own forward, bound on the instance
        out.append(KernelizedLayer(path or "(model)", type(module).__name__, str(layer_name), _origin(own)))
    return out


def keep_off(model, patcher) -> list[KernelizedLayer]:
    """Put the class forward back on every kernelized layer of ``model`` (recorded by ``patcher``: revert restores).

    Also turns off the model's kernels flag for as long as the patch lives: on 5.25, ``train()``/``eval()``
    re-kernelize a model whose ``use_kernels`` is set when the mode changes (modeling_utils ``train``).
    """
    layers = kernelized_layers(model)
    modules = dict(model.named_modules())
    for layer in layers:
        module = modules[layer.path] if layer.path != "(model)" else model
        patcher.record_attr(module, "forward")
        del module.forward
    if layers and vars(model).get("_use_kernels"):
        patcher.set_attr(model, "_use_kernels", False)
    return layers


def pin_of(requires) -> str | None:
    """transformers' unconditional requirement on ``kernels`` among its Requires-Dist lines, lower bound first.

    transformers 5.25.0 made hub kernels the ``from_pretrained`` default and, with it, ``kernels`` a hard
    requirement (../shared/research/upstream-5.25.md §5); earlier releases list it only under an extra.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    for line in requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.lower() == "kernels" and (req.marker is None or "extra" not in str(req.marker)):
            parts = sorted((str(s) for s in req.specifier), key=lambda s: (not s.startswith(">"), s))
            return req.name + ",".join(parts)
    return None


@dataclass(frozen=True)
class DefaultLoad:
    """What ``from_pretrained(path)`` with default arguments does about hub kernels in one environment."""

    kernelizes: bool  # it calls kernelize (default on, and USE_HUB_KERNELS leaves it on)
    raises: str | None  # why it raises before the model exists (no usable kernels package); None: it loads
    pin: str | None  # the kernels requirement of the installed transformers ("kernels>=0.19.1,<0.20")


def default_load(pin: str | None, installed: str | None, environ) -> DefaultLoad:
    """Predict the default ``from_pretrained`` from transformers' pin, the installed kernels and the environment."""
    from packaging.requirements import Requirement

    if pin is None or not enabled(environ):
        return DefaultLoad(False, None, pin)
    if installed is not None and Requirement(pin).specifier.contains(installed, prereleases=True):
        return DefaultLoad(True, None, pin)
    found = f"kernels {installed} is installed" if installed else "kernels is not installed"
    return DefaultLoad(True, f"loads Hub kernels by default (use_kernels=None -> True) and needs {pin}; {found}", pin)


def installed_default_load(environ) -> DefaultLoad:
    """:func:`default_load` for this interpreter's transformers and kernels (package metadata; nothing imported)."""
    from importlib import metadata

    try:
        requires = metadata.requires("transformers")
    except metadata.PackageNotFoundError:
        requires = None
    try:
        installed = metadata.version("kernels")
    except metadata.PackageNotFoundError:
        installed = None
    return default_load(pin_of(requires), installed, environ)


def enabled(environ) -> bool:
    """Whether transformers' ``USE_HUB_KERNELS`` leaves hub kernels on (its default: on)."""
    return str(environ.get(ENV, "YES")).strip().lower() not in _FALSE


def requirement() -> tuple[str, str] | None:
    """The ``kernels`` versions the installed transformers accepts, ``(min, max)``; None where it declares none."""
    try:
        from transformers.utils import import_utils
    except Exception:  # noqa: BLE001 - no transformers: nothing to judge
        return None
    low, high = getattr(import_utils, "KERNELS_MIN_VERSION", None), getattr(import_utils, "KERNELS_MAX_VERSION", None)
    return (str(low), str(high)) if low and high else None


def loads_by_default() -> bool | None:
    """Whether ``from_pretrained`` kernelizes by default on the installed transformers (a feature probe).

    5.25.0 added the ``kernels_mode`` property with the default flip (``use_kernels=None`` -> True); earlier
    releases kernelize only when asked (``use_kernels=True``). None: transformers does not import.
    """
    try:
        from transformers import PreTrainedModel
    except Exception:  # noqa: BLE001
        return None
    return isinstance(getattr(PreTrainedModel, "kernels_mode", None), property)


def report(arch, running: list[KernelizedLayer], kept: list[KernelizedLayer]) -> dict:
    """What a patch report says of hub kernels: layers still on them, layers kept off, and the arch policy's word."""
    reason = getattr(arch, "no_hub_kernels", None)
    if kept:
        verdict = (f"{len(kept)} hub-kernel layer(s) kept off: the {arch.id} policy runs transformers' own forward "
                   f"there ({reason}); revert puts the hub forward back")
    elif running:
        verdict = (f"{len(running)} layer(s) run hub kernels, which the {arch.id} policy allows (portvlm's parity "
                   "checks compare whatever runs; portvlm did not vet the kernels themselves)")
    else:
        verdict = "no layer runs a hub kernel"
    return {
        "kernelized": [x.to_dict() for x in running],
        "kept_off": [x.to_dict() for x in kept],
        "allowed": reason is None,
        "policy": reason or f"the {arch.id} policy allows hub kernels",
        "verdict": verdict,
    }
