"""Matching this machine to the matrix (pure): the arch whose policy applies, the nearest stack, the cell's expectation."""

from __future__ import annotations

import json

from portvlm.doctor import facts
from portvlm.doctor.checks import torch_variant_of
from portvlm.doctor.collect import EnvInfo
from portvlm.errors import UnsupportedError
from portvlm.policy import ArchMatch, Policy, match_platform, resolve_policy
from portvlm.shims.versions import base_version, parse, parse_or_none


def host_arch(info: EnvInfo, matrix) -> ArchMatch | None:
    """The device against the matrix (:func:`portvlm.policy.match_platform`); ``None`` without a matrix."""
    if matrix is None:
        return None
    return match_platform(info.platform, matrix.archs)


def policy_for(info: EnvInfo, matrix) -> tuple[Policy | None, str | None]:
    """``(policy, None)`` the host's policy as ``portvlm.patch(arch=None)`` resolves it, or ``(None, why not)``."""
    if matrix is None:
        return None, None
    try:
        return resolve_policy(None, matrix=matrix, host=info.platform), None
    except UnsupportedError as exc:
        return None, str(exc)


def _stack_kernel_reasons(stack, capability: tuple[int, int]) -> list[str]:
    """Why a stack's torch wheel has no cubin for ``capability`` (from facts.TORCH_CUDA_WHEELS; empty: it has)."""
    minor = ".".join(stack.torch.split(".")[:2])
    cubins = facts.TORCH_CUDA_WHEELS.get((minor, stack.torch_variant))
    if cubins is None:
        return [f"torch {minor}+{stack.torch_variant}'s arch list is not in portvlm's facts"]
    if any(facts.cubin_runs(c, capability) for c in cubins):
        return []
    return [f"torch {minor}+{stack.torch_variant} carries no sm_{capability[0]}{capability[1]} cubin"]


def matrix_entry(match: ArchMatch | None, platform, matrix) -> str | None:
    """The ``archs:`` entry to add to matrix.yaml for an undeclared device arch (YAML text), ``None`` when exact.

    Starts from the policy applied now (the nearest declared arch): its dtypes, backends, runtime, and those of its
    stacks whose torch build carries the device's kernels (NVIDIA: facts.TORCH_CUDA_WHEELS; a ROCm build's gfx list
    is not known here, so the stacks are copied with a note to check them).
    """
    if match is None or match.exact or match.device is None or match.vendor not in ("nvidia", "amd"):
        return None
    if match.vendor == "nvidia":
        hardware = f"capability: [{platform.capability[0]}, {platform.capability[1]}]"
    else:
        hardware = f"gfx: {match.device}"
    base, notes = match.arch, []
    if base is None:
        dtypes, vision, text, runtime, stacks = ("float32",), ("sdpa_masked",), ("sdpa_masked", "eager"), "host", []
        notes.append(f"no declared {match.vendor} arch to start from: choose its dtypes, backends and stacks")
    else:
        dtypes, vision, text, runtime = base.dtypes, base.vision_backends, base.text_backends, base.runtime
        stacks = list(base.stacks)
        notes.append(f"policy copied from {base.id} (the nearest declared {match.vendor} arch); confirm dtypes and "
                     "backends with a run on the device")
        if match.vendor == "nvidia":
            why = {s: _stack_kernel_reasons(matrix.stack(s), platform.capability) for s in base.stacks}
            carried = [s for s in base.stacks if not why[s]]
            if carried and len(carried) < len(stacks):
                notes.append(f"stacks of {base.id} left out: " + "; ".join(w[0] for w in why.values() if w))
            elif not carried:  # an arch needs a stack: keep them, and say they are not known to run here
                notes.append(f"none of {base.id}'s stacks is known to carry {match.device} kernels ("
                             + "; ".join(w[0] for w in why.values()) + "): replace them with a stack whose "
                             f"torch.cuda.get_arch_list() runs on {match.device}")
            stacks = carried or stacks
        else:
            notes.append(f"check that each stack's torch lists {match.device} in torch.cuda.get_arch_list()")
    description = f"{platform.name} ({match.device}), not yet tested by portvlm"
    lines = [
        f"  - id: {match.device}",
        f"    vendor: {match.vendor}",
        f"    description: {json.dumps(description, ensure_ascii=False)}",
        f"    {hardware}",
        f"    dtypes: [{', '.join(dtypes)}]",
        f"    vision_backends: [{', '.join(vision)}]",
        f"    text_backends: [{', '.join(text)}]",
        f"    runtime: {runtime}",
        f"    stacks: [{', '.join(stacks)}]",
        "    notes:",
        *(f"      - {json.dumps(n, ensure_ascii=False)}" for n in notes),
    ]
    return "\n".join(lines)


def match_stack(info: EnvInfo, arch, matrix, model=None):
    """(stack, match, differences) of the arch's stack closest to what is installed; with ``model``, among the
    stacks where its cell is not excluded (a family declared for 5.x is judged by the 5.x stack, not a 4.x one)."""
    stacks = [matrix.stack(s) for s in arch.stacks]
    installed = parse_or_none(info.transformers.version)
    if model is not None and installed is not None and installed >= parse(model.min_transformers):
        usable = [s for s in stacks if expected_outcome(matrix, arch, model, s)[0] != "excluded"]
        stacks = usable or stacks
    if not stacks:
        return None, "none", ()
    tf = parse_or_none(info.transformers.version)
    torch_v = base_version(info.torch.version)
    variant = torch_variant_of(info)

    def torch_score(s):
        return (s.torch == torch_v, s.torch_variant == variant)

    exact = [s for s in stacks if tf is not None and parse_or_none(s.transformers) == tf]
    if exact:
        stack, match = max(exact, key=torch_score), "exact"
    elif tf is None:
        stack, match = stacks[-1], "nearest"
    else:
        below = [s for s in stacks if (parse_or_none(s.transformers) or parse("0")) <= tf]
        pool = below or stacks
        pick = max if below else min
        best = pick(parse_or_none(s.transformers) or parse("0") for s in pool)
        stack = max((s for s in pool if parse_or_none(s.transformers) == best), key=torch_score)
        match = "nearest"
    diffs = []
    if tf is None or parse_or_none(stack.transformers) != tf:
        diffs.append(f"transformers {info.transformers.version or 'missing'} vs {stack.transformers}")
    if torch_v and (stack.torch != torch_v or (variant and stack.torch_variant != variant)):
        diffs.append(f"torch {torch_v}+{variant} vs {stack.torch}+{stack.torch_variant}")
    elif not torch_v:
        diffs.append(f"torch missing vs {stack.torch}+{stack.torch_variant}")
    if (info.xformers.version or None) != (stack.xformers or None):
        diffs.append(f"xformers {info.xformers.version or 'none'} vs {stack.xformers or 'none'}")
    if (info.flash_attn.version or None) != (stack.flash_attn or None):
        diffs.append(f"flash-attn {info.flash_attn.version or 'none'} vs {stack.flash_attn or 'none'}")
    return stack, match, tuple(diffs)


def expected_outcome(matrix, arch, model, stack):
    try:
        from portvlm.matrix.expand import first_expectation

        e = first_expectation(matrix.expectations, arch, model, stack)
        return (e.outcome, e.reason) if e else ("pass", None)
    except Exception:
        return "pass", None
