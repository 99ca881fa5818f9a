"""The support table's distributed section: rows from benchmark JSON (smoke runs never shown)."""

from __future__ import annotations

import json

from portvlm.publish import distributed


def test_rows_from_benchmarks_skip_smoke_and_mark_emulation(tmp_path):
    dp = {"world_size": 2, "gpu": "NVIDIA H200", "evidence": "hardware", "rows": [
        {"model": "qwen2_5vl", "arch_policy": "sm70", "mesh": {"dp": 2, "sp": 1}, "status": "fail", "evidence": "emulated",
         "peak_GiB": 3.5}]}
    old = {"world_size": 1, "gpu": "NVIDIA H100 80GB HBM3", "evidence": "hardware", "rows": [
        {"model": "qwen3vl", "arch_policy": "sm70", "ok": True, "fsdp_peak_GiB": 11.4}]}
    (tmp_path / "distributed_dp_2gpu.json").write_text(json.dumps(dp))
    (tmp_path / "fsdp2_1gpu.json").write_text(json.dumps(old))
    (tmp_path / "distributed_dp_2proc_smoke.json").write_text(json.dumps(dp | {"rows": [dict(dp["rows"][0], status="pass")]}))
    rows, problems = distributed.from_benchmarks(tmp_path)
    assert not problems
    assert [(r.source, r.mesh, r.status, r.evidence) for r in rows] == [
        ("distributed_dp_2gpu.json", "2×1", "fail", "emulated"),
        ("fsdp2_1gpu.json", "1×1", "pass", "emulated"),  # the old file said hardware for an sm70 policy on an H100
    ]
