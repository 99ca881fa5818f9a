"""portvlm.distributed in fp16 (issue 22): no reduction in the model dtype, mixed precision by default, and a
GradScaler whose skip reaches every rank (CPU, gloo).

    PY=$(python -m portvlm.run.env --transformers 5.24.0 --torch 2.13.0+cpu --python 3.11 | tail -1)
    $PY -m pytest tests/torch/test_distributed_fp16.py -q -p no:cacheprovider
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _stacks import newest_only  # noqa: E402

from portvlm.distributed import vision  # noqa: E402
from portvlm.models import tiny  # noqa: E402
from portvlm.suites import distributed_checks as check  # noqa: E402

FP16_MAX = 65504.0
DEADLINE_S = 300


class _Tower(torch.nn.Module):
    """A vision tower whose merged features are all ``value`` (fp16): finite, but their sum is not."""

    spatial_merge_size = 2

    def __init__(self, value: float, width: int = 64):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((width,), value, dtype=torch.float16))

    def forward(self, pixels, grid_thw):
        rows = pixels.shape[0] // self.spatial_merge_size**2
        return self.weight.expand(rows, -1) * torch.ones(rows, 1, dtype=torch.float16)


def _row(grids):
    grid = torch.tensor(grids)
    patches = int(grid.prod(-1).sum())
    return {"input_ids": torch.zeros(1, 8, dtype=torch.long), "image_grid_thw": grid,
            "pixel_values": torch.ones(patches, 12, dtype=torch.float16)}


def test_the_vision_anchor_is_an_exact_zero_where_the_fp16_feature_sum_overflows():
    tower = _Tower(2000.0)
    row = _row([[1, 4, 4], [1, 4, 8]])  # 4 + 8 merged rows of 64 features of 2000: sum 1.5e6 > 65504
    feats = vision.distributed_features(tower, row, 0, 1, None)
    gathered = feats["image"]
    assert gathered.dtype == torch.float16 and bool(torch.isfinite(gathered).all())
    assert not torch.isfinite(gathered.sum()), "the features must overflow an fp16 sum, or this test shows nothing"
    assert float(gathered.detach().float().sum()) > FP16_MAX
    anchor = feats["anchor"]
    assert torch.isfinite(anchor) and float(anchor.detach()) == 0.0, anchor  # the old 0.0 * gathered.sum() is NaN here
    anchor.backward()
    assert tower.weight.grad is not None and bool((tower.weight.grad == 0).all())  # connected, gradient zero


def test_an_element_that_overflowed_still_shows():
    x = torch.tensor([1.0, float("inf")], dtype=torch.float16)
    assert torch.isnan(vision.zero_anchor(x))  # a real overflow in the tower is not hidden


def test_fp16_policies_get_fsdp_mixed_precision_by_default():
    from portvlm.distributed.parallel import mixed_precision_for

    mp = mixed_precision_for(torch.float16)
    assert mp.param_dtype == torch.float16 and mp.reduce_dtype == torch.float32
    assert mixed_precision_for(torch.bfloat16) is None and mixed_precision_for(torch.float32) is None


@newest_only("the scaler's skip on every rank is portvlm's and torch's logic (the sm70 patches are tested per stack)")
def test_an_inf_in_one_ranks_gradients_makes_every_rank_skip_and_halve_its_scale():
    meshes = {(2, 1): check.rows_for("qwen2_5vl", "dp"), (1, 2): check.rows_for("qwen2_5vl", "sp")}
    got = check.run_scaler("qwen2_5vl", "sm70", meshes=meshes, plant_rank=1, timeout_s=DEADLINE_S)
    for mesh, records in got.items():  # DP=2 on different rows, SP=2 on one row cut through a sample and an image
        assert len(records) == 2, mesh
        for rank, r in enumerate(records):
            assert r["sharded_dtypes"] == ["torch.float32"], (mesh, r)  # fp32 master weights under the fp16 policy
            assert r["compute_dtype"] == ["torch.float16"], (mesh, r)
            first, second = r["steps"]
            assert first["planted"] == (rank == 1)
            assert first["loss_finite"] and first["skipped"], (mesh, rank, r)  # rank 0's own gradients were finite
            assert first["scale_after"] == first["scale_before"] / 2, (mesh, rank, r)
            # the next step, with no inf, updates every rank and keeps the scale: the scaler does not just skip
            assert second["loss_finite"] and not second["skipped"], (mesh, rank, r)
            assert second["scale_after"] == first["scale_after"], (mesh, rank, r)


def _fp16_model():
    model = tiny.build("qwen2_5vl", attn_implementation="eager").train().to(torch.float16)
    from portvlm.suites import training

    return model, {k: (v.to(torch.float16) if v.is_floating_point() else v)
                   for k, v in training.batch("qwen2_5vl", torch.float32).items()}


def test_the_training_scaler_names_the_module_whose_forward_overflowed():
    from portvlm.suites import training

    model, inp = _fp16_model()
    from portvlm.shims.layer_paths import resolve

    down = resolve(model).text_layers[0].mlp.down_proj
    path = next(n for n, m in model.named_modules() if m is down)  # model.language_model.… from 4.52, model.… before
    with torch.no_grad():
        down.weight.mul_(1e5)  # the text down_proj drives the residual stream past 65504 (transformers #14126 style)
    scaler = training.LossScaler(model, lr=1e-3)
    loss = training.loss_of(model, inp)
    assert not scaler.step(loss, locate=lambda: training.first_nonfinite_module(model, inp))
    assert scaler.scale == 2.0**11
    assert scaler.summary() == f"1 of 1 steps skipped: fp16 overflow in {path} forward (step 0)", scaler.summary()


def test_the_training_scaler_says_when_only_the_gradients_overflowed():
    from portvlm.suites import training

    model, inp = _fp16_model()
    scaler = training.LossScaler(model, lr=1e-3, init_scale=2.0**40)  # finite loss, scaled gradients past fp16
    loss = training.loss_of(model, inp)
    assert torch.isfinite(loss)
    assert not scaler.step(loss)
    summary = scaler.summary()
    assert summary.startswith("1 of 1 steps skipped: fp16 overflow in gradients (scale 1.09951e+12; "), summary
