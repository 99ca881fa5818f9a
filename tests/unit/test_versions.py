"""portvlm.versions: the commit a result came from."""

from __future__ import annotations


def test_source_revision_names_the_commit_results_came_from(monkeypatch):
    """Benchmark records carry it: $PORTVLM_COMMIT on a tree copied without .git (a lent GPU), else git HEAD."""
    import re

    from portvlm.versions import source_revision

    monkeypatch.setenv("PORTVLM_COMMIT", "abc123")
    assert source_revision() == "abc123"
    monkeypatch.delenv("PORTVLM_COMMIT")
    rev = source_revision()
    assert rev is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", rev), rev
