"""Every benchmark script runs: the CPU-capable ones at their tiny size, the GPU-only ones refuse a CPU clearly.

A benchmark is a client of portvlm's public API; a refactor that breaks one must fail here, not on the GPU host.
Runs on the newest CI stack only (the benchmarks' own stack is newer still): each script costs a process start.
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


@pytest.mark.parametrize("script", ["mla_kv.py", "vision_attention.py"])
def test_benchmark_smoke_runs_on_cpu(script, tmp_path):
    proc = _run([f"benchmarks/{script}", "--smoke"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    docs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert docs, f"{script} --smoke wrote no JSON under $OUT"


@pytest.mark.parametrize("script", ["causal_split.py", "gpu_backend_check.py"])
def test_gpu_only_benchmarks_refuse_a_cpu_by_name(script, tmp_path):
    proc = _run([f"benchmarks/{script}"], tmp_path, timeout=120)
    assert proc.returncode != 0 and "GPU" in (proc.stderr + proc.stdout), proc.stdout[-1000:] + proc.stderr[-2000:]
