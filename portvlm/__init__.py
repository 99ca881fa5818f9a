"""portvlm: port vision-language models across GPU archs and transformers versions, correctly and visibly.

Importing portvlm does nothing else: no torch import, no CUDA initialisation, no patching.

    import portvlm
    with portvlm.patch(model, arch="sm70") as handle:
        out = model(**inputs)
    print(handle.report)

    with portvlm.patch_trainer(trainer, arch="sm70"):   # every model a (TRL) trainer holds, its reference included
        trainer.train()

    report = portvlm.check(model)          # any model as it is (your own port included) vs portvlm's fp32 reference
    assert report.ok, report
"""

from __future__ import annotations

from portvlm.errors import FP16OverflowError, MatrixError, PortvlmError, UnsupportedError

__version__ = "0.1.0"
__all__ = ["patch", "PatchHandle", "patch_trainer", "check", "CheckReport", "resolve_policy", "Policy", "UnsupportedError", "FP16OverflowError", "PortvlmError", "MatrixError", "__version__"]


def __getattr__(name: str):
    # Lazy: `portvlm.patch` pulls in torch/transformers only when used.
    if name in ("patch", "PatchHandle"):
        from portvlm.shims import patch as _patch

        return getattr(_patch, name)
    if name == "patch_trainer":
        from portvlm.integrations import patch_trainer

        return patch_trainer
    if name in ("check", "CheckReport"):
        from portvlm import checker as _check

        return getattr(_check, name)
    if name in ("resolve_policy", "Policy"):
        from portvlm import policy as _policy

        return getattr(_policy, name)
    raise AttributeError(f"module 'portvlm' has no attribute {name!r}")
