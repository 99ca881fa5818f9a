"""The model families portvlm ports: one ``Family`` record per transformers ``model_type``, and a registry.

    from portvlm import models
    fam = models.by_type(model.config.model_type)      # or models.by_id("qwen2_5vl"), a matrix model id
    fam.head_dims, fam.sequence_parallel, fam.layout
    tiny = models.tiny.build("qwen2_5vl")              # a seeded tiny random-init model (portvlm.models.tiny)
    kw = models.inputs.build(fam.geometry(model.config), "packed")   # inputs for any config of the family

Everything family-specific lives here: the ForConditionalGeneration class, the tiny config, how to read a config's
input geometry (token ids, patch / merge / window), the released checkpoints' head dims, sequence-parallel support,
the pre-4.53 text shim that serves it, the upstream names the drift lane watches, and variants (``llava_mla``). The layers below (``shims``: ``patch``,
``layer_paths``, ``model_io``) know no family: they probe the model, and ``patch`` gates on the matrix's
``models:`` entry; a family that must run on transformers <4.53 also needs its pre-4.53 text shim's ``families=``
in ``shims/patch.py`` (no family added since needs it: the registry-era transformers cover them).
``shims``, ``distributed``, ``doctor``, ``drift``, ``check`` and the suites ask the registry; none keeps a list.

How to add a family (the files to touch: a module here, this file's ``DECLARED``, and matrix.yaml)
-----------------------------------------------------------------------------------------------------
1. Write ``portvlm/models/<name>.py`` with a ``Family(...)`` record (see ``family.py`` for every field; ``qwen.py``
   and ``llava.py`` are worked examples):
   - ``model_type`` (transformers' ``config.model_type``) and ``model_id`` (the matrix id of its tiny model);
   - ``model_class``: the ``*ForConditionalGeneration`` name in ``transformers`` (or a callable returning it);
   - ``tiny_config``: a function building a tiny config on the installed transformers — the shared decoder
     ``family.TINY_TEXT`` and token ids (``IMG``, ``VSTART``…) keep inputs comparable across families; raise
     ``UnsupportedError`` (``tiny.unsupported(model_id)``) when the installed transformers lacks the family;
   - ``geometry``: a reader from ANY config of the family (a user's real one too, for ``portvlm.check``) to an
     ``inputs.InputGeometry``; ``layout``: ``"patches"`` (Qwen-VL style: patch rows + ``grid_thw``, packed into
     one tower call) or ``"images"`` (LLaVA style: one image per batch row);
   - ``head_dims`` of the released checkpoint, ``sequence_parallel``, ``anchors`` (per shim: the upstream names
     its modules are reached by, which the drift lane watches).
   Config-field renames across transformers versions go through ``portvlm.shims.model_io`` (its accessors say
   which upstream change they answer), never a ``getattr`` chain in the family module.
2. Add the record to ``DECLARED`` below.
3. Add a ``models:`` entry to ``portvlm/data/matrix.yaml`` (``id`` = ``model_id``, ``family`` = ``model_type``,
   ``min_transformers``, ``description``) and expectations for the stacks that lack it; regenerate the goldens
   (``tests/unit/test_matrix.py`` names the flag). The cells, the CI matrix and the support table follow.
``tests/torch/test_models.py`` declares a family at run time through ``register`` and checks that ``patch``,
``check`` and the tiny-model suites take it with nothing else edited: keep it passing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from portvlm.errors import UnsupportedError
from portvlm.models.family import LAYOUTS, Family, Variant
from portvlm.models.glm import GLM4V_FAMILY, GLM4V_MOE_FAMILY, GLM_OCR_FAMILY
from portvlm.models.llava import LLAVA
from portvlm.models.qwen import QWEN2_5_VL, QWEN3_VL
from portvlm.models.qwen3_5 import QWEN3_5, QWEN3_5_MOE
from portvlm.models.qwen_siblings import QWEN2_VL, QWEN3_VL_MOE

DECLARED: tuple[Family, ...] = (QWEN2_5_VL, QWEN3_VL, LLAVA, QWEN3_5, QWEN3_5_MOE, GLM4V_FAMILY, GLM4V_MOE_FAMILY,
                                GLM_OCR_FAMILY, QWEN3_VL_MOE, QWEN2_VL)

_REGISTRY: dict[str, Family] = {f.model_type: f for f in DECLARED}


def families() -> tuple[Family, ...]:
    """Every registered family, declared ones first."""
    return tuple(_REGISTRY.values())


def model_types() -> tuple[str, ...]:
    """The registered transformers ``model_type``s."""
    return tuple(_REGISTRY)


def by_type(model_type: str | None) -> Family:
    """The family of a transformers ``model_type``; ``UnsupportedError`` naming the known ones otherwise."""
    family = _REGISTRY.get(model_type)  # type: ignore[arg-type]
    if family is None:
        raise UnsupportedError(f"model_type {model_type!r} is not a supported family; portvlm handles "
                               f"{', '.join(_REGISTRY)} (portvlm/models/ says how to add one)")
    return family


def by_id(model_id: str) -> Family:
    """The family a matrix model id (``qwen2_5vl``, ``llava_mla``) is built from; ``KeyError`` naming the known ids."""
    for family in _REGISTRY.values():
        if model_id in family.model_ids:
            return family
    known = ", ".join(i for f in _REGISTRY.values() for i in f.model_ids)
    raise KeyError(f"unknown tiny model {model_id!r}; known: {known}")


def sequence_parallel_types() -> tuple[str, ...]:
    """The model_types whose text decoder runs Ulysses sequence parallel (``portvlm.distributed``); others: DP only."""
    return tuple(t for t, f in _REGISTRY.items() if f.sequence_parallel)


def model_ids() -> tuple[str, ...]:
    """Every matrix model id the registry can build, variants included."""
    return tuple(i for f in _REGISTRY.values() for i in f.model_ids)


@contextlib.contextmanager
def register(family: Family) -> Iterator[Family]:
    """Register ``family`` for the ``with`` block (tests, a user's own family); the registry is restored after."""
    if family.model_type in _REGISTRY:
        raise ValueError(f"model_type {family.model_type!r} is already registered")
    clash = set(family.model_ids) & set(model_ids())
    if clash:
        raise ValueError(f"model id(s) {', '.join(sorted(clash))} already belong to another family")
    if family.layout not in LAYOUTS:
        raise ValueError(f"layout {family.layout!r}; one of {', '.join(LAYOUTS)}")
    _REGISTRY[family.model_type] = family
    try:
        yield family
    finally:
        _REGISTRY.pop(family.model_type, None)


def __getattr__(name: str):
    # ``models.tiny`` / ``models.inputs`` import torch: loaded on first use, never by ``import portvlm.models``.
    if name in ("tiny", "inputs"):
        import importlib

        return importlib.import_module(f"portvlm.models.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DECLARED", "LAYOUTS", "Family", "Variant", "by_id", "by_type", "families", "model_ids", "model_types",
           "register", "sequence_parallel_types"]
