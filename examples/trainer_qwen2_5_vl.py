"""Fine-tuning Qwen2.5-VL with the plain transformers ``Trainer`` and gradient checkpointing, portvlm patched in.

    python examples/trainer_qwen2_5_vl.py --model Qwen/Qwen2.5-VL-3B-Instruct --arch sm70 --out runs/trainer
    python examples/trainer_qwen2_5_vl.py --tiny --out /tmp/trainer [--no-patch]   # offline tiny model

Where portvlm goes (docs/integrations.md): ``portvlm.patch(model)`` after loading and before ``Trainer(...)``; the
checkpointed layers recompute in backward through the same patched attention. ``--no-patch`` runs transformers' own
attention for comparison (the test compares the two runs' losses).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _offline beside this file, whatever the cwd

ANSWERS = ("a red square", "a blue square")


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
    rows = []
    for i in range(n):
        rows.append({"image": images[i], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[i % 2]}]},
        ]})
    return rows


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Qwen2.5-VL checkpoint (hub id or directory)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Qwen2.5-VL built offline instead of --model")
    p.add_argument("--arch", default=None, help="portvlm arch policy (sm70, gfx942, ...; default: this host's)")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--no-patch", action="store_true", help="transformers' own attention (the comparison run)")
    a = p.parse_args(argv)
    if not a.tiny and not a.model:
        p.error("give --model or --tiny")
    return a


def main(argv=None) -> dict:
    """Train; returns the losses and (patched) the attention call counts."""
    import _offline
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

    import portvlm

    args = parse(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="trainer-"))
    if args.tiny:
        model_id, processor = _offline.save_tiny(out / "tiny-qwen2_5_vl"), _offline.processor()
    else:
        model_id, processor = args.model, AutoProcessor.from_pretrained(args.model)
    # fp32 weights, the arch's compute dtype through the trainer's mixed precision (fp16 on sm70: the Trainer's
    # GradScaler needs fp32 master weights; loading in fp16 makes it refuse to unscale fp16 gradients)
    dtype = getattr(torch, portvlm.resolve_policy(args.arch).dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.float32, attn_implementation="sdpa")
    patched = contextlib.nullcontext() if args.no_patch else portvlm.patch(model, arch=args.arch)
    with patched as handle:  # after loading, before Trainer(...)
        targs = TrainingArguments(
            output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=2, learning_rate=2e-3,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
            fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, seed=0, disable_tqdm=True,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            remove_unused_columns=False, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=examples(8, _offline.images(8)),
                          data_collator=Collator(processor))
        trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        summary = {"losses": losses, "calls": dict(handle.state.calls) if handle is not None else None}
    print(summary)
    if not losses or not all(math.isfinite(v) for v in losses):
        raise SystemExit(f"Trainer loss not finite: {losses}")
    return summary


if __name__ == "__main__":
    main()
