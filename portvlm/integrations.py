"""``patch_trainer``: patch the models a trainer holds, including the ones it builds itself (TRL's reference model).

    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.float16)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=proc)
    with portvlm.integrations.patch_trainer(trainer, arch="sm70") as patched:
        print(patched.report())
        trainer.train()

A trainer builds some models where the script cannot reach them first: TRL's ``GRPOTrainer`` / ``DPOTrainer`` load
``trainer.ref_model`` from the policy's checkpoint inside ``__init__`` (with the policy's ``attn_implementation``:
patched first, the policy's config names its handle's attention, see ``portvlm.shims.patch._inherited_names``).
``patch_trainer`` patches each model attribute it finds that no live patch owns — the policy too, where the script
did not patch it before — each with its own handle (two models of one class, two policies, portvlm.shims.dispatch),
looking through the wrappers ``accelerator.prepare`` may have put around them (``portvlm.wrappers``). A model already
patched is left to its handle and listed. No trainer method is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Trainer attributes that hold a VLM: the Trainer's model, TRL's frozen reference (GRPO, DPO, KTO, ...).
MODEL_ATTRS = ("model", "ref_model")


@dataclass
class TrainerPatch:
    """The handles ``patch_trainer`` created (by trainer attribute) and what it left alone, with why."""

    handles: dict = field(default_factory=dict)  # attribute -> portvlm.PatchHandle
    skipped: dict = field(default_factory=dict)  # attribute -> reason

    def revert(self) -> None:
        """Revert every handle this created, newest first (the models stay usable with transformers' own code)."""
        for name in reversed(list(self.handles)):
            self.handles.pop(name).revert()

    def report(self) -> str:
        """Each patched attribute's ``PatchHandle.report`` and each skipped one with its reason."""
        parts = [f"trainer.{name}:\n{handle.report}" for name, handle in self.handles.items()]
        parts += [f"trainer.{name}: not patched here: {why}" for name, why in self.skipped.items()]
        return "\n".join(parts)

    def __enter__(self) -> TrainerPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def patch_trainer(trainer, arch: str | None = None, **patch_kwargs) -> TrainerPatch:
    """``portvlm.patch`` every VLM ``trainer`` holds (``MODEL_ATTRS``) that no live patch owns; one handle each."""
    from portvlm.shims import dispatch
    from portvlm.shims.patch import patch
    from portvlm.wrappers import unwrap

    result = TrainerPatch()
    seen: dict[int, str] = {}
    try:
        for name in MODEL_ATTRS:
            held = getattr(trainer, name, None)
            if held is None:
                result.skipped[name] = (f"{type(trainer).__name__} has no {name}" if not hasattr(trainer, name) else
                                        f"{type(trainer).__name__}.{name} is None (TRL: beta=0, or a PEFT policy whose "
                                        "disabled adapters are the reference: the policy's patch covers it)")
                continue
            model = unwrap(held).model
            if id(model) in seen:
                result.skipped[name] = f"the same model as trainer.{seen[id(model)]}"
                continue
            seen[id(model)] = name
            owned = dispatch.owner_reasons(model.modules())
            if owned:
                result.skipped[name] = f"already patched ({owned[0]}): its own handle reverts it"
                continue
            result.handles[name] = patch(held, arch, **patch_kwargs)
    except BaseException:  # one model refused (UnsupportedError) or failed: the others are not left patched
        result.revert()
        raise
    return result


__all__ = ["MODEL_ATTRS", "TrainerPatch", "patch_trainer"]
