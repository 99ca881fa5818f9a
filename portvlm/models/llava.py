"""LLaVA (CLIP tower + Llama text) and its MLA variant ``llava_mla``: tiny config, input geometry, support."""

from __future__ import annotations

from portvlm.models.family import LLAVA_IMG, TINY_TEXT, Family, Variant

IMAGE_SIZE = 56  # 4×4 patches + CLS per image
PATCH = 14
# llava_mla: the tiny LLaVA converted by portvlm.mla.convert (MHA2MLA: partial RoPE + joint SVD) — the conversion is
# part of the variant. Reduced rank (full rank is 28 per KV head here), so the latent path is real.
MLA_SPEC = dict(rank=8, rope_dims=4, selection="2-norm")

LLAVA_MOD = "transformers.models.llava.modeling_llava"


def geometry(cfg):
    """The input geometry of a LLaVA config: token ids, the CLIP patch and image size, channels."""
    from portvlm.models.inputs import InputGeometry, text_ids
    from portvlm.shims import model_io

    vc = cfg.vision_config
    vocab, bos, pad = text_ids(cfg)
    return InputGeometry(cfg.model_type, "images", vocab, bos, pad, model_io.image_token_id(cfg), patch=vc.patch_size,
                         image_size=vc.image_size, channels=getattr(vc, "num_channels", 3))


def llava_config():
    """Tiny LLaVA: a 3-layer CLIP tower (56 px, patch 14: 16 patches + CLS), the shared tiny Llama decoder."""
    import transformers

    from portvlm.shims import model_io

    vision = dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32, layer_norm_eps=1e-5,
    )
    text = dict(TINY_TEXT, model_type="llama", rope_theta=10000.0)
    kwargs = dict(
        vision_config=vision,
        text_config=text,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
        # <=4.47 LLaVA takes a prompt with fewer image tokens than this for an unexpanded (legacy) one: keep it true.
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    kwargs[model_io.image_token_field(transformers.LlavaConfig)] = LLAVA_IMG
    return transformers.LlavaConfig(**kwargs)


def _to_mla(model) -> None:
    from portvlm.mla.conversion import MLASpec, convert

    convert(model, MLASpec(**MLA_SPEC))


def _mla_figures(cfg, dtype) -> dict:
    """KV bytes per token, MHA vs MLA, in ``dtype``."""
    import torch

    from portvlm.mla.conversion import Geometry as MLAGeometry
    from portvlm.mla.conversion import MLASpec, kv_figures

    size = torch.empty((), dtype=dtype).element_size()
    return {"kv_bytes_per_token": kv_figures(MLAGeometry.of(cfg), MLASpec(**MLA_SPEC), size)}


LLAVA = Family(
    model_type="llava",
    model_id="llava",
    model_class="LlavaForConditionalGeneration",
    tiny_config=llava_config,
    geometry=geometry,
    layout="images",
    head_dims=(64, 128),  # LLaVA-1.5-7B: CLIP ViT-L 1024 / 16 heads; text 128
    sequence_parallel=False,  # data parallel only
    anchors={
        "kv_cache": ("transformers.LlavaForConditionalGeneration.forward",),
        "layer_paths": ("transformers.LlavaForConditionalGeneration",),
    },
    variants=(Variant("llava_mla", convert=_to_mla, figures=_mla_figures),),
    description="LLaVA",
)
