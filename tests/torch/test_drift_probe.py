"""The drift lane's probe step, for real, in this environment: every shim answers for a tiny model, the upstream
names portvlm uses resolve, and a name that is not where portvlm looks is reported with where it is defined."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from portvlm.drift import probe, symbols  # noqa: E402
from portvlm.shims.patch import SHIMS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_probe_answers_every_shim_and_resolves_names_here(monkeypatch):
    monkeypatch.setenv("PORTVLM_ALLOW_UNVERIFIED", "1")
    names = [s.name for s in symbols.scan_package(ROOT / "portvlm")]
    data = probe.collect(names, ["llava"])
    answers = data["shims"]["llava"]
    assert set(answers) == {s.name for s in SHIMS}, answers
    assert answers["kv_cache"]["applies"] and answers["layer_paths"]["applies"]
    assert set(data["symbols"]) == set(names)
    assert data["symbols"]["transformers.DynamicCache"] == {"found": True, "home": "transformers.cache_utils",
                                                           "params": None}
    assert data["symbols"]["transformers.DynamicCache.update"]["params"][:2] == ["self", "key_states"]
    assert probe.compare_answers(data["shims"], data["shims"]) == []  # one environment against itself: no drift


def test_a_name_that_moved_is_found_where_it_went():
    got = probe.symbol_answer("transformers.models.llava.configuration_llava.DynamicCache")
    assert not got["found"] and "DynamicCache" in got["missing"]
    assert "transformers.cache_utils" in got["defined_in"]
