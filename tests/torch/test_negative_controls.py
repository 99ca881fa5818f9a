"""The suites have teeth: deliberately broken vision backends make parity FAIL, a stale KV accessor makes streaming FAIL.

Broken backends are the published V100 port's bugs (../shared/research/peers.md §1a): the block-diagonal mask
dropped (attention leaks across images and Qwen2.5-VL windows), a (seq, heads, dim) layout read as (heads, seq,
dim), and a wrong softmax scale. Each is registered through ``portvlm.backends.register_backend`` and forced
through ``SuiteContext.vision_backend``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from portvlm.models import tiny  # noqa: E402
from portvlm.suites import SuiteContext, run_suite  # noqa: E402

QWEN = [pytest.param(m, marks=pytest.mark.skipif(bool(tiny.is_available(m)), reason="needs a newer transformers")) for m in ("qwen2_5vl", "qwen3vl")]


def _eager(q, k, v, cu, max_seqlen, scale, causal):
    from portvlm.backends import kernels

    return kernels._eager(q, k, v, cu, max_seqlen, scale, causal)


def mask_dropped(q, k, v, cu, max_seqlen, scale, causal):
    """cu_seqlens ignored: one segment over everything (Heart-Sniper/VLM-R1_with_xformers defect 1)."""
    whole = torch.tensor([0, q.shape[0]], dtype=cu.dtype, device=cu.device)
    return _eager(q, k, v, whole, q.shape[0], scale, causal)


def layout_swapped(q, k, v, cu, max_seqlen, scale, causal):
    """[S, H, D] memory read as [H, S, D] (defect 2: a 3-D input taken as batch-major)."""
    s, h, d = q.shape

    def swap(t):
        return t.reshape(h, s, d).transpose(0, 1)

    out = _eager(swap(q), swap(k), swap(v), cu, max_seqlen, scale, causal)
    return out.transpose(0, 1).reshape(s, h, d)


def scale_wrong(q, k, v, cu, max_seqlen, scale, causal):
    """Softmax scale 1 instead of 1/sqrt(head_dim)."""
    return _eager(q, k, v, cu, max_seqlen, 1.0, causal)


BROKEN = {"broken_mask_dropped": mask_dropped, "broken_layout_swap": layout_swapped, "broken_softmax_scale": scale_wrong}


@pytest.mark.parametrize("model_id", QWEN)
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_vision_backend_fails_parity(model_id, name):
    from portvlm.backends import Backend, register_backend

    with register_backend(Backend(name=name, devices=("cpu", "cuda"), needs=("torch",), note="negative control"), BROKEN[name]):
        r = run_suite(SuiteContext(model_id, "cpu", vision_backend=name), "parity")
    assert r.status == "fail", (r.status, r.error, [(c.name, c.ok) for c in r.checks])
    failed = {c.name for c in r.checks if not c.ok}
    assert any(n.startswith("vision.packed_vs_alone") for n in failed), failed
    assert "logits.packed" in failed, failed


def test_correct_registered_backend_passes_parity():
    """The control for the controls: the same registration path with a correct kernel passes."""
    from portvlm.backends import Backend, register_backend

    if tiny.is_available("qwen2_5vl"):
        pytest.skip("qwen2_5vl unavailable")
    with register_backend(Backend(name="registered_eager", devices=("cpu", "cuda"), needs=("torch",)), _eager):
        r = run_suite(SuiteContext("qwen2_5vl", "cpu", vision_backend="registered_eager"), "parity")
    assert r.status == "pass", [(c.name, c.detail) for c in r.checks if not c.ok]


@pytest.mark.parametrize("model_id", ["qwen2_5vl", "llava"])
def test_stale_kv_accessor_fails_streaming(model_id, monkeypatch):
    """A CacheView whose keys() returns the first snapshot it ever saw (a stale accessor) must fail streaming."""
    from portvlm.shims import kv_cache

    original = kv_cache.CacheView.keys
    snapshots: dict = {}

    def stale_keys(self, i):
        key = (id(self.cache), i)
        fresh = original(self, i)
        if key not in snapshots and fresh is not None:
            snapshots[key] = fresh.clone()
        return snapshots.get(key, fresh)

    monkeypatch.setattr(kv_cache.CacheView, "keys", stale_keys)
    r = run_suite(SuiteContext(model_id, "cpu", fast=True), "streaming")
    assert r.status == "fail", (r.status, r.error)
    failed = {c.name for c in r.checks if not c.ok}
    assert failed & {"bounded.constant_after_warmup", "bounded.cache_view_consistent", "equivalence.cache_view_consistent", "bounded.stream_completes"}, failed
