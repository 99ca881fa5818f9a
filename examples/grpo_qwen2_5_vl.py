"""GRPO on Qwen2.5-VL with TRL's ``GRPOTrainer``, portvlm patching the policy and the reference model TRL builds.

    python examples/grpo_qwen2_5_vl.py --model Qwen/Qwen2.5-VL-3B-Instruct --arch sm70 --out runs/grpo
    python examples/grpo_qwen2_5_vl.py --tiny --out /tmp/grpo          # offline, a tiny random model (the test runs this)

Where portvlm goes (docs/integrations.md):
1. ``portvlm.patch(policy)`` right after loading (fp32 weights; the arch's compute dtype, fp16 on sm70, comes from
   the trainer's fp16 / bf16 mixed precision);
2. ``portvlm.patch_trainer(trainer)`` after ``GRPOTrainer(...)``: TRL loads ``trainer.ref_model`` from the policy's
   checkpoint inside ``__init__`` (beta > 0, no PEFT), so only then can it be patched — with its own handle.
Generation (``model.generate`` inside ``GRPOTrainer``, no vLLM), the policy's training forward (with gradient
checkpointing, TRL's default) and the reference's log-probs all run through portvlm's attention.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, _offline beside this file, whatever the cwd

import _common  # noqa: E402

PROMPTS = ("what colour is the square", "describe the image", "is the square red", "what is in the image")


def reward_short_answer(completions, **kwargs) -> list[float]:
    """Reward for answers of about four words (a stand-in for a task reward; any callable TRL accepts)."""
    def text(c):
        return c[-1]["content"] if isinstance(c, list) else c
    return [-abs(len(text(c).split()) - 4) / 4.0 for c in completions]


def dataset(n: int, images):
    """``n`` conversational prompts, each with one image (TRL's ``prompt`` + ``image`` columns)."""
    from datasets import Dataset

    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]}]
               for i in range(n)]
    return Dataset.from_dict({"prompt": prompts, "image": images[:n]})


def parse(argv=None):
    p = _common.parser(__doc__, steps=2)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight; > 0 makes TRL build a reference model")
    return _common.parse(p, argv)


def build(args):
    """The policy (patched), the trainer, and the ``TrainerPatch`` over the models the trainer built."""
    import _offline
    from trl import GRPOConfig, GRPOTrainer

    import portvlm

    out, policy, processor, dtype = _common.load(args, "grpo-")  # fp32 weights; dtype: the trainer's mixed precision
    images = _offline.images(8)  # synthetic red / blue squares: replace with your dataset
    policy_handle = portvlm.patch(policy, arch=args.arch)  # 1. right after loading

    config = GRPOConfig(**_common.trainer_settings(out, args.steps, dtype), per_device_train_batch_size=2,
                        num_generations=2, max_completion_length=8, beta=args.beta, learning_rate=1e-4)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_short_answer, args=config,
                          train_dataset=dataset(8, images), processing_class=processor)
    patched = portvlm.patch_trainer(trainer, arch=args.arch)  # 2. the reference model TRL built in __init__
    return policy_handle, trainer, patched


def main(argv=None, *, hook=None) -> dict:
    """Train; returns the losses and each handle's attention call counts. ``hook(trainer)`` runs before training."""
    args = parse(argv)
    policy_handle, trainer, patched = build(args)
    with policy_handle, patched:
        print(policy_handle.report)
        print(patched.report())
        if hook is not None:
            hook(trainer)
        trainer.train()
        summary = {"losses": _common.losses(trainer), "policy_calls": dict(policy_handle.state.calls),
                   "handles": {name: h.attn_name for name, h in patched.handles.items()},
                   "calls": {name: dict(h.state.calls) for name, h in patched.handles.items()},
                   "skipped": dict(patched.skipped)}
    print(summary)
    _common.require_finite(summary["losses"], "GRPO")
    return summary


if __name__ == "__main__":
    main()
