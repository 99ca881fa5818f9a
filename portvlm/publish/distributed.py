"""The support table's distributed section: one row per measured (arch policy, DP×SP, model) from the cells'
``sp`` checks (CPU, gloo) and the GPU benchmarks' JSON (``benchmarks/distributed_train.py``, world size and
evidence recorded in each file). Smoke runs (``*_smoke.json``) are tiny-config plumbing checks, never shown."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DistRow:
    arch_policy: str
    mesh: str  # "DP×SP"
    model: str
    status: str
    evidence: str
    tokens_per_s: float | None
    peak_gib: float | None
    what: str
    source: str


def _mesh(m: dict | None, world: int | None) -> str:
    if m:
        return f"{m.get('dp', 1)}×{m.get('sp', 1)}"
    return f"{world or '?'}×1"


def from_cells(by_cell: dict) -> list[DistRow]:
    """Rows from the cells' training-suite ``sp`` figures (``CellResult`` values)."""
    rows = []
    for cell, result in sorted(by_cell.items()):
        suite = result.suites.get("training") if isinstance(result.suites, dict) else None
        fig = (getattr(suite, "figures", None) or {}).get("sp") if suite is not None else None
        if not isinstance(fig, dict):
            continue
        check = next((c for c in suite.checks if c.name.startswith("sp.")), None)
        status = "pass" if check is not None and check.ok else "fail"
        what = ("SP=2 vs one process: loss + every gradient + SGD step" if not fig.get("not_applicable")
                else f"DP=2 vs union ({fig['not_applicable'].split(';')[0]})")
        rows.append(DistRow(result.arch, _mesh(fig.get("mesh"), None), result.model, status, "gloo (CPU)", None, None,
                            f"{what}; {result.stack.get('id', '') if isinstance(result.stack, dict) else ''}", cell))
    return rows


def from_benchmarks(directory: Path) -> tuple[list[DistRow], list[str]]:
    """Rows from ``distributed_*.json`` / ``fsdp2_*.json`` in ``directory``; problems as text."""
    rows, problems = [], []
    if not directory.is_dir():
        return rows, problems
    for path in sorted(directory.glob("*.json")):
        if not path.name.startswith(("distributed_", "fsdp2_")) or path.stem.endswith("_smoke"):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: unreadable ({type(exc).__name__})")
            continue
        world = doc.get("world_size")
        gpu = doc.get("gpu", "?")
        body = doc.get("result") or {}
        for r in doc.get("rows") or []:  # dp / fsdp2_train rows
            status = r.get("status") or ("pass" if r.get("ok") else "fail")
            evidence = r.get("evidence") or _evidence(r.get("arch_policy", ""), gpu, doc.get("evidence", "?"))
            what = ("same batch on every rank: losses vs one process (fsdp2_train.py)" if "mesh" not in r
                    else "different rows per rank: loss + parameters after a step vs one process on the union"
                    if (world or 1) > 1 else "world size 1 (FSDP2 plumbing on one GPU): loss + parameters after a "
                    "step vs one unsharded process")
            rows.append(DistRow(r.get("arch_policy", "?"), _mesh(r.get("mesh"), world), r.get("model", "?"), status,
                                evidence, None, r.get("peak_GiB", r.get("fsdp_peak_GiB")), f"{gpu}; {what}", path.name))
        for key, run in (body.get("runs") or {}).items():  # size
            rows.append(DistRow(run.get("arch_policy", "?"), _mesh(body.get("mesh"), world), body.get("model", "?"),
                                run.get("status", "?"), run.get("evidence", doc.get("evidence", "?")),
                                run.get("tokens_per_s"), run.get("peak_GiB"), f"{gpu}; {key}", path.name))
        if body.get("longest_row_that_trains") is not None or "status" in body:  # sp
            search = body.get("search") or [{}]
            last = next((s for s in reversed(search) if s.get("trains")), search[-1])  # the longest that trained
            longest = body.get("longest_row_that_trains")
            if longest is not None and all(s.get("trains") for s in search):
                longest = f"≥ {longest} (the largest tried; none failed)"
            rows.append(DistRow(body.get("arch_policy", "?"), _mesh(body.get("mesh"), world), body.get("model", "?"),
                                body.get("status", "?"), body.get("evidence", "?"), None, last.get("peak_GiB"),
                                f"{gpu}; SP vs SP=1 loss on {body.get('row_tokens')} tokens; longest row that trains "
                                f"{longest}", path.name))
    return rows, problems


def _evidence(policy: str, gpu: str, recorded: str) -> str:
    """Older files record one evidence per file: the sm70 policy off a V100 is emulated, whatever the file says."""
    return "emulated" if policy == "sm70" and "V100" not in gpu and recorded == "hardware" else recorded
