"""``diagnose(info, matrix) -> Report``: pure. Turns an :class:`EnvInfo` into checks, matched cells and a verdict
per model family (OK / WARN / FAIL), each with reasons and one fix line.

No torch, no I/O: every fact comes from the record, every rule from ``facts.py``, the matrix and the backend
declarations, so the tests describe a V100 or an MI300 with a handful of fake values.
"""

from __future__ import annotations

from portvlm import models
from portvlm.doctor.checks import (  # noqa: F401 - native_bf16, xformers_op_reasons: re-exported
    check_arch,
    check_driver,
    check_flash_attn,
    check_gpu,
    check_hub_kernels,
    check_kernel_image,
    check_precision,
    check_torch,
    check_transformers,
    check_xformers,
    native_bf16,
    torch_usable,
    xformers_op_reasons,
)
from portvlm.doctor.collect import EnvInfo
from portvlm.doctor.features import choose_backend, feature_probe  # noqa: F401
from portvlm.doctor.matching import expected_outcome, host_arch, match_stack, matrix_entry, policy_for
from portvlm.doctor.report import (  # noqa: F401
    FAIL,
    OK,
    RANK,
    VERDICT,
    WARN,
    BackendChoice,
    Check,
    FamilyReport,
    Report,
    Shim,
)
from portvlm.doctor.shims import shims_for
from portvlm.records import CheckStatus, Evidence
from portvlm.shims.versions import family_minimums, family_reasons, parse_or_none


def _family_reasons(matrix, model_type: str, version: str | None) -> list[str]:
    """``versions.family_reasons`` against the family minimums of the matrix being matched."""
    v = parse_or_none(version)
    if v is None:
        return []
    return list(family_reasons(model_type, v, minimums=family_minimums(matrix)))


def _family(info: EnvInfo, matrix, policy, policy_error: str | None, model, checks: list[Check]) -> FamilyReport:
    arch = policy.arch if policy is not None else None
    # the released checkpoints' head dims (portvlm.models): backends judge head_dim limits (≤256, ×8) against them
    vision_dim, text_dim = models.by_type(model.family).head_dims
    global_rank = max((RANK[c.status] for c in checks), default=0)
    ranked = sorted((c for c in checks if RANK[c.status]), key=lambda c: -RANK[c.status])
    global_fix = next((c.fix for c in ranked if c.fix), None)
    reasons: list[str] = [f"environment {c.status.upper()}: {c.id}" for c in ranked]
    fixes: list[str] = []
    own_rank = 0
    stack = None
    match, diffs, expected, cell = "none", (), None, None
    if arch is not None:
        stack, match, diffs = match_stack(info, arch, matrix, model)
    if stack is not None:
        from portvlm.matrix.schema import cell_id

        cell = cell_id(arch.id, model.id, stack.id)
        expected, why = expected_outcome(matrix, arch, model, stack)
        if expected == "excluded":
            own_rank = max(own_rank, 2)
            reasons.append(f"cell {cell} is excluded: {why}")
        elif expected == "xfail":
            own_rank = max(own_rank, 1)
            reasons.append(f"cell {cell} is expected to fail: {why}")
        if match == "nearest" and info.transformers.version:
            own_rank = max(own_rank, 1)
            reasons.append(f"no {arch.id} stack pins transformers {info.transformers.version}; nearest tested: "
                           f"{stack.id}")
            fixes.append(f"pip install 'transformers=={stack.transformers}' (the tested {arch.id} stack)")
    for why in _family_reasons(matrix, model.family, info.transformers.version):
        own_rank = 2
        reasons.append(why)
        fixes.insert(0, f"pip install 'transformers>={model.min_transformers}'")
    # dtype and backend priority: the policy portvlm.patch(arch=None) resolves here (portvlm.policy).
    dtype = policy.dtype if policy is not None else "float32"
    if policy_error:
        own_rank = 2
        reasons.append(policy_error)
    vision = text = None
    if policy is not None:
        vision = choose_backend(info, "vision", policy.vision_backends, dtype, vision_dim, policy.platform)
        text = choose_backend(info, "text", policy.text_backends, dtype, text_dim, policy.platform)
        for choice in (vision, text):
            if choice.chosen is None and choice.error and "not importable" not in choice.error and torch_usable(info):
                own_rank = 2
                reasons.append(choice.error)
    rank = max(global_rank, own_rank)
    fix = fixes[0] if fixes and own_rank >= global_rank else (global_fix or (fixes[0] if fixes else None))
    return FamilyReport(
        model=model.id, family=model.family, verdict=VERDICT[rank], cell=cell, match=match,
        stack=stack.id if stack else None, expected=expected, differences=diffs, reasons=tuple(reasons),
        fix=fix if rank else None, dtype=dtype, vision=vision, text=text,
        shims=shims_for(info, model.family),
    )


def diagnose(info: EnvInfo, matrix=None, *, matrix_error: str | None = None) -> Report:
    """Checks, matched cells, chosen backends and a verdict per model family; pure, never raises."""
    try:
        return _diagnose(info, matrix, matrix_error)
    except Exception as exc:  # a bug here must still produce a report
        check = Check("doctor", CheckStatus.FAIL, f"diagnosis failed: {type(exc).__name__}: {exc}",
                      "report this as a portvlm bug, with `portvlm doctor --json`")
        return Report(env=info, checks=(check,), verdict=FAIL, matrix_error=matrix_error)


def _diagnose(info: EnvInfo, matrix, matrix_error: str | None) -> Report:
    here = host_arch(info, matrix)
    policy, policy_error = policy_for(info, matrix)
    arch = policy.arch if policy is not None else None
    entry = matrix_entry(here, info.platform, matrix)
    checks: list[Check] = []
    checks += check_gpu(info)
    checks += check_torch(info, arch)
    checks += check_kernel_image(info)  # before the driver: the right torch build often fixes both
    checks += check_driver(info)
    if here is not None:
        checks += check_arch(info, here, entry)
    elif matrix_error:
        checks.append(Check("matrix", CheckStatus.WARN, f"matrix unavailable: {matrix_error}", "portvlm matrix --file PATH"))
    checks += check_precision(info, policy)
    checks += check_transformers(info, matrix, arch)
    checks += check_hub_kernels(info, policy)
    checks += check_xformers(info, policy)
    checks += check_flash_attn(info)
    if info.probe_errors:
        checks.append(Check("probes", CheckStatus.WARN, "probes failed (values unknown): " + "; ".join(info.probe_errors)))
    global_rank = max((RANK[c.status] for c in checks), default=0)
    families = []
    if matrix is not None:
        families = [_family(info, matrix, policy, policy_error, m, checks) for m in matrix.models]
    p = info.platform
    evidence, evidence_note = Evidence.HARDWARE, None
    if not p.is_gpu:
        evidence_note = ("CPU host: cpu cells run here as `hardware` evidence; GPU arch policies can only be "
                         "`emulated` (dtype/backend rules of the arch, CPU kernels)")
    elif here is not None and not here.exact:
        evidence, evidence_note = here.evidence, here.reason
    verdict_rank = max([global_rank] + [RANK[f.verdict.lower()] for f in families])
    return Report(
        env=info, arch=arch.id if arch is not None else None, arch_match=here.match if here else "none",
        evidence=evidence, evidence_note=evidence_note, checks=tuple(checks), families=tuple(families),
        matrix=getattr(matrix, "path", None), matrix_error=matrix_error, verdict=VERDICT[verdict_rank],
        device_arch=here.device if here else p.arch_id, declared=here.exact if here else None, add_to_matrix=entry,
    )
