"""What every benchmark that writes JSON builds its record from: the environment, the policy's evidence, the suites'
tolerances, and one writer (rank 0, atomic, into ``$OUT`` and ``benchmarks/results/``).

    from portvlm.testing import benchmark

    rec = benchmark.record("causal_split", archs=["sm70"], device=device, heads=28)
    rec.tolerances["fwd"] = benchmark.tolerance("sm70", device, torch.float16, "fwd")
    rec.rows.append(row); benchmark.write(rec, "causal_split.json")   # as often as rows come: a cut run keeps them

Nothing here imports torch until a function is called.
"""

from __future__ import annotations

import datetime
import json
import os
import platform as _platform
from pathlib import Path

from portvlm.records import EVIDENCE_RANK, BenchmarkRecord, Evidence

# benchmarks/results/ of this checkout (where the published table reads GPU figures), found from this file
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SMOKE_NOTE = "smoke: tiny sizes, a wiring check; the figures say nothing about speed or the real widths"


def environment(device=None) -> dict:
    """torch, transformers, python, the device type, the GPU's name (None on the CPU) and the portvlm commit."""
    import torch

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    kind = getattr(device, "type", device) or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device if getattr(device, "type", None) == "cuda" else 0) if kind == "cuda" else None
    from portvlm.versions import source_revision

    return {"torch": torch.__version__, "transformers": tf, "python": _platform.python_version(), "device": kind,
            "gpu": gpu, "commit": source_revision()}


def evidence(archs, *, matrix=None) -> tuple[Evidence, list[str], dict[str, str]]:
    """``(weakest evidence, notes, {arch: evidence})`` of running ``archs``' policies on this host, as
    ``portvlm.resolve_policy`` matches it (``hardware`` on the arch itself; ``emulated`` elsewhere, with why)."""
    from portvlm.policy import resolve_policy

    per, notes = {}, []
    for arch in archs:
        policy = resolve_policy(arch, matrix=matrix)
        per[arch] = policy.host.evidence_for(arch)
        if policy.emulation:
            notes.append(policy.emulation)
    if not per:
        return Evidence.NONE, ["no portvlm policy ran"], per
    return min(per.values(), key=EVIDENCE_RANK.__getitem__), notes, {k: str(v) for k, v in per.items()}


def tolerance(arch: str, dtype, direction: str = "fwd", backend: str | None = None, *, device=None,
              matrix=None) -> dict:
    """The suites' ``(atol, rtol)`` for ``arch``'s policy run here, as ``{"atol", "rtol", "device_kind"}``: an
    emulated policy is held to the device it runs on (its kernels round as the host's do); ``device``: where the
    benchmark actually computes, when not the host's GPU (a CPU smoke on a GPU host)."""
    from portvlm.policy import resolve_policy
    from portvlm.testing import tolerances

    host = resolve_policy(arch, matrix=matrix).host
    kind_of = getattr(device, "type", device) or ("cpu" if host.vendor == "cpu" else "cuda")
    kind = tolerances.device_kind(host.device or "cpu", kind_of)
    atol, rtol = tolerances.tolerance(kind, dtype, backend, direction)
    return {"atol": atol, "rtol": rtol, "device_kind": kind}


def loss_tolerance(dtype) -> dict:
    """The suites' ``(atol, rtol)`` for scalar losses in ``dtype``, as ``{"atol", "rtol"}``."""
    from portvlm.testing import tolerances

    atol, rtol = tolerances.loss_tolerance(dtype)
    return {"atol": atol, "rtol": rtol}


def record(name: str, *, archs=(), device=None, smoke: bool = False, world_size: int = 1, topology=None,
           matrix=None, **figures) -> BenchmarkRecord:
    """A ``BenchmarkRecord`` for benchmark ``name`` running ``archs``' policies here; ``figures`` go in its header."""
    ev, notes, per = evidence(archs, matrix=matrix)
    if smoke:
        notes.append(SMOKE_NOTE)
    if topology is not None and getattr(topology, "note", None):
        notes.append(topology.note)
    if per:
        figures = {"policies": per, **figures}
    return BenchmarkRecord(
        benchmark=name, evidence=str(ev), evidence_notes=notes, environment=environment(device), smoke=smoke,
        world_size=world_size, topology=topology.as_dict() if hasattr(topology, "as_dict") else topology,
        figures=figures, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def write(rec: BenchmarkRecord, filename: str, *, path=None, out_dir=None, results: bool | None = None,
          rank: int = 0) -> list[Path]:
    """Write ``rec`` (rank 0 only; atomically: a reader never sees half a file) as ``filename`` into ``out_dir``
    (default ``$OUT``) and into ``benchmarks/results/`` unless a smoke (``results`` overrides); ``path``: one
    explicit file (a ``--out`` argument) in place of ``benchmarks/results/``. The paths written."""
    if rank:
        return []
    out_dir = out_dir if out_dir is not None else os.environ.get("OUT")
    targets = [Path(out_dir) / filename] if out_dir else []
    if path is not None:
        targets.append(Path(path))
    elif results if results is not None else not rec.smoke:
        targets.append(RESULTS / filename)
    text = json.dumps(rec.to_json(), indent=1, default=str)
    written = []
    for target in dict.fromkeys(t.resolve() for t in targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        written.append(target)
    return written
