"""The support table's distributed section: rows from benchmark JSON (smoke runs never shown)."""

from __future__ import annotations

import json

from portvlm.publish import distributed


def test_rows_from_benchmarks_skip_smoke_and_mark_emulation(tmp_path):
    dp = {"world_size": 2, "gpu": "NVIDIA H200", "evidence": "hardware", "rows": [
        {"model": "qwen2_5vl", "arch_policy": "sm70", "mesh": {"dp": 2, "sp": 1}, "status": "fail", "evidence": "emulated",
         "peak_GiB": 3.5}]}
    old = {"world_size": 1, "gpu": "NVIDIA H100 80GB HBM3", "evidence": "hardware", "rows": [
        {"model": "qwen3vl", "arch_policy": "sm70", "mesh": {"dp": 1, "sp": 1}, "ok": True, "fsdp_peak_GiB": 11.4}]}
    (tmp_path / "distributed_dp_2gpu.json").write_text(json.dumps(dp))
    (tmp_path / "distributed_dp_1gpu.json").write_text(json.dumps(old))
    (tmp_path / "fsdp2_1gpu.json").write_text(json.dumps(old))  # the deleted fsdp2_train.py's: not read any more
    (tmp_path / "distributed_dp_2proc_smoke.json").write_text(json.dumps(dp | {"rows": [dict(dp["rows"][0], status="pass")]}))
    rows, problems = distributed.from_benchmarks(tmp_path)
    assert not problems
    assert [(r.source, r.mesh, r.status, r.evidence) for r in rows] == [
        ("distributed_dp_1gpu.json", "1×1", "pass", "emulated"),  # the old file said hardware for sm70 on an H100
        ("distributed_dp_2gpu.json", "2×1", "fail", "emulated"),
    ]


def test_a_benchmark_record_is_read_as_written(tmp_path):
    """``BenchmarkRecord.to_json`` (what benchmarks/distributed_train.py writes) is what the table reads."""
    from portvlm.records import BenchmarkRecord

    topo = {"world_size": 2, "devices": 2, "transport": "nccl", "device_type": "cuda", "shared_device": False,
            "memory_fraction_per_rank": None, "note": None}
    rec = BenchmarkRecord("distributed_train", "emulated", ["policy of sm70 emulated on NVIDIA H200"],
                          environment={"torch": "2.11.0", "gpu": "NVIDIA H200", "device": "cuda"}, world_size=2,
                          topology=topo, figures={"part": "dp", "policies": {"sm70": "emulated"}}, rows=[
                              {"model": "qwen2_5vl", "arch_policy": "sm70", "mesh": {"dp": 2, "sp": 1},
                               "status": "pass", "evidence": "emulated", "peak_GiB": 3.5}])
    doc = rec.to_json()
    assert doc["schema"] == "portvlm.benchmark/1" and doc["gpu"] == "NVIDIA H200" and doc["part"] == "dp"
    (tmp_path / "distributed_dp_2gpu.json").write_text(json.dumps(doc))
    rows, problems = distributed.from_benchmarks(tmp_path)
    assert not problems
    assert [(r.mesh, r.status, r.evidence, r.peak_gib, r.topology) for r in rows] == [
        ("2×1", "pass", "emulated", 3.5, "2 ranks · 2 GPUs · nccl")]


def test_shared_device_rows_show_their_topology_and_what_they_measured(tmp_path):
    topo = {"world_size": 2, "devices": 1, "transport": "gloo", "device_type": "cuda", "shared_device": True,
            "memory_fraction_per_rank": 0.5, "note": "ranks share one GPU; collectives go through the host; times are "
                                                     "not NCCL times"}
    doc = {"world_size": 2, "gpu": "NVIDIA H200", "evidence": "hardware", "topology": topo, "rows": [
        {"check": "sp_vs_sp1", "model": "qwen2_5vl", "arch_policy": "sm70", "mesh": {"dp": 1, "sp": 2},
         "status": "pass", "evidence": "emulated", "row_tokens": 8300, "row_images": 16, "loss_abs_err": 1e-4,
         "grad_max_rel_err": 0.012, "peak_GiB": 20.5},
        {"check": "longest_row", "model": "qwen2_5vl", "arch_policy": "sm90", "mesh": {"dp": 1, "sp": 2},
         "status": "pass", "evidence": "hardware", "memory_cap_GiB_per_rank": 69.8, "target_ratio": 1.8,
         "ratio_longest_sp_over_sp1": 3.0,
         "sp1": {"longest_that_trains": 65536, "tried": [{"trains": True, "peak_GiB_per_rank": [50.0, 50.1]}]},
         "sp2": {"longest_that_trains": 196608, "tried": [{"trains": True, "peak_GiB_per_rank": [60.0, 61.5]},
                                                          {"trains": False, "peak_GiB_per_rank": [69.0, 69.7]}]}}]}
    old = {"world_size": 1, "gpu": "NVIDIA H200", "evidence": "hardware", "rows": [
        {"model": "qwen2_5vl", "arch_policy": "sm90", "mesh": {"dp": 1, "sp": 1}, "status": "pass"}]}
    (tmp_path / "distributed_grads_shared1gpu.json").write_text(json.dumps(doc))
    (tmp_path / "distributed_dp_1gpu.json").write_text(json.dumps(old))
    rows, problems = distributed.from_benchmarks(tmp_path)
    assert not problems
    by = {r.source + "/" + r.what.split(";")[1].strip()[:12]: r for r in rows}
    assert [r.topology for r in rows] == ["1 rank · 1 GPU · nccl",
                                          "2 ranks · 1 GPU (shared; times are not NCCL times) · gloo",
                                          "2 ranks · 1 GPU (shared; times are not NCCL times) · gloo"], by
    sp, longest = rows[1], rows[2]
    assert "SP vs SP=1 on 8300 tokens, 16 images" in sp.what and sp.peak_gib == 20.5 and sp.evidence == "emulated"
    assert "SP=1 65536 vs SP2 196608 tokens (3.0×, target ≥ 1.8" in longest.what, longest.what
    assert longest.peak_gib == 61.5  # the longest SP=2 row that trained, its busiest rank
    assert "coarse doubling search" in longest.what  # a file from before the row said how it searched


def test_a_bracketing_search_and_its_allocator_are_shown(tmp_path):
    topo = {"world_size": 2, "devices": 1, "transport": "gloo", "device_type": "cuda", "shared_device": True,
            "memory_fraction_per_rank": 0.5, "note": "-", "allocator": "expandable_segments:True"}
    row = {"check": "longest_row", "model": "qwen2_5vl", "arch_policy": "sm90", "mesh": {"dp": 1, "sp": 2},
           "status": "pass", "evidence": "hardware", "memory_cap_GiB_per_rank": 69.9, "target_ratio": 1.8,
           "ratio_longest_sp_over_sp1": 1.95, "ratio_bounds": [1.87, 2.05],
           "search": "bracketing: --search-start, then doubling until a row does not train, then bisection",
           "sp1": {"longest_that_trains": 180000, "tried": []}, "sp2": {"longest_that_trains": 351000, "tried": []}}
    doc = {"world_size": 2, "gpu": "NVIDIA H200", "evidence": "hardware", "topology": topo, "rows": [row]}
    (tmp_path / "distributed_sp_shared1gpu.json").write_text(json.dumps(doc))
    (tmp_path / "distributed_dp_shared1gpu.json").write_text(json.dumps(
        doc | {"topology": topo | {"allocator": "default"}, "rows": [row | {"search": None}]}))
    rows, problems = distributed.from_benchmarks(tmp_path)
    assert not problems
    by = {r.source: r for r in rows}
    sp, dp = by["distributed_sp_shared1gpu.json"], by["distributed_dp_shared1gpu.json"]
    assert "target ≥ 1.8; bracketing search)" in sp.what, sp.what
    assert sp.topology.endswith(" · gloo · allocator expandable_segments:True")
    assert dp.topology.endswith(" · gloo") and "coarse doubling search" in dp.what


def test_a_reviewed_row_shows_the_review_status_beside_the_recorded_one_and_sp1_from_is_named(tmp_path):
    row = {"check": "longest_row", "model": "qwen2_5vl", "arch_policy": "sm90", "mesh": {"dp": 1, "sp": 2},
           "status": "pass", "evidence": "hardware", "memory_cap_GiB_per_rank": 69.9, "target_ratio": 1.8,
           "ratio_longest_sp_over_sp1": 1.96, "ratio_bounds": [1.8, 2.46], "search": "bracketing: …",
           "sp1": {"longest_that_trains": 169980, "tried": []}, "sp2": {"longest_that_trains": 333656, "tried": []},
           "review": {"status": "inconclusive", "date": "2026-12-03", "why": "a probe ran beside garbage"}}
    later = row | {"arch_policy": "sm70", "review": None, "ratio_bounds": [1.8, None],
                   "sp1_from": {"file": "rec.json", "commit": "e3865a52b57", "date": "2026-12-03T22:00"}}
    doc = {"world_size": 2, "gpu": "NVIDIA H200", "evidence": "hardware", "rows": [row, later]}
    (tmp_path / "distributed_sp_shared1gpu.json").write_text(json.dumps(doc))
    rows, _ = distributed.from_benchmarks(tmp_path)
    by = {r.arch_policy: r for r in rows}
    assert by["sm90"].status == "inconclusive", by["sm90"]
    assert "recorded pass, reviewed 2026-12-03: a probe ran beside garbage" in by["sm90"].what
    assert by["sm70"].status == "pass" and "SP2 333656" in by["sm70"].what  # sp1_from is not an SP=N search
    assert "SP=1's search from rec.json, commit e3865a5" in by["sm70"].what and "at least 1.8×" in by["sm70"].what
