"""The transformers version gate: the range portvlm's shims were verified on, and the family minimums check.

Versions are parsed by ``portvlm.versions`` (the leaf every layer may import); this module adds what needs the
installed transformers.

Shims select themselves by feature probes (``hasattr(cache, "layers")``); the version is only a gate: outside
the verified range ``patch`` refuses loudly (``UnsupportedError`` naming the range), unless
``PORTVLM_ALLOW_UNVERIFIED=1`` downgrades that to a warning that the report records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from portvlm.errors import UnsupportedError
from portvlm.versions import (  # noqa: F401 - the one parser, re-exported for the gate's callers
    SpecifierSet,
    Version,
    base_version,
    contains,
    parse,
    parse_or_none,
    specifier,
)

# Verified by reading/running every release in ../shared/research/transformers-breakpoints.md (4.49.0 … 5.23.0),
# 5.24.0 (../shared/research/scale-out.md §5: past_key_values -> cache, answered by kv_cache.cache_argument) and
# 5.25.0 (../shared/research/upstream-5.25.md: hub kernels on by default in from_pretrained, answered by
# shims/hub_kernels.py and the from_pretrained suite): every torch test and the cpu-tf5.25.0 cells pass there.
VERIFIED_TRANSFORMERS = SpecifierSet(">=4.49.0,<5.26")
VERIFIED_RANGE_TEXT = ">=4.49.0, <=5.25.x"
ALLOW_UNVERIFIED_ENV = "PORTVLM_ALLOW_UNVERIFIED"


def family_minimums(matrix) -> dict[str, str]:
    """``{model_type: first transformers release that ships it}`` of ``matrix``'s ``models:`` (first declared wins)."""
    out: dict[str, str] = {}
    for model in matrix.models:
        out.setdefault(model.family, model.min_transformers)
    return out


def transformers_version() -> Version:
    """The installed transformers version."""
    import transformers

    return parse(transformers.__version__)


def in_range(spec: str, version: Version | None = None) -> bool:
    """Whether ``version`` (default: installed transformers) satisfies the PEP 440 specifier ``spec``."""
    return contains(spec, transformers_version() if version is None else version)


def newest_verified(candidates=None) -> str | None:
    """The newest release inside the verified range among ``candidates`` (default: matrix.yaml's stacks' transformers).

    The version ``patch``'s refusal and the doctor tell a user to install: tested by a stack, and verified.
    """
    if candidates is None:
        from portvlm.policy import packaged_matrix

        candidates = [s.transformers for s in packaged_matrix().stacks]
    parsed = [v for v in map(parse_or_none, candidates) if v is not None]
    verified = [v for v in parsed if VERIFIED_TRANSFORMERS.contains(v, prereleases=True)]
    return str(max(verified)) if verified else None


@dataclass(frozen=True)
class VersionGate:
    version: str
    verified: bool
    warning: str | None  # set when an unverified version was allowed through the env override


def check_transformers(version: Version | None = None, environ=None) -> VersionGate:
    """Refuse an unverified transformers version (``UnsupportedError``) unless the env override allows it."""
    version = transformers_version() if version is None else version
    environ = os.environ if environ is None else environ
    if VERIFIED_TRANSFORMERS.contains(version, prereleases=True):
        return VersionGate(str(version), True, None)
    problem = f"transformers {version} is outside the range portvlm's shims were verified on ({VERIFIED_RANGE_TEXT})"
    if environ.get(ALLOW_UNVERIFIED_ENV) == "1":
        return VersionGate(str(version), False, f"{problem}; allowed by {ALLOW_UNVERIFIED_ENV}=1 (unverified)")
    newest = newest_verified()
    install = f"pip install 'transformers=={newest}' (the newest verified release)" if newest else "install a verified version"
    raise UnsupportedError(f"{problem}; {install} or set {ALLOW_UNVERIFIED_ENV}=1 to try anyway")


def family_reasons(model_type: str | None, version: Version | None = None, *, minimums: dict[str, str]) -> list[str]:
    """Why portvlm cannot handle this model family on this transformers version (empty: it can).

    ``minimums``: ``{family: first transformers}`` of the matrix in use (:func:`family_minimums`): the one patch was
    handed or the packaged one, never ``$PORTVLM_MATRIX``.
    """
    if model_type not in minimums:
        known = ", ".join(sorted(minimums))
        return [f"model_type {model_type!r} is not a supported family (supported: {known})"]
    version = transformers_version() if version is None else version
    first = minimums[model_type]
    if version < parse(first):
        return [f"{model_type} needs transformers >={first}, found {version}"]
    return []
