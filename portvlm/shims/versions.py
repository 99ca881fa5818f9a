"""The one place portvlm parses the transformers version and declares the range its shims were verified on.

Shims select themselves by feature probes (``hasattr(cache, "layers")``); the version is only a gate: outside
the verified range ``patch`` refuses loudly (``UnsupportedError`` naming the range), unless
``PORTVLM_ALLOW_UNVERIFIED=1`` downgrades that to a warning that the report records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from portvlm.errors import UnsupportedError

# Verified by reading/running every release in ../shared/research/transformers-breakpoints.md (4.49.0 … 5.23.0),
# and 5.24.0 (../shared/research/scale-out.md §5: past_key_values -> cache, answered by kv_cache.cache_argument):
# every torch test and the four cpu-tf5.24.0 cells pass there.
VERIFIED_TRANSFORMERS = SpecifierSet(">=4.49.0,<5.25")
VERIFIED_RANGE_TEXT = ">=4.49.0, <=5.24.x"
ALLOW_UNVERIFIED_ENV = "PORTVLM_ALLOW_UNVERIFIED"



def family_minimums(matrix) -> dict[str, str]:
    """``{model_type: first transformers release that ships it}`` of ``matrix``'s ``models:`` (first declared wins)."""
    out: dict[str, str] = {}
    for model in matrix.models:
        out.setdefault(model.family, model.min_transformers)
    return out


def family_min_transformers() -> dict[str, str]:
    """Model families portvlm handles and the first transformers release that ships each: matrix.yaml's ``models:``."""
    from portvlm.matrix import default_matrix

    return family_minimums(default_matrix())


def __getattr__(name: str):
    # FAMILY_MIN_TRANSFORMERS reads the matrix: lazily (nothing happens at import), and always the current one.
    if name == "FAMILY_MIN_TRANSFORMERS":
        return family_min_transformers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse(version: str) -> Version:
    """``packaging`` version of a version string (the only parser portvlm uses)."""
    return Version(version)


def parse_or_none(version: str | None) -> Version | None:
    """:func:`parse`, or ``None`` for a missing or unparseable version (a record's field, a wheel's metadata)."""
    try:
        return Version(str(version)) if version else None
    except InvalidVersion:
        return None


def base_version(version: str | None) -> str | None:
    """``"2.7.0+cu118"`` → ``"2.7.0"``; ``None`` when missing or unparseable."""
    parsed = parse_or_none(version)
    return parsed.base_version if parsed is not None else None


def specifier(text: str) -> SpecifierSet:
    """A PEP 440 range (``">=4.54,<5.0"``)."""
    return SpecifierSet(text)


def transformers_version() -> Version:
    """The installed transformers version."""
    import transformers

    return parse(transformers.__version__)


def in_range(spec: str, version: Version | None = None) -> bool:
    """Whether ``version`` (default: installed transformers) satisfies the PEP 440 specifier ``spec``."""
    version = transformers_version() if version is None else version
    return SpecifierSet(spec).contains(version, prereleases=True)


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
    raise UnsupportedError(f"{problem}; install a verified version or set {ALLOW_UNVERIFIED_ENV}=1 to try anyway")


def family_reasons(model_type: str | None, version: Version | None = None,
                   minimums: dict[str, str] | None = None) -> list[str]:
    """Why portvlm cannot handle this model family on this transformers version (empty: it can).

    ``minimums``: ``{family: first transformers}`` of a given matrix (default: :func:`family_min_transformers`).
    """
    minimums = family_min_transformers() if minimums is None else minimums
    if model_type not in minimums:
        known = ", ".join(sorted(minimums))
        return [f"model_type {model_type!r} is not a supported family (supported: {known})"]
    version = transformers_version() if version is None else version
    first = minimums[model_type]
    if version < parse(first):
        return [f"{model_type} needs transformers >={first}, found {version}"]
    return []
