"""What the three trainer examples share: their command line, loading the model the way portvlm wants it for a
trainer, the image conversations, the trainer settings they have in common, and the finite-loss check.

Loading: fp32 weights, ``attn_implementation="sdpa"``; the arch's compute dtype (fp16 on sm70) comes from the
trainer's fp16 / bf16 mixed precision (``trainer_settings``): the Trainer's GradScaler needs fp32 master weights, and
a model loaded in fp16 makes it refuse to unscale fp16 gradients.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

ANSWERS = ("a red square", "a blue square")
QUESTION = "what is in the image"


def parser(doc: str, steps: int) -> argparse.ArgumentParser:
    """The examples' common options: --model / --tiny, --arch, --out, --steps (default ``steps``)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", help="a Qwen2.5-VL checkpoint (hub id or directory)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Qwen2.5-VL built offline instead of --model")
    p.add_argument("--arch", default=None, help="portvlm arch policy (sm70, gfx942, ...; default: this host's)")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--steps", type=int, default=steps)
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``p``'s arguments; --model or --tiny is required."""
    a = p.parse_args(argv)
    if not a.tiny and not a.model:
        p.error("give --model or --tiny")
    return a


def load(args, prefix: str):
    """``(out_dir, model, processor, compute dtype)``: the model in fp32 with sdpa attention (tiny and offline with
    ``--tiny``), not yet patched; the dtype is the arch's policy's, for the trainer's mixed precision."""
    import _offline
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import portvlm

    out = Path(args.out or tempfile.mkdtemp(prefix=prefix))
    if args.tiny:
        model_id, processor = _offline.save_tiny(out / "tiny-qwen2_5_vl"), _offline.processor()
    else:
        model_id, processor = args.model, AutoProcessor.from_pretrained(args.model)
    dtype = getattr(torch, portvlm.resolve_policy(args.arch).dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.float32, attn_implementation="sdpa")
    return out, model, processor, dtype


def conversation(i: int) -> list[dict]:
    """The ``i``-th image conversation: a question about the image, the square's colour as the answer."""
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[i % 2]}]},
    ]


def trainer_settings(out, steps: int, dtype) -> dict:
    """The ``TrainingArguments`` (and TRL config) fields the examples share: mixed precision in ``dtype``, no saving,
    no reporting, the CPU where there is no GPU."""
    import torch

    return dict(output_dir=str(out), max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=not torch.cuda.is_available(), fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16,
                seed=0, disable_tqdm=True, dataloader_num_workers=0)


def losses(trainer) -> list[float]:
    """The training losses the trainer logged."""
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def require_finite(values: list[float], what: str) -> None:
    """``SystemExit`` naming ``what`` when there is no loss or one is not finite (never a figure)."""
    if not values or not all(math.isfinite(v) for v in values):
        raise SystemExit(f"{what} loss not finite: {values}")
