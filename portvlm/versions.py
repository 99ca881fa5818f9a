"""The one place portvlm parses versions and PEP 440 ranges: ``packaging``, nothing else, so every layer may import it.

The matrix loader, the expansion, the drift lane's resolver, the doctor and the shims' transformers gate
(``portvlm.shims.versions``) all parse through these functions. Imports nothing from portvlm.
"""

from __future__ import annotations

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version


def parse(version: str) -> Version:
    """``packaging`` version of a version string (the only parser portvlm uses); ``InvalidVersion`` if it is none."""
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
    """A PEP 440 range (``">=4.54,<5.0"``); ``InvalidSpecifier`` if it is none."""
    return SpecifierSet(text)


def contains(spec: str | SpecifierSet, version: Version | str) -> bool:
    """Whether ``version`` satisfies the range ``spec`` (pre-releases count: a 5.0.0rc1 stack is 5.0)."""
    spec = spec if isinstance(spec, SpecifierSet) else SpecifierSet(spec)
    return spec.contains(version, prereleases=True)


def source_revision() -> str | None:
    """The portvlm commit this code came from: ``$PORTVLM_COMMIT`` when set (a copy of the tree without ``.git``, as
    on a lent GPU machine), else this checkout's ``git rev-parse HEAD`` with ``+dirty`` when tracked files differ
    from it; None when neither says (an installed wheel)."""
    import os
    import subprocess
    from pathlib import Path

    if os.environ.get("PORTVLM_COMMIT"):
        return os.environ["PORTVLM_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = head.stdout.strip()
    return (rev + ("+dirty" if dirty.stdout.strip() else "")) if head.returncode == 0 and rev else None



__all__ = ["InvalidSpecifier", "InvalidVersion", "SpecifierSet", "Version", "base_version", "contains", "parse",
           "parse_or_none", "source_revision", "specifier"]
