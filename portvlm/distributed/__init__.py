"""Training a patched VLM on N ranks: FSDP2 data parallel and Ulysses sequence parallel over a ``(dp, sp)`` mesh.

    pmodel = portvlm.distributed.parallelize(model, handle, portvlm.distributed.make_mesh(dp, sp, "cuda"))

See ``portvlm.distributed.parallel`` for the whole recipe. Importing this package imports nothing heavy.
"""

from __future__ import annotations

_LAZY = {
    "parallelize": "portvlm.distributed.parallel",
    "ParallelModel": "portvlm.distributed.parallel",
    "StepOutput": "portvlm.distributed.parallel",
    "pack": "portvlm.distributed.parallel",
    "enable_activation_checkpointing": "portvlm.distributed.parallel",
    "make_mesh": "portvlm.distributed.mesh",
    "init_ranks": "portvlm.distributed.launch",
    "Topology": "portvlm.distributed.launch",
    "mixed_precision_for": "portvlm.distributed.parallel",
    "split_sizes": "portvlm.distributed.ulysses",
    "split_bounds": "portvlm.distributed.ulysses",
    "head_reasons": "portvlm.distributed.ulysses",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'portvlm.distributed' has no attribute {name!r}")
