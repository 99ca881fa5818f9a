"""The public single-process path the benchmarks use: ``parallelize(model, handle)`` with no mesh, and the opt-in
attention call trace (``portvlm.backends.kernels.trace``) instead of rebinding ``varlen_attention``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import portvlm  # noqa: E402
from portvlm.backends import kernels  # noqa: E402
from portvlm.distributed import pack, parallelize  # noqa: E402
from portvlm.distributed.mesh import Layout  # noqa: E402
from portvlm.models import inputs as model_inputs  # noqa: E402
from portvlm.models import tiny  # noqa: E402


def test_parallelize_without_a_mesh_is_the_model_itself_on_one_packed_row_and_the_trace_sees_every_call():
    model = tiny.build("qwen2_5vl", attn_implementation="sdpa").train()
    inp = model_inputs.build("qwen2_5vl", "image")
    with portvlm.patch(model, arch="cpu") as handle:
        with torch.no_grad():
            ref = model(**inp, labels=inp["input_ids"], use_cache=False).loss
        with parallelize(model, handle) as pmodel, kernels.trace() as calls, torch.no_grad():
            out = pmodel(**pack([inp]))
        assert pmodel.layout == Layout.single()
        assert torch.allclose(out.loss_value, ref, atol=1e-6, rtol=1e-6), (float(out.loss_value), float(ref))
        # 4 vision blocks (the image's 192 patches, cut at the 8x8-patch windows or whole) + 2 causal text layers
        vision = [c for c in calls if not c.causal]
        text = [c for c in calls if c.causal]
        assert len(vision) == 4 and len(text) == 2, calls
        assert {c.cu_seqlens[-1] for c in vision} == {192} and text[0].cu_seqlens == (0, inp["input_ids"].shape[1])
        with torch.no_grad():
            pmodel(**pack([inp]))
    assert len(calls) == 6  # closed: later calls are not recorded
