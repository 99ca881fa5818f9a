"""Supervised fine-tuning of Qwen2.5-VL on image conversations with TRL's ``SFTTrainer``, portvlm patched in.

    python examples/sft_qwen2_5_vl.py --model Qwen/Qwen2.5-VL-3B-Instruct --arch sm70 --out runs/sft
    python examples/sft_qwen2_5_vl.py --tiny --out /tmp/sft --lora      # offline, a tiny random model, LoRA adapters

Where portvlm goes (docs/integrations.md): ``portvlm.patch(model)`` right after loading, before the trainer. With
``--lora``, TRL wraps the patched model in PEFT itself (``peft_config=``): LoRA layers go inside the patched modules
and the patch keeps working (patch then PEFT; ``portvlm.patch(peft_model)`` after ``get_peft_model`` works too).
SFTTrainer has no reference model: ``portvlm.patch_trainer`` would find only the policy, already patched.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _offline beside this file, whatever the cwd

ANSWERS = ("a red square", "a blue square")


def dataset(n: int, images):
    """``n`` image conversations (TRL's ``messages`` + ``images`` columns); the answer names the square's colour."""
    from datasets import Dataset

    rows = []
    for i in range(n):
        rows.append([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[i % 2]}]},
        ])
    return Dataset.from_dict({"messages": rows, "images": [[img] for img in images[:n]]})


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Qwen2.5-VL checkpoint (hub id or directory)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Qwen2.5-VL built offline instead of --model")
    p.add_argument("--arch", default=None, help="portvlm arch policy (sm70, gfx942, ...; default: this host's)")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (TRL applies peft_config)")
    a = p.parse_args(argv)
    if not a.tiny and not a.model:
        p.error("give --model or --tiny")
    return a


def main(argv=None) -> dict:
    """Train; returns the losses and the patch's attention call counts."""
    import _offline
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    import portvlm

    args = parse(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="sft-"))
    if args.tiny:
        model_id, processor = _offline.save_tiny(out / "tiny-qwen2_5_vl"), _offline.processor()
    else:
        model_id, processor = args.model, AutoProcessor.from_pretrained(args.model)
    # fp32 weights, the arch's compute dtype through the trainer's mixed precision (fp16 on sm70: the Trainer's
    # GradScaler needs fp32 master weights; loading in fp16 makes it refuse to unscale fp16 gradients)
    dtype = getattr(torch, portvlm.resolve_policy(args.arch).dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.float32, attn_implementation="sdpa")
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "qkv"], task_type="CAUSAL_LM")
    with portvlm.patch(model, arch=args.arch) as handle:  # right after loading, before the trainer
        print(handle.report)
        config = SFTConfig(
            output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=2, learning_rate=2e-3,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
            fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, seed=0, disable_tqdm=True, max_length=None,
            gradient_checkpointing=True, dataloader_num_workers=0,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset(8, _offline.images(8)),
                             processing_class=processor, peft_config=peft_config)
        trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        summary = {"losses": losses, "calls": dict(handle.state.calls), "peft": type(trainer.model).__name__}
    print(summary)
    if not losses or not all(math.isfinite(v) for v in losses):
        raise SystemExit(f"SFT loss not finite: {losses}")
    return summary


if __name__ == "__main__":
    main()
