"""The wrappers users hold instead of the transformers model: PEFT, DDP / FSDP, DeepSpeed, ``torch.compile``.

``portvlm.patch``, ``portvlm.check`` and ``portvlm.distributed.parallelize`` take what a training script has in
hand — ``get_peft_model(model, cfg)``, ``DistributedDataParallel(model)``, ``torch.compile(model)``,
``accelerator.prepare(model)`` — and work on the transformers ``*ForConditionalGeneration`` inside, saying which
wrappers they looked through (``Unwrapped.chain``). A wrapper portvlm does not know is named as such, so a wrapped
model is never reported as "upstream moved the layers".

Wrappers are recognised by class name and defining package (``Wrapper`` rows), never by importing peft, deepspeed
or torch.distributed: a script that does not use them does not pay for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from portvlm.errors import UnsupportedError


@dataclass(frozen=True)
class Wrapper:
    """One wrapper class family: how to recognise it, how to reach the model inside, and what it changes."""

    label: str  # what reports say: "PEFT PeftModel"
    package: str  # the defining module's top-level package ("peft", "torch", "deepspeed")
    classes: tuple[str, ...]  # class names in the MRO that identify it
    inner: Callable  # wrapper -> the module it wraps
    how: str  # how portvlm reaches inside, for the report
    # Why portvlm.check cannot build its reference through this wrapper (parameters sharded or partitioned); empty: it can.
    check_reasons: Callable = lambda obj: []  # noqa: E731
    note: str = ""  # what a patch through this wrapper should tell the user (reported as a warning)


def _fsdp1_reasons(obj) -> list[str]:
    return ["FSDP (FullyShardedDataParallel) flattens and shards the parameters: portvlm check needs the full weights "
            "of one process — run it on the model before wrapping (or a copy loaded from a full state dict)"]


def _prompt_learning_reasons(obj) -> list[str]:
    cfg = getattr(obj, "active_peft_config", None)
    if getattr(cfg, "is_prompt_learning", False):
        return [f"the PeftModel's active adapter is {getattr(cfg, 'peft_type', 'prompt learning')} (prompt learning): its "
                "virtual tokens are added in the PeftModel's own forward, outside the transformers model portvlm "
                "checks — check the base model (model.get_base_model()) or use a LoRA-style adapter"]
    return []


def _zero3_reasons(obj) -> list[str]:
    config = getattr(obj, "zero_optimization_stage", None)
    stage = config() if callable(config) else None
    if stage == 3:
        return ["DeepSpeed ZeRO-3 partitions the parameters across ranks: portvlm check needs the full weights of one "
                "process — run it on the model before deepspeed.initialize / accelerator.prepare"]
    return []


WRAPPERS: tuple[Wrapper, ...] = (
    # peft.PeftModel (and its task subclasses) -> LoraModel/BaseTuner -> the transformers model; get_base_model()
    # returns the latter directly. LoRA layers stay inside the model (q_proj -> lora.Linear around base_layer).
    Wrapper("PEFT PeftModel", "peft", ("PeftModel", "PeftMixedModel"), lambda m: m.get_base_model(),
            "get_base_model()", _prompt_learning_reasons),
    Wrapper("PEFT tuner (LoraModel / BaseTuner)", "peft", ("BaseTuner",), lambda m: m.model, ".model"),
    Wrapper("torch.compile OptimizedModule", "torch", ("OptimizedModule",), lambda m: m._orig_mod, "._orig_mod",
            note="torch.compile: a graph compiled before the patch keeps the attention it traced; patch before the "
                 "first compiled call, or call torch._dynamo.reset() after patching"),
    Wrapper("DistributedDataParallel", "torch", ("DistributedDataParallel",), lambda m: m.module, ".module"),
    Wrapper("DataParallel", "torch", ("DataParallel",), lambda m: m.module, ".module"),
    Wrapper("FSDP (FullyShardedDataParallel)", "torch", ("FullyShardedDataParallel",), lambda m: m.module, ".module",
            _fsdp1_reasons),
    Wrapper("DeepSpeedEngine", "deepspeed", ("DeepSpeedEngine",), lambda m: m.module, ".module", _zero3_reasons),
)


def wrapper_of(obj) -> Wrapper | None:
    """The ``Wrapper`` row ``obj`` is an instance of (by class name and package, anywhere in its MRO), else None."""
    for cls in type(obj).__mro__:
        package = cls.__module__.partition(".")[0]
        for w in WRAPPERS:
            if package == w.package and cls.__name__ in w.classes:
                return w
    return None


@dataclass(frozen=True)
class Unwrapped:
    """The model found inside ``outer`` and the wrappers between them, outermost first."""

    outer: object
    model: object
    chain: tuple[Wrapper, ...] = ()

    @property
    def notes(self) -> list[str]:
        """What the wrappers looked through ask the user to know (``Wrapper.note``)."""
        return [w.note for w in self.chain if w.note]

    @property
    def labels(self) -> list[str]:
        """One line per wrapper looked through: ``"PEFT PeftModel (get_base_model())"``."""
        return [f"{w.label} ({w.how})" for w in self.chain]

    def check_reasons(self) -> list[str]:
        """Why ``portvlm.check`` cannot build its reference from what is held (empty: it can)."""
        reasons, obj = [], self.outer
        for w in self.chain:
            reasons += w.check_reasons(obj)
            obj = w.inner(obj)
        return reasons + fsdp2_reasons(self.model)


MAX_DEPTH = 8  # compile(DDP(PeftModel(LoraModel(model)))) is four; a cycle is a bug somewhere else


def unwrap(obj) -> Unwrapped:
    """Look through every known wrapper around ``obj``; ``Unwrapped.model`` is the first object that is none."""
    chain, inner = [], obj
    while (w := wrapper_of(inner)) is not None:
        if len(chain) >= MAX_DEPTH:
            raise UnsupportedError(f"{type(obj).__name__}: more than {MAX_DEPTH} nested wrappers "
                                   f"({' -> '.join(c.label for c in chain)}); pass the transformers model itself")
        chain.append(w)
        inner = w.inner(inner)
    return Unwrapped(obj, inner, tuple(chain))


def fsdp2_reasons(model) -> list[str]:
    """FSDP2 (``fully_shard``) wraps nothing: it swaps the class and shards parameters as DTensors; say so for check."""
    if any(c.__name__ == "FSDPModule" for c in type(model).__mro__):
        return ["the model is sharded with FSDP2 (fully_shard): its parameters are DTensor shards; portvlm check "
                "needs the full weights of one process — run it before fully_shard / parallelize"]
    return []


def foreign_reasons(model) -> list[str]:
    """Why ``model`` looks like an unknown wrapper rather than a transformers model (empty: it is transformers')."""
    cls = type(model)
    if any(c.__module__.startswith("transformers.") for c in cls.__mro__ if c.__name__ != "PushToHubMixin"):
        return []
    inside = [name for name, child in getattr(model, "named_children", lambda: [])()
              if hasattr(getattr(child, "config", None), "model_type")]
    hint = f" (a transformers model sits at .{inside[0]})" if inside else ""
    known = ", ".join(w.label for w in WRAPPERS)
    return [f"{cls.__module__}.{cls.__qualname__} is not a transformers model but a wrapper portvlm does not know"
            f"{hint}: pass the model inside (portvlm looks through {known})"]


def is_lora_layer(module) -> bool:
    """A PEFT tuner layer (``lora.Linear`` and kin): wraps ``base_layer`` and adds adapter weights."""
    return any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft.") for c in type(module).__mro__)


def adapters_of(model) -> dict:
    """``{adapter name: PeftConfig}`` PEFT injected into ``model`` (BaseTuner copies it onto the model), else ``{}``."""
    if not any(is_lora_layer(m) for m in model.modules()):
        return {}
    return dict(getattr(model, "peft_config", None) or {})


__all__ = ["WRAPPERS", "Unwrapped", "Wrapper", "adapters_of", "foreign_reasons", "fsdp2_reasons", "is_lora_layer",
           "unwrap", "wrapper_of"]
