"""The arch policy, decided in one place: which arch's rules apply, on what hardware, in which dtype and why.

    policy = resolve_policy("sm70")          # arch=None: the host's
    policy.dtype, policy.dtype_why           # "float16", "sm70 policy dtype (first of float16, float32); no bf16 below sm80"
    policy.vision_backends                   # priority order portvlm.backends.select() walks

``portvlm.patch`` and the cell runner's child (``portvlm.run.cell``) call it, so the dtype rule and the backend
priority have one home. It reads the packaged ``portvlm/data/matrix.yaml`` unless a matrix is passed: a library
call never depends on the current directory or ``$PORTVLM_MATRIX`` (those are the command line's business).
Nothing here imports torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from portvlm.errors import UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    from portvlm.matrix.schema import Arch, Matrix
    from portvlm.platform import Platform


@dataclass(frozen=True)
class Policy:
    """An arch's rules as they apply here: the arch spec, the platform it is judged on, the dtype and why."""

    arch: Arch  # the matrix arch whose rules apply
    platform: Platform  # the host, or the host seen through the arch's capability/gfx when emulated
    emulation: str | None  # set when the arch's rules run on other hardware (kernels are the host's)
    dtype: str  # "float16" | "bfloat16" | "float32"
    dtype_why: str

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
    wanted = arch if arch is not None else host.arch_id
    if wanted is None:
        raise UnsupportedError(f"host {host.name} matches no arch portvlm has a policy for (known: {known}); pass arch=")
    try:
        spec = spec_matrix.arch(wanted)
    except KeyError:
        raise UnsupportedError(f"arch {wanted!r} has no policy in the matrix (known: {known})") from None
    if host.arch_id == spec.id:
        platform, emulation = host, None
    else:
        platform = emulated(spec, host)
        emulation = (f"policy of {spec.id} (dtype rule, backend priority) emulated on {host.name} ({host.device}); "
                     f"kernel availability judged on the real {host.device}")
    chosen, why = dtype_rule(spec, platform, dtype)
    return Policy(arch=spec, platform=platform, emulation=emulation, dtype=chosen, dtype_why=why)


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


__all__ = ["Policy", "packaged_matrix", "resolve_policy", "dtype_rule"]
