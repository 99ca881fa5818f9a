"""The arch policy, decided in one place: which arch's rules apply, on what hardware, in which dtype and why.

    policy = resolve_policy("sm70")          # arch=None: the host's
    policy.dtype, policy.dtype_why           # "float16", "sm70 policy dtype (first of float16, float32); no bf16 below sm80"
    policy.vision_backends                   # priority order portvlm.backends.select() walks
    match_platform(host, matrix.archs)       # the host's arch: declared (`hardware`) or named and emulated

``portvlm.patch``, the doctor and the runner call these, so the dtype rule, the backend priority and the question
"is this host an arch matrix.yaml declares?" each have one home. It reads the packaged ``portvlm/data/matrix.yaml`` unless a matrix is passed: a library
call never depends on the current directory or ``$PORTVLM_MATRIX`` (those are the command line's business).
Nothing here imports torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

from portvlm.errors import UnsupportedError
from portvlm.records import Evidence

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence

    from portvlm.matrix.schema import Arch, Matrix
    from portvlm.platform import Platform

NOT_DECLARED = "not in matrix.yaml"


@dataclass(frozen=True)
class ArchMatch:
    """How a device stands to the matrix: its own arch id, the declared arch whose rules apply, and why.

    ``exact``: matrix.yaml declares the device's capability / gfx target, runs there are ``hardware`` evidence.
    ``nearest``: it does not; the device is still named (``sm110 (not in matrix.yaml)``) and the nearest declared
    arch of its vendor lends its policy, as ``emulated`` evidence. ``none``: no declared arch of its vendor.
    """

    device: str | None  # the device's own arch id, declared or not: "sm90", "sm110", "gfx1100", "cpu"; None: unread
    vendor: str  # "cpu" | "nvidia" | "amd"
    arch: Arch | None  # the declared arch whose policy applies (the device's own when exact)
    match: str  # "exact" | "nearest" | "none"
    reason: str | None = None  # why runs here are not `hardware` evidence (names the device arch and the policy)

    @property
    def exact(self) -> bool:
        return self.match == "exact"

    @property
    def evidence(self) -> Evidence:
        """What a cell of the matched policy records when run here."""
        return Evidence.HARDWARE if self.exact else Evidence.EMULATED

    @property
    def label(self) -> str:
        """``"sm90"``, or ``"sm110 (not in matrix.yaml)"`` for a device arch the matrix does not declare."""
        if self.exact:
            return self.arch.id
        return f"{self.device} ({NOT_DECLARED})" if self.device else f"unknown {self.vendor} arch"

    def evidence_for(self, arch_id: str) -> Evidence:
        """A cell of ``arch_id`` run here: ``hardware`` only on that declared arch itself."""
        return Evidence.HARDWARE if self.exact and self.arch.id == arch_id else Evidence.EMULATED


def _key(vendor: str, capability, gfx) -> tuple[int, ...] | None:
    """A comparable hardware key: (major, minor) for CUDA, the gfx number (hex) for ROCm."""
    if vendor == "nvidia" and capability is not None:
        return tuple(int(x) for x in capability)
    if vendor == "amd" and gfx:
        try:
            return (int(gfx.split(":")[0].lower().removeprefix("gfx"), 16),)
        except ValueError:
            return None
    return None


def match_arch(archs: Sequence[Arch], *, vendor: str, capability: tuple[int, int] | None = None,
               gfx: str | None = None) -> ArchMatch:
    """The one decision "which declared arch is this hardware?" (pure).

    Exact: a declared arch of the vendor has this capability / gfx target (the CPU: the ``cpu`` arch). Otherwise the
    device keeps its own name and the nearest declared arch of the same vendor lends its policy: the highest
    capability (gfx number) below the device's, else the lowest declared one, with a reason naming both.
    """
    from portvlm.platform import arch_id_for

    device = "cpu" if vendor == "cpu" else arch_id_for(capability, gfx)
    same = [a for a in archs if a.vendor == vendor]
    if vendor == "cpu":
        arch = same[0] if same else None
        return ArchMatch(device, vendor, arch, "exact" if arch else "none",
                         None if arch else f"cpu ({NOT_DECLARED}): no arch of vendor cpu is declared")
    key = _key(vendor, capability, gfx)
    if key is None:
        what = "compute capability" if vendor == "nvidia" else "gfx target"
        return ArchMatch(None, vendor, None, "none", f"the {vendor} device's {what} could not be read; no policy "
                         "applies (pass arch= to choose one)")
    keyed = [(k, a) for a in same if (k := _key(vendor, a.capability, a.gfx)) is not None]
    exact = next((a for k, a in keyed if k == key), None)
    if exact is not None:
        return ArchMatch(device, vendor, exact, "exact")
    label = f"{device} ({NOT_DECLARED})"
    if not keyed:
        return ArchMatch(device, vendor, None, "none", f"{label}: the matrix declares no {vendor} arch, so no "
                         "policy applies")
    below = [(k, a) for k, a in keyed if k < key]
    if below:
        arch = max(below, key=lambda ka: ka[0])[1]
        where = f"the nearest declared {vendor} arch below it"
    else:
        arch = min(keyed, key=lambda ka: ka[0])[1]
        where = f"the lowest declared {vendor} arch (none is below it)"
    return ArchMatch(device, vendor, arch, "nearest",
                     f"{label}: {arch.id}'s policy ({where}) runs here as `emulated` evidence, never as {arch.id} "
                     "`hardware`")


def match_platform(platform: Platform, archs: Sequence[Arch]) -> ArchMatch:
    """:func:`match_arch` for a detected platform (a CPU host, or GPU 0 of the winning vendor)."""
    if not platform.is_gpu or platform.vendor == "cpu":
        return match_arch(archs, vendor="cpu")
    return match_arch(archs, vendor=platform.vendor, capability=platform.capability, gfx=platform.gfx)


def match_arch_id(arch_id: str | None, archs: Sequence[Arch]) -> ArchMatch:
    """:func:`match_arch` for a host arch id as the runner carries it (``"sm90"``, ``"sm110"``, ``"gfx1100"``)."""
    from portvlm.platform import parse_arch_id

    declared = next((a for a in archs if a.id == arch_id), None)
    if declared is not None:  # a declared id names its arch whatever its spelling
        return ArchMatch(arch_id, declared.vendor, declared, "exact")
    vendor, capability, gfx = parse_arch_id(arch_id)
    if vendor is None:
        return ArchMatch(arch_id, "unknown", None, "none",
                         f"host arch {arch_id!r} is not an arch id (sm<major><minor>, gfx<target>, cpu) nor declared")
    return match_arch(archs, vendor=vendor, capability=capability, gfx=gfx)


@dataclass(frozen=True)
class Policy:
    """An arch's rules as they apply here: the arch spec, the platform it is judged on, the dtype and why."""

    arch: Arch  # the matrix arch whose rules apply
    platform: Platform  # the host, or the host seen through the arch's capability/gfx when emulated
    emulation: str | None  # set when the arch's rules run on other hardware (kernels are the host's)
    dtype: str  # "float16" | "bfloat16" | "float32"
    dtype_why: str
    host: ArchMatch | None = None  # the host against the matrix: exact, or named and not declared
    matrix: Matrix | None = field(default=None, repr=False, compare=False)  # the matrix the policy was read from

    @property
    def vision_backends(self) -> tuple[str, ...]:
        return tuple(self.arch.vision_backends)

    @property
    def text_backends(self) -> tuple[str, ...]:
        return tuple(self.arch.text_backends)


@functools.lru_cache(maxsize=1)
def packaged_matrix() -> Matrix:
    """The matrix shipped inside the package (``portvlm/data/matrix.yaml``), read once."""
    from portvlm.matrix import parse_matrix

    ref = resources.files("portvlm").joinpath("data", "matrix.yaml")
    return parse_matrix(ref.read_bytes(), str(ref))


def _matrix(matrix) -> Matrix:
    if matrix is None:
        return packaged_matrix()
    if isinstance(matrix, (str, os.PathLike)):
        from portvlm.matrix import load_matrix

        return load_matrix(matrix)
    return matrix


def resolve_policy(arch: str | None = None, *, dtype=None, matrix=None, host: Platform | None = None) -> Policy:
    """The policy of ``arch`` (``None``: the host's) in ``dtype`` (``None``: the arch's first); raises UnsupportedError.

    ``matrix``: a ``Matrix`` or a path (default: the packaged one). ``host``: the detected platform (default:
    ``portvlm.platform.detect()``; tests pass a fake).
    """
    from portvlm.platform import detect, emulated

    host = detect() if host is None else host
    spec_matrix = _matrix(matrix)
    known = ", ".join(a.id for a in spec_matrix.archs)
    here = match_platform(host, spec_matrix.archs)
    if arch is None:
        if here.arch is None:
            raise UnsupportedError(f"host {host.name}: {here.reason} (known: {known}); pass arch=")
        spec = here.arch
    else:
        try:
            spec = spec_matrix.arch(arch)
        except KeyError:
            raise UnsupportedError(f"arch {arch!r} has no policy in the matrix (known: {known})") from None
    if here.evidence_for(spec.id) == Evidence.HARDWARE:
        platform, emulation = host, None
    else:
        platform = emulated(spec, host)
        emulation = (f"policy of {spec.id} (dtype rule, backend priority) emulated on {host.name} ({host.device}); "
                     f"kernel availability judged on the real {host.device}")
        if arch is None:  # the host's own arch is not declared: say which it is
            emulation = f"{here.reason}; {emulation}"
    chosen, why = dtype_rule(spec, platform, dtype)
    return Policy(arch=spec, platform=platform, emulation=emulation, dtype=chosen, dtype_why=why, host=here,
                  matrix=spec_matrix)


def dtype_rule(spec: Arch, platform: Platform, dtype=None) -> tuple[str, str]:
    """``(dtype, why)``: the arch's first dtype, or ``dtype`` if the arch allows it and the hardware has it."""
    from portvlm.backends import normalize_dtype  # torch-free
    from portvlm.platform import bf16_reasons

    allowed = tuple(spec.dtypes)
    if dtype is None:
        chosen, why = spec.policy_dtype, f"{spec.id} policy dtype (first of {', '.join(allowed)})"
    else:
        chosen, why = normalize_dtype(dtype), "requested"
    no_bf16 = bf16_reasons(platform.vendor, platform.capability)
    if chosen == "bfloat16" and no_bf16:
        raise UnsupportedError(f"{spec.id}: {no_bf16[0]}; use float16 or float32")
    if chosen not in allowed:
        raise UnsupportedError(f"dtype {chosen} is not in {spec.id}'s policy (supported: {', '.join(allowed)})")
    if chosen == "float16" and no_bf16:
        why += "; no bf16 below sm80"
    return chosen, why


__all__ = ["ArchMatch", "NOT_DECLARED", "Policy", "dtype_rule", "match_arch", "match_arch_id", "match_platform",
           "packaged_matrix", "resolve_policy"]
