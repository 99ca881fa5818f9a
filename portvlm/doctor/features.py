"""portvlm.backends' selection answered from the record (pure): the feature probes judged on EnvInfo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from portvlm.backends import TORCH_FEATURES, torch_feature_reason
from portvlm.doctor import facts
from portvlm.doctor.checks import sm_name, torch_usable, xformers_op_reasons
from portvlm.doctor.collect import EnvInfo
from portvlm.doctor.report import BackendChoice
from portvlm.platform import Platform, kernel_image_reasons
from portvlm.shims.versions import parse, parse_or_none


def feature_probe(info: EnvInfo) -> Callable[[str, Platform, str, int], str | None]:
    """Answer portvlm.backends' feature probes from the record instead of importing torch (keeps this pure)."""
    t, real = info.torch, info.platform

    def probe(need: str, platform: Platform, dtype: str, head_dim: int) -> str | None:
        if not torch_usable(info):
            return f"needs torch, found none ({t.error or 'not installed'})"
        if need == "torch":
            return None
        if need in TORCH_FEATURES:  # the same declaration the live probe reads, judged on the record
            return torch_feature_reason(need, t.features.get(TORCH_FEATURES[need].record), t.version)
        if need == "triton":
            return None if t.triton else "needs triton (flex_attention compiles Triton kernels), found none"
        if need == "device_kernels":
            if not real.is_gpu:
                return f"needs a CUDA/ROCm device to run kernels on, found none (torch {t.version})"
            if not (t.cuda or t.hip):
                return f"needs a CUDA/ROCm torch build, found torch {t.version}"
            if t.cuda_available is False:
                return "needs torch.cuda.is_available(), which is False"
            why = kernel_image_reasons(t.arch_list, real.capability if real.vendor == "nvidia" else None,
                                       real.gfx if real.vendor == "amd" else None)
            return f"needs device kernels: {why[0]}" if why else None
        if need == "xformers_op":
            x = info.xformers
            if x.version is None:
                return "needs xformers, not installed"
            if x.error or x.extension_loaded is False:
                return f"needs a loadable xformers: {x.extension_error or x.error}"
            if not real.is_gpu:
                return "needs a CUDA/ROCm device for xformers fmha (no CPU operator since xformers 0.0.22)"
            if real.vendor == "nvidia" and real.capability and real.capability < (7, 5):
                v = parse_or_none(x.version)
                if v is not None and v > parse(facts.XFORMERS_LAST_SM70):
                    return (f"needs xformers <= {facts.XFORMERS_LAST_SM70} on {sm_name(real.capability)}: "
                            f"{x.version} wheels carry no sm70 kernels")
            if not x.ops:
                return "needs xformers fmha operators, none listed"
            per_op = {o.name: xformers_op_reasons(o, real, dtype) for o in x.ops}
            if any(not r for r in per_op.values()):
                return None
            return "needs an xformers fmha op for this input: " + "; ".join(
                f"{n}: {', '.join(r)}" for n, r in list(per_op.items())[:4])
        return f"needs {need!r}: the doctor has no probe for it (not judged)"

    return probe


def choose_backend(info: EnvInfo, role: str, priority: tuple[str, ...], dtype: str, head_dim: int,
                   platform: Platform) -> BackendChoice:
    """portvlm.backends.select with the record's feature facts; a reason, never an exception, when it cannot."""
    base = BackendChoice(role=role, priority=tuple(priority), dtype=dtype, head_dim=head_dim)
    try:
        from portvlm import backends
    except Exception as exc:
        return replace(base, error=f"portvlm.backends not importable: {type(exc).__name__}: {exc}")
    try:
        selection = backends.select(priority, platform, dtype, head_dim, probe=feature_probe(info))
    except Exception as exc:
        lost = {}
        for name in priority:
            try:
                lost[name] = list(backends.backend_reasons(name, platform, dtype, head_dim, probe=feature_probe(info)))
            except Exception as inner:
                lost[name] = [f"{type(inner).__name__}: {inner}"]
        return replace(base, lost=lost, error=f"no usable {role} backend among {', '.join(priority)} ({type(exc).__name__})")
    return replace(base, chosen=selection.name, lost={k: list(v) for k, v in selection.lost.items()})
