"""Matching this machine to the matrix (pure): the arch whose policy applies, the nearest stack, the cell's expectation."""

from __future__ import annotations

from typing import Any

from portvlm.doctor.checks import device_arch, torch_variant_of
from portvlm.doctor.collect import EnvInfo
from portvlm.shims.versions import base_version, parse, parse_or_none


def gfx_key(gfx: str | None) -> int:
    try:
        return int((gfx or "gfx0")[3:], 16)
    except ValueError:
        return 0


def policy_arch(info: EnvInfo, matrix) -> tuple[Any, str, str | None]:
    """``(arch, match, note)``: the matrix arch whose policy applies here, and whether it is the device's own."""
    if matrix is None:
        return None, "none", None
    p = info.platform
    by_id = {a.id: a for a in matrix.archs}
    if p.vendor == "cpu" or p.device == "cpu":
        arch = by_id.get("cpu")
        return arch, ("exact" if arch else "none"), None
    if p.arch_id and p.arch_id in by_id:
        return by_id[p.arch_id], "exact", None
    same = [a for a in matrix.archs if a.vendor == p.vendor]
    if not same:
        return None, "none", f"the matrix has no {p.vendor} arch"
    if p.vendor == "nvidia" and p.capability:
        lower = [a for a in same if a.capability and tuple(a.capability) <= p.capability]
        arch = max(lower, key=lambda a: a.capability) if lower else min(same, key=lambda a: a.capability or (0, 0))
    elif p.vendor == "amd":
        key = gfx_key(p.gfx)
        lower = [a for a in same if gfx_key(a.gfx) <= key]
        arch = max(lower, key=lambda a: gfx_key(a.gfx)) if lower else min(same, key=lambda a: gfx_key(a.gfx))
    else:
        arch = same[0]
    note = f"{device_arch(p)} ({p.name}) has no arch in the matrix; applying the nearest policy, {arch.id} (untested here)"
    return arch, "nearest", note


def match_stack(info: EnvInfo, arch, matrix):
    """(stack, match, differences) of the arch's stack closest to what is installed."""
    stacks = [matrix.stack(s) for s in arch.stacks]
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
