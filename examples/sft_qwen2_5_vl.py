"""Supervised fine-tuning of Qwen2.5-VL on image conversations with TRL's ``SFTTrainer``, portvlm patched in.

    python examples/sft_qwen2_5_vl.py --model Qwen/Qwen2.5-VL-3B-Instruct --arch sm70 --out runs/sft
    python examples/sft_qwen2_5_vl.py --tiny --out /tmp/sft --lora      # offline, a tiny random model, LoRA adapters

Where portvlm goes (docs/integrations.md): ``portvlm.patch(model)`` right after loading, before the trainer. With
``--lora``, TRL wraps the patched model in PEFT itself (``peft_config=``): LoRA layers go inside the patched modules
and the patch keeps working (patch then PEFT; ``portvlm.patch(peft_model)`` after ``get_peft_model`` works too).
SFTTrainer has no reference model: ``portvlm.patch_trainer`` would find only the policy, already patched.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, _offline beside this file, whatever the cwd

import _common  # noqa: E402


def dataset(n: int, images):
    """``n`` image conversations (TRL's ``messages`` + ``images`` columns); the answer names the square's colour."""
    from datasets import Dataset

    return Dataset.from_dict({"messages": [_common.conversation(i) for i in range(n)],
                              "images": [[img] for img in images[:n]]})


def parse(argv=None):
    p = _common.parser(__doc__, steps=4)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (TRL applies peft_config)")
    return _common.parse(p, argv)


def main(argv=None) -> dict:
    """Train; returns the losses and the patch's attention call counts."""
    import _offline
    from trl import SFTConfig, SFTTrainer

    import portvlm

    args = parse(argv)
    out, model, processor, dtype = _common.load(args, "sft-")  # fp32 weights; dtype: the trainer's mixed precision
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "qkv"], task_type="CAUSAL_LM")
    with portvlm.patch(model, arch=args.arch) as handle:  # right after loading, before the trainer
        print(handle.report)
        config = SFTConfig(**_common.trainer_settings(out, args.steps, dtype), per_device_train_batch_size=2,
                           learning_rate=2e-3, max_length=None, gradient_checkpointing=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset(8, _offline.images(8)),
                             processing_class=processor, peft_config=peft_config)
        trainer.train()
        summary = {"losses": _common.losses(trainer), "calls": dict(handle.state.calls),
                   "peft": type(trainer.model).__name__}
    print(summary)
    _common.require_finite(summary["losses"], "SFT")
    return summary


if __name__ == "__main__":
    main()
