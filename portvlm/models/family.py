"""The ``Family`` record: everything portvlm knows about one transformers ``model_type``, in one place.

Pure data plus small callables; nothing here imports torch or transformers (the callables import transformers
when they run), so the doctor, the drift lane and the matrix tools can read the records without a stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Input layouts portvlm builds inputs for (``portvlm.models.inputs``):
#   "patches": Qwen-VL style — flattened patch rows + ``grid_thw``, <vision_start> N×<image> <vision_end> in the
#              text, 3-axis mrope positions computed by portvlm; images and videos pack into one tower call.
#   "images":  LLaVA style — ``[N, C, S, S]`` pixel tensors, a fixed number of <image> tokens per image; the tower
#              sees one image per batch row (nothing to make block-diagonal).
LAYOUTS = ("patches", "images")

# Token ids inside the tiny vocab (all < VOCAB), shared by every tiny config so inputs are comparable.
VOCAB = 256
PAD, BOS, EOS = 0, 1, 2
IMG, VID, VSTART, VEND = 250, 251, 252, 253
LLAVA_IMG = 255

# The tiny text decoder every family shares: 4 query heads, 2 kv heads (GQA), head_dim 16, 2 layers.
TINY_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
    tie_word_embeddings=False,
)
TINY_MROPE = [2, 3, 3]  # t/h/w sections of head_dim/2 = 8


def standard_anchors(module: str, attention: str, top: str) -> dict[str, tuple[str, ...]]:
    """The anchors of a patch-layout family the shims reach the standard way: its ``top`` ForConditionalGeneration
    class (kv_cache, layer_paths) and ``module``'s vision rotary and ``attention`` class (vision_varlen)."""
    return {
        "kv_cache": (f"transformers.{top}.forward",),
        "layer_paths": (f"transformers.{top}",),
        "vision_varlen": (f"{module}.apply_rotary_pos_emb_vision", f"{module}.{attention}.forward"),
    }


@dataclass(frozen=True)
class Variant:
    """Another matrix model built from a family's tiny model (``llava_mla``: LLaVA converted to MLA by portvlm)."""

    model_id: str  # its matrix id
    convert: Callable[[Any], None]  # (tiny model) -> None, in place, after the seeded re-init
    figures: Callable[[Any, Any], dict] | None = None  # (tiny config, torch dtype) -> figures every result carries


@dataclass(frozen=True)
class Family:
    """One transformers ``model_type`` portvlm ports: how to build it tiny, read its inputs, and what it supports.

    ``model_id`` is the matrix id of its tiny model (the one bridge between matrix ids and model_types:
    ``qwen2_5vl`` ↔ ``qwen2_5_vl``); matrix.yaml's ``models:`` entry names the same pair.
    """

    model_type: str  # transformers config.model_type: "qwen2_5_vl"
    model_id: str  # matrix id of the tiny model: "qwen2_5vl"
    model_class: str | Callable[[], type]  # ForConditionalGeneration: a name in ``transformers``, or a callable
    tiny_config: Callable[[], Any]  # () -> the tiny config on the installed transformers (UnsupportedError if absent)
    geometry: Callable[[Any], Any]  # (any config of this family) -> portvlm.models.inputs.InputGeometry
    layout: str  # one of LAYOUTS: how inputs are built and the tower is called
    head_dims: tuple[int, int]  # (vision, text) head dims of the released checkpoints: the backends' head_dim limits
    sequence_parallel: bool = False  # Ulysses SP over the text decoder (portvlm.distributed); else data parallel only
    # Upstream names the shims reach through this family's modules (by string or instance; the AST scan cannot see
    # them), per shim: the drift lane reports when the newest transformers loses or re-signs one.
    anchors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    variants: tuple[Variant, ...] = ()
    description: str = ""
    # Multiplies the tolerance table's budget for comparisons of what this family's text model computes (logits,
    # losses, gradients; never vision-tower features), with the measurement that justifies it (a layer type that
    # amplifies fp32 summation noise, seen without portvlm too); 1.0 for most. Read through
    # ``portvlm.testing.tolerances.budget``, the one place every suite and ``portvlm.check`` take budgets from.
    tolerance_scale: float = 1.0
    tolerance_why: str = ""
    # Why this family's multi-step training trajectory leaves the fp32 eager reference's by more than the table even
    # without portvlm ("" for most). When set, the training suite also runs upstream's unpatched sdpa model over the
    # same steps: portvlm's trajectory must match that run within the budget, and the eager reference's within
    # twice upstream's own eager-vs-sdpa spread, measured in the same run.
    trajectory_noise: str = ""

    @property
    def model_ids(self) -> tuple[str, ...]:
        """Every matrix id built from this family: its own and its variants'."""
        return (self.model_id, *(v.model_id for v in self.variants))

    def variant(self, model_id: str) -> Variant | None:
        """The variant declared as ``model_id`` (None for the family's own id)."""
        return next((v for v in self.variants if v.model_id == model_id), None)

    def load_class(self) -> type:
        """The ForConditionalGeneration class on the installed transformers (``UnsupportedError`` if it lacks it)."""
        if callable(self.model_class):
            return self.model_class()
        import transformers

        cls = getattr(transformers, self.model_class, None)
        if cls is None:
            from portvlm.errors import UnsupportedError

            raise UnsupportedError(f"{self.model_type} needs transformers with {self.model_class} "
                                   f"({self.description or self.model_type}), found {transformers.__version__}")
        return cls
