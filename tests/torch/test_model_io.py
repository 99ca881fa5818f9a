"""``portvlm.shims.model_io``: the per-version accessors read each shape they answer, and refuse what they cannot."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from portvlm.models import tiny  # noqa: E402
from portvlm.shims import model_io  # noqa: E402


def test_tower_outputs_reads_every_return_shape_and_refuses_an_unknown_one():
    merged, deep = torch.ones(4, 8), [torch.zeros(4, 8)]
    assert model_io.tower_outputs(merged) == (merged, [])  # Qwen2.5-VL <5.0: the tensor
    assert model_io.tower_outputs((merged, deep)) == (merged, deep)  # Qwen3-VL 4.57: (merged, deepstack list)
    out = types.SimpleNamespace(pooler_output=merged, deepstack_features=deep)  # 5.x
    assert model_io.tower_outputs(out) == (merged, deep)
    with pytest.raises(TypeError, match="without pooler_output.*model_io.tower_outputs"):
        model_io.tower_outputs(types.SimpleNamespace(last_hidden_state=merged))


def test_config_accessors_read_either_name():
    assert model_io.image_token_id(types.SimpleNamespace(image_token_index=7)) == 7
    assert model_io.image_token_id(types.SimpleNamespace(image_token_index=None, image_token_id=9)) == 9
    assert model_io.vision_channels(types.SimpleNamespace(in_chans=1)) == 1
    assert model_io.vision_channels(types.SimpleNamespace(in_channels=4, in_chans=1)) == 4
    assert model_io.vision_channels(types.SimpleNamespace()) == 3


def test_merge_vision_embeds_places_features_and_refuses_a_count_mismatch():
    cfg = types.SimpleNamespace(image_token_id=5, video_token_id=6)
    ids = torch.tensor([[1, 5, 5, 2, 6]])
    embeds = torch.zeros(1, 5, 3)
    feats = {"image": torch.ones(2, 3), "video": torch.full((1, 3), 2.0)}
    out, masks = model_io.merge_vision_embeds(embeds, ids, cfg, feats)
    assert out[0, :, 0].tolist() == [0.0, 1.0, 1.0, 0.0, 2.0]
    assert masks["image"].tolist() == [[False, True, True, False, False]]
    with pytest.raises(ValueError, match="2 image tokens but its image grids give 3"):
        model_io.merge_vision_embeds(embeds, ids, cfg, {**feats, "image": torch.ones(3, 3)})


def test_reset_rope_state_clears_the_cached_deltas_wherever_the_version_keeps_them():
    model = tiny.build("qwen2_5vl")
    holders = [m for m in (model, getattr(model, "model", None)) if m is not None and hasattr(m, "rope_deltas")]
    assert holders  # 4.49-4.51: on the ForConditionalGeneration; 4.52+: on the inner *Model
    for h in holders:
        h.rope_deltas = torch.ones(1, 1)
    model_io.reset_rope_state(model)
    assert all(h.rope_deltas is None for h in holders)
    model_io.reset_rope_state(torch.nn.Linear(1, 1))  # nothing to reset: a no-op
