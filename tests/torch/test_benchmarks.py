"""Every benchmark script runs: the CPU-capable ones at their tiny size, the GPU-only ones refuse a CPU clearly.

A benchmark is a client of portvlm's public API; a refactor that breaks one must fail here, not on the GPU host.
Runs on the newest CI stack only (the benchmarks' own stack is newer still): each script costs a process start
(about 2 CI minutes in all, on one stack).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from portvlm.policy import packaged_matrix  # noqa: E402
from portvlm.versions import parse  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NEWEST = max((s.transformers for s in packaged_matrix().ci_cpu_stacks()), key=parse)
pytestmark = pytest.mark.skipif(transformers.__version__ != NEWEST,
                                reason=f"benchmark smokes run on the newest CI stack (transformers {NEWEST})")


def _run(args: list[str], out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# each benchmark that writes JSON, at its tiny size (the fewest rounds / cases / parts that still run every path)
SMOKES = {
    "mla_kv.py": ["benchmarks/mla_kv.py", "--smoke"],
    "vision_attention.py": ["benchmarks/vision_attention.py", "--smoke"],
    "fp16_guard.py": ["benchmarks/fp16_guard.py", "{out}", "--tiny", "--rounds", "1", "--steps", "1"],
    "families_gpu.py": ["benchmarks/families_gpu.py", "--tiny", "--device", "cpu", "--families", "qwen3_5",
                        "--archs", "sm70", "--out", "{out}"],
    "distributed_train.py": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "benchmarks/distributed_train.py",
                             "dp", "--smoke", "--out", "{out}"],
}


@pytest.mark.parametrize("script", sorted(SMOKES))
def test_benchmark_smoke_runs_on_cpu_and_writes_a_benchmark_record(script, tmp_path):
    from portvlm.records import BENCHMARK_SCHEMA, EVIDENCE

    before = _tracked_results()
    proc = _run([a.format(out=tmp_path) for a in SMOKES[script]], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    docs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert docs, f"{script} wrote no JSON under $OUT"
    for doc in docs:  # portvlm.records.BenchmarkRecord: evidence from the policy, a smoke says so
        assert doc["schema"] == BENCHMARK_SCHEMA and doc["evidence"] in EVIDENCE and doc["smoke"] is True, doc
        assert any(n.startswith("smoke:") for n in doc["evidence_notes"]), doc["evidence_notes"]
    assert _tracked_results() == before, "a smoke wrote into benchmarks/results/"


def _tracked_results() -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").glob("*.json")}


@pytest.mark.parametrize("script", ["causal_split.py", "gpu_backend_check.py"])
def test_gpu_only_benchmarks_refuse_a_cpu_by_name(script, tmp_path):
    proc = _run([f"benchmarks/{script}"], tmp_path, timeout=120)
    assert proc.returncode != 0 and "GPU" in (proc.stderr + proc.stdout), proc.stdout[-1000:] + proc.stderr[-2000:]
