"""layer_paths shim: decoder layers, vision tower/blocks, projector, lm_head and wrap classes, every family/version."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _tiny  # noqa: E402

from portvlm.errors import UnsupportedError  # noqa: E402
from portvlm.shims import layer_paths  # noqa: E402

EXPECTED = {
    # family: (decoder layer class, vision block class, projector class suffix)
    "qwen2_5_vl": ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "PatchMerger"),
    "qwen3_vl": ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock", "PatchMerger"),
    "llava": ("LlamaDecoderLayer", "CLIPEncoderLayer", "LlavaMultiModalProjector"),
}


@pytest.mark.parametrize("family", _tiny.FAMILIES)
def test_resolve(family):
    why = _tiny.available(family)
    if why:
        pytest.skip(why[0])
    model = _tiny.build(family)
    lp = layer_paths.resolve(model)
    layer_cls, block_cls, proj = EXPECTED[family]
    assert len(lp.text_layers) == 2 and lp.decoder_layer_class_names == (layer_cls,)
    assert lp.vision_block_class_names == (block_cls,)
    assert type(lp.projector).__name__.endswith(proj)
    assert lp.lm_head.weight.shape == (256, 64)
    assert lp.lm_head is model.get_output_embeddings()
    assert lp.text_layers[0] in list(model.modules())
    assert all(b in list(lp.vision_tower.modules()) for b in lp.vision_blocks)
    # the resolved parts are the ones the forward uses: hook the first decoder layer
    seen = []
    handle = lp.text_layers[0].register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        model(**_tiny.inputs(family))
    handle.remove()
    assert seen


def test_a_model_without_vlm_parts_is_refused_naming_what_was_tried():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    with pytest.raises(UnsupportedError, match="text decoder layers of a gpt2 model.*tried model.language_model.layers"
                       ".*unlike the families portvlm declares"):
        layer_paths.resolve(transformers.GPT2LMHeadModel(cfg))
