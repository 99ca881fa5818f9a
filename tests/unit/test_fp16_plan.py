"""portvlm.shims.fp16.scan.plan: which stream a peak belongs to, the power of two α, the fp32 islands (pure, no torch)."""

from __future__ import annotations

from portvlm.shims.fp16 import FP16_MAX, HEADROOM
from portvlm.shims.fp16.scan import Layout, plan

T, V = "model.language_model", "model.visual"
LAYOUT = Layout(
    family="qwen2_5_vl",
    towers={"vision": V, "text": T},
    blocks={"vision": (f"{V}.blocks.0",), "text": (f"{T}.layers.0",)},
    writers={"vision": (f"{V}.patch_embed.proj", f"{V}.blocks.0.attn.proj", f"{V}.blocks.0.mlp.down_proj"),
             "text": (f"{T}.embed_tokens", f"{T}.layers.0.self_attn.o_proj", f"{T}.layers.0.mlp.down_proj")},
    bridges=(f"{V}.merger.mlp.2",),
    bridge_owners=(f"{V}.merger",),
    norms={"vision": (f"{V}.blocks.0.norm1", f"{V}.blocks.0.norm2", f"{V}.merger.ln_q"),
           "text": (f"{T}.layers.0.input_layernorm", f"{T}.layers.0.post_attention_layernorm", f"{T}.norm")},
)


def figures(**peaks):
    """Every module at a small peak, those named (path with / for .) at theirs; (class, out, rms, in)."""
    base = {p: ("Linear", 3.0, 1.0, 3.0) for t in ("vision", "text") for p in (*LAYOUT.writers[t], *LAYOUT.norms[t])}
    base |= {p: ("Block", 3.0, 1.0, None) for t in ("vision", "text") for p in LAYOUT.blocks[t]}
    base |= {f"{V}.blocks.0.mlp.up_proj": ("Linear", 3.0, 1.0, 3.0), f"{V}.blocks.0.mlp": ("MLP", 3.0, 1.0, None),
             f"{V}.merger.mlp.2": ("Linear", 3.0, 1.0, 3.0), f"{V}.merger": ("Merger", 3.0, 1.0, None),
             f"{T}.layers.0.mlp": ("MLP", 3.0, 1.0, None), V: ("Tower", 3.0, 1.0, None), "lm_head": ("Linear", 9.0, 1.0, 3.0)}
    for key, (out, inp) in peaks.items():
        path = key.replace("/", ".")
        cls, _, rms, _ = base[path]
        base[path] = (cls, out, rms, inp)
    return base


def test_within_range_nothing_changes():
    report = plan(LAYOUT, figures(), 1)
    assert report.ok and not report.needs_fix and report.alpha == {"vision": 1.0, "text": 1.0}


def test_a_stream_overflow_picks_the_smallest_power_of_two_with_headroom():
    peak = 1.2e5
    report = plan(LAYOUT, figures(**{f"{T}/layers/0/mlp/down_proj": (peak, 40.0)}), 1)
    assert not report.ok and report.alpha["vision"] == 1.0
    a = report.alpha["text"]
    assert a == 2.0**-3 and peak * a <= FP16_MAX / HEADROOM < peak * a * 2  # the largest α that fits
    assert str(report.overflows[0]).startswith(f"fp16 overflow at {T}.layers.0.mlp.down_proj: |x| up to 1.2e+05")
    assert not report.islands  # the MLP container hands on the writer's output: no island for it


def test_an_overflow_inside_a_block_is_an_island_on_that_block_part():
    report = plan(LAYOUT, figures(**{f"{V}/blocks/0/mlp/up_proj": (9e4, 3.0)}), 1)
    assert list(report.islands) == [f"{V}.blocks.0.mlp"] and report.alpha["vision"] == 1.0
    assert "runs model.visual.blocks.0.mlp as an fp32 island" in report.overflows[0].fix


def test_overflowing_logits_island_the_lm_head():
    report = plan(LAYOUT, figures(**{"lm_head": (7e4, 3.0)}), 1)
    assert list(report.islands) == ["lm_head"]
