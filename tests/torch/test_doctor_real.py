"""Smoke test: ``portvlm doctor`` on the real machine (a cell venv with torch); no fakes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from portvlm.doctor import SCHEMA, collect, diagnose, load_matrix_or_reason, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_collect_reads_the_real_torch():
    info = collect()
    assert info.torch.installed and info.torch.error is None
    assert info.torch.version == str(torch.__version__)
    assert info.torch.cuda == torch.version.cuda
    assert info.torch.features["sdpa"]
    assert info.platform.is_gpu == torch.cuda.is_available()
    if not info.platform.is_gpu:
        assert info.platform.arch_id == "cpu"
    assert info.probe_errors == ()


def test_report_and_json_on_this_machine():
    matrix, error = load_matrix_or_reason(str(ROOT / "matrix.yaml"))
    assert error is None
    report = diagnose(collect(), matrix)
    assert report.families and all(f.vision is not None for f in report.families)
    if not report.env.platform.is_gpu:
        assert report.arch == "cpu"
        assert all(f.vision.chosen == "sdpa_masked" for f in report.families)
    out = io.StringIO()
    assert main(["--json", "--matrix", str(ROOT / "matrix.yaml")], stdout=out) == 0
    data = json.loads(out.getvalue())
    assert data["schema"] == SCHEMA
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(data, json.loads((ROOT / "portvlm" / "data" / "doctor.schema.json").read_text()))
