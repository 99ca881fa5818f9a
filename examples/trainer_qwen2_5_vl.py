"""Fine-tuning Qwen2.5-VL with the plain transformers ``Trainer`` and gradient checkpointing, portvlm patched in.

    python examples/trainer_qwen2_5_vl.py --model Qwen/Qwen2.5-VL-3B-Instruct --arch sm70 --out runs/trainer
    python examples/trainer_qwen2_5_vl.py --tiny --out /tmp/trainer [--no-patch]   # offline tiny model

Where portvlm goes (docs/integrations.md): ``portvlm.patch(model)`` after loading and before ``Trainer(...)``; the
checkpointed layers recompute in backward through the same patched attention. ``--no-patch`` runs transformers' own
attention for comparison (the test compares the two runs' losses).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, _offline beside this file, whatever the cwd

import _common  # noqa: E402


class Collator:
    """Chat-format each example, run the processor on the batch, and mask padding out of the labels."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples: list[dict]) -> dict:
        texts = [self.processor.apply_chat_template(e["messages"], tokenize=False) for e in examples]
        batch = self.processor(text=texts, images=[e["image"] for e in examples], padding=True, return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return dict(batch)


def examples(n: int, images) -> list[dict]:
    """``n`` image conversations, each with its image."""
    return [{"image": images[i], "messages": _common.conversation(i)} for i in range(n)]


def parse(argv=None):
    p = _common.parser(__doc__, steps=4)
    p.add_argument("--no-patch", action="store_true", help="transformers' own attention (the comparison run)")
    return _common.parse(p, argv)


def main(argv=None) -> dict:
    """Train; returns the losses and (patched) the attention call counts."""
    import _offline
    from transformers import Trainer, TrainingArguments

    import portvlm

    args = parse(argv)
    out, model, processor, dtype = _common.load(args, "trainer-")  # fp32 weights; dtype: the trainer's mixed precision
    patched = contextlib.nullcontext() if args.no_patch else portvlm.patch(model, arch=args.arch)
    with patched as handle:  # after loading, before Trainer(...)
        targs = TrainingArguments(
            **_common.trainer_settings(out, args.steps, dtype), per_device_train_batch_size=2, learning_rate=2e-3,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=examples(8, _offline.images(8)),
                          data_collator=Collator(processor))
        trainer.train()
        summary = {"losses": _common.losses(trainer), "calls": dict(handle.state.calls) if handle is not None else None}
    print(summary)
    _common.require_finite(summary["losses"], "Trainer")
    return summary


if __name__ == "__main__":
    main()
