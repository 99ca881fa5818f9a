"""Qwen3.5's Gated DeltaNet layers on packed rows: portvlm's packed path vs each sample alone, and the leak it prevents.

The oracle is each sample run alone through upstream's own torch fallback (fp32); the packed row runs through
``portvlm.shims.linear_attention`` installed with the same per-owner dispatch ``patch`` uses. The negative control
runs upstream's fallback over the packed row without boundaries (what a user gets without portvlm, up to 5.17
silently; 5.23+ refuses cu_seqlens) and shows the second sample's outputs move.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from portvlm.shims import dispatch, linear_attention  # noqa: E402
from portvlm.shims.attention import AttentionState  # noqa: E402

if not hasattr(transformers, "Qwen3_5Config"):
    pytest.skip(f"transformers {transformers.__version__} has no Qwen3.5 (qwen3_5)", allow_module_level=True)

TOL = 1e-5  # fp32 CPU, same math per sample: only summation order differs
LENGTHS = (70, 3, 77)  # a sample longer than a 64-token chunk, one shorter than the conv window, one odd


def tiny_deltanet(seed: int = 0):
    """One Gated DeltaNet layer at tiny width (4 value heads over 2 key heads: the grouped-value path)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

    torch.manual_seed(seed)
    cfg = transformers.Qwen3_5TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, vocab_size=256, layer_types=["linear_attention", "full_attention"])
    return mq.Qwen3_5GatedDeltaNet(cfg, layer_idx=0)


class _Owner:
    """Stands in for a PatchHandle: holds the hooks ``patch`` would hold and owns one module."""

    def __init__(self, module):
        self.state = AttentionState()
        self.hooks = linear_attention.install(self.claim, _Wrap(module)) and self._hooks
        dispatch.OWNERS[module] = self.state
        self.module = module

    def claim(self, cls, attr, make):
        hook = dispatch.acquire(cls, attr, make, self)
        self.__dict__.setdefault("_hooks", []).append(hook)
        return hook

    def release(self):
        dispatch.OWNERS.pop(self.module, None)
        for hook in self._hooks:
            assert dispatch.release(hook, self) == []


class _Wrap(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


@pytest.fixture
def layer():
    return tiny_deltanet()


def _row(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, sum(LENGTHS), 64, generator=g)


def _cu():
    bounds = [0]
    for n in LENGTHS:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32)


def _alone(layer, h):
    outs, a = [], 0
    for n in LENGTHS:
        outs.append(layer(h[:, a:a + n]))
        a += n
    return torch.cat(outs, dim=1)


def test_packed_row_matches_each_sample_alone_forward_and_backward(layer):
    h = _row().requires_grad_(True)
    ref = _alone(layer, h)  # before install: upstream's torch fallback, one sample at a time
    (g_ref_h,) = torch.autograd.grad(ref.square().sum(), h)
    g_ref_w = torch.autograd.grad(_alone(layer, h).square().sum(), layer.conv1d.weight)[0]
    owner = _Owner(layer)
    try:
        out = layer(h, cu_seq_lens_q=_cu())
        (g_h,) = torch.autograd.grad(out.square().sum(), h)
        g_w = torch.autograd.grad(layer(h, cu_seq_lens_q=_cu()).square().sum(), layer.conv1d.weight)[0]
        assert owner.state.calls["linear_packed"] == 2
    finally:
        owner.release()
    assert (out - ref).abs().max().item() < TOL
    assert (g_h - g_ref_h).abs().max().item() < TOL
    assert (g_w - g_ref_w).abs().max().item() < 1e-4 * g_ref_w.abs().max().item()


def test_negative_control_the_fallback_leaks_across_samples(layer):
    """Upstream's torch fallback over the packed row (no boundaries): sample 1 is exact, the later ones are not."""
    h = _row()
    with torch.no_grad():
        ref = _alone(layer, h)
        leaked = layer(h)
    first = LENGTHS[0]
    assert (leaked[:, :first] - ref[:, :first]).abs().max().item() < TOL
    leak = (leaked[:, first:] - ref[:, first:]).abs().max().item()
    assert leak > 100 * TOL, f"the control found no leak ({leak:.2e}): it would not catch a broken packed path"
    # And with the boundaries passed as a packed row, upstream either refuses (5.23+) or mixes them silently.
    try:
        with torch.no_grad():
            mixed = layer(h, cu_seq_lens_q=_cu())
    except ValueError as exc:
        assert "packed sequences" in str(exc)
    else:
        assert (mixed - ref).abs().max().item() > 100 * TOL


def test_conv_continues_a_cached_prefix_in_the_first_sample_only():
    """With a cache, ``update_conv_state`` prepends the stream's last inputs: they belong to the first sample."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

    conv = linear_attention.torch_function(mq.causal_conv1d_fn)
    g = torch.Generator().manual_seed(2)
    taps, channels = 4, 8
    weight, bias = torch.randn(channels, taps, generator=g), torch.randn(channels, generator=g)
    prefix, x = torch.randn(1, channels, taps - 1, generator=g), torch.randn(1, channels, 12, generator=g)
    cu = torch.tensor([0, 5, 12])
    got = linear_attention.packed_causal_conv1d(torch.cat([prefix, x], -1), weight, bias, "silu", cu)
    first = conv(torch.cat([prefix, x[..., :5]], -1), weight, bias, activation="silu")
    second = conv(x[..., 5:], weight, bias, activation="silu")
    assert (got - torch.cat([first, second], -1)).abs().max().item() < TOL


def test_only_owned_modules_take_the_packed_path_and_release_restores(layer):
    from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

    before = (vars(type(layer)).get("forward"), mq.causal_conv1d_fn, mq.torch_chunk_gated_delta_rule)
    other = tiny_deltanet(seed=3)
    owner = _Owner(layer)
    try:
        assert mq.causal_conv1d_fn is not before[1]
        with torch.no_grad():
            ref = _alone(other, _row())
            unowned = other(_row())  # not owned: upstream's code over the row (leaks, as the control shows)
            assert (unowned - ref).abs().max().item() > 100 * TOL
    finally:
        owner.release()
    assert (vars(type(layer)).get("forward"), mq.causal_conv1d_fn, mq.torch_chunk_gated_delta_rule) == before


def test_reasons_name_what_a_changed_upstream_would_lack(layer):
    assert linear_attention.module_reasons(layer) == []
    assert linear_attention.module_reasons(torch.nn.Linear(2, 2))  # not a DeltaNet: reasons, no exception
