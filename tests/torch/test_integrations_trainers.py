"""The trainers people use, with the real libraries, through the examples the docs point to (so the docs cannot rot):
TRL ``GRPOTrainer`` (policy + the reference model TRL builds, both patched; generation through portvlm's attention),
TRL ``SFTTrainer`` with images and LoRA, and the transformers ``Trainer`` with gradient checkpointing.

Tiny Qwen2.5-VL, tokenizer and processor built offline (examples/_offline.py); CPU, fp32, a few steps each.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import _integrations  # noqa: E402

_integrations.need("trl")
_integrations.need("peft")
_integrations.need("PIL")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import grpo_qwen2_5_vl  # noqa: E402
import sft_qwen2_5_vl  # noqa: E402
import trainer_qwen2_5_vl  # noqa: E402

from portvlm.models import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _no_hub_kernels(monkeypatch):
    """transformers 5.25's from_pretrained kernelizes by default and raises without the `kernels` package (this
    index lacks the pinned version); USE_HUB_KERNELS=0 is the documented fix (docs/integrations.md)."""
    monkeypatch.setenv("USE_HUB_KERNELS", "0")

TEXT_LAYERS = tiny.config("qwen2_5vl").get_text_config().num_hidden_layers
VISION_BLOCKS = tiny.config("qwen2_5vl").vision_config.depth


def test_grpo_policy_and_trl_reference_model_both_patched_generation_through_portvlm(tmp_path):
    generations = []

    def hook(trainer):
        """Count the policy handle's attention calls around every ``generate`` TRL makes (no vLLM: transformers')."""
        from portvlm.shims import dispatch

        model = trainer.model
        state = dispatch.OWNERS[model]  # the policy's handle state (patched before the trainer)
        generate = model.generate

        def counted(*args, **kwargs):
            before = dict(state.calls)
            out = generate(*args, **kwargs)
            new_tokens = out.shape[1] - kwargs["input_ids"].shape[1]
            generations.append(({k: state.calls[k] - before[k] for k in before}, new_tokens))
            return out

        model.generate = counted
        hook.ref = trainer.ref_model
        hook.model, hook.before = model, {n: p.detach().clone() for n, p in model.named_parameters()}

    summary = grpo_qwen2_5_vl.main(["--tiny", "--arch", "cpu", "--out", str(tmp_path), "--steps", "2"], hook=hook)

    assert len(summary["losses"]) == 2 and all(math.isfinite(v) for v in summary["losses"])
    # GRPO's logged loss is ~0 at the start (on-policy ratio 1, zero-mean advantages, KL 0); the policy still moved
    assert any(not torch.equal(p, hook.before[n]) for n, p in hook.model.named_parameters()), "no weight moved"
    assert generations, "GRPOTrainer never called generate"
    for delta, new_tokens in generations:
        # the prompts' images through every vision block once (prefill), then one forward per new token (the prefill
        # makes the first), each through every text layer: every decode step ran portvlm's attention
        assert delta["vision"] == VISION_BLOCKS, delta
        assert new_tokens > 1 and delta["text"] == TEXT_LAYERS * new_tokens, (delta, new_tokens)
    # TRL's reference model (built in __init__ from the policy's checkpoint, named the policy's attention) got its own
    # handle, ran through it, and the policy's handle is untouched by it.
    assert set(summary["handles"]) == {"ref_model"} and "already patched" in summary["skipped"]["model"]
    assert summary["calls"]["ref_model"]["vision"] > 0 and summary["calls"]["ref_model"]["text"] > 0
    assert hook.ref.config._attn_implementation == "sdpa"  # after both reverts: what the policy had, no dead name


def test_sft_with_images_and_lora_trains_through_the_patch(tmp_path):
    summary = sft_qwen2_5_vl.main(["--tiny", "--arch", "cpu", "--out", str(tmp_path), "--steps", "3", "--lora"])
    assert summary["peft"].startswith("PeftModel")  # TRL wrapped the patched model in PEFT itself
    assert len(summary["losses"]) == 3 and all(math.isfinite(v) for v in summary["losses"])
    # gradient checkpointing: every forward runs each vision block and text layer twice (forward, recompute)
    assert summary["calls"]["vision"] == 3 * 2 * VISION_BLOCKS
    assert summary["calls"]["text"] == 3 * 2 * TEXT_LAYERS


def test_trainer_with_gradient_checkpointing_matches_transformers_own_attention(tmp_path):
    argv = ["--tiny", "--arch", "cpu", "--steps", "3"]
    patched = trainer_qwen2_5_vl.main([*argv, "--out", str(tmp_path / "patched")])
    upstream = trainer_qwen2_5_vl.main([*argv, "--out", str(tmp_path / "upstream"), "--no-patch"])
    assert upstream["calls"] is None
    assert patched["losses"][-1] < patched["losses"][0]
    torch.testing.assert_close(torch.tensor(patched["losses"]), torch.tensor(upstream["losses"]), atol=1e-5, rtol=1e-5)
    # the checkpointed recompute in backward goes through portvlm too (twice the forward's calls)
    assert patched["calls"]["vision"] == 3 * 2 * VISION_BLOCKS and patched["calls"]["text"] == 3 * 2 * TEXT_LAYERS
