"""portvlm: port vision-language models across GPU archs and transformers versions, correctly and visibly.

Importing portvlm does nothing else: no torch import, no CUDA initialisation, no patching.

    import portvlm
    with portvlm.patch(model, arch="sm70") as handle:
        out = model(**inputs)
    print(handle.report)
"""

from __future__ import annotations

from portvlm.errors import MatrixError, PortvlmError, UnsupportedError

__version__ = "0.1.0"
__all__ = ["patch", "PatchHandle", "UnsupportedError", "PortvlmError", "MatrixError", "__version__"]


def __getattr__(name: str):
    # Lazy: `portvlm.patch` pulls in torch/transformers only when used.
    if name in ("patch", "PatchHandle"):
        from portvlm.shims import patch as _patch

        return getattr(_patch, name)
    raise AttributeError(f"module 'portvlm' has no attribute {name!r}")
