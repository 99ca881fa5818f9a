"""The support table's distributed section: one row per measured (arch policy, DP×SP, model) from the cells'
``sp`` checks (CPU, gloo) and the GPU benchmarks' JSON (``benchmarks/distributed_train.py``, world size and
evidence recorded in each file), each with its topology: ranks, devices, transport — and, for shared-device runs
(every rank on one GPU over gloo, issue 23), that their times are not NCCL times. Smoke runs (``*_smoke.json``)
are tiny-config plumbing checks, never shown."""

from __future__ import annotations

import json
import re
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
    topology: str = "—"  # "2 ranks · 1 GPU (shared) · gloo"


# The section's columns: (header, DistRow attribute).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("arch policy", "arch_policy"), ("DP×SP", "mesh"), ("topology", "topology"), ("model", "model"), ("status", "status"),
    ("evidence", "evidence"), ("tokens/s", "tokens_per_s"), ("peak GiB/rank", "peak_gib"), ("what", "what"),
    ("source", "source"),
)
CELLS_GROUP = "the CPU cells' training suite (sp check, gloo)"


@dataclass(frozen=True)
class DistGroup:
    """Rows from one source (a benchmark file, or the cells): what all of them share is said once, above a table
    of the columns that differ (a sentence is never repeated on every row)."""

    title: str
    shared: tuple[tuple[str, str], ...]  # (header, value) true of every row
    columns: tuple[str, ...]  # headers of the columns that differ between rows
    rows: tuple[tuple[str, ...], ...]


def _text(value) -> str:
    return "—" if value is None else str(value)


def group_rows(rows: list[DistRow]) -> list[DistGroup]:
    """Pure: ``rows`` grouped by source in first-seen order; a column equal on every row of a group moves into
    the group's ``shared`` line (for a group of one row, everything but the figures is shared)."""
    groups: dict[str, list[DistRow]] = {}
    for row in rows:
        groups.setdefault(row.source if row.source.endswith(".json") else CELLS_GROUP, []).append(row)
    out = []
    for title, members in groups.items():
        values = {header: [_text(getattr(r, attr)) for r in members] for header, attr in COLUMNS
                  if not (header == "source" and title.endswith(".json"))}
        figures = ("status", "tokens/s", "peak GiB/rank")  # always in the table, even when equal
        shared = tuple((h, v[0]) for h, v in values.items() if h not in figures and len(set(v)) == 1)
        columns = tuple(h for h in values if h not in dict(shared))
        table = tuple(tuple(values[h][i] for h in columns) for i in range(len(members)))
        out.append(DistGroup(title, shared, columns, table))
    return out


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
        mesh = fig.get("mesh") or {}
        ranks = int(mesh.get("dp", 1)) * int(mesh.get("sp", 1))
        rows.append(DistRow(result.arch, _mesh(fig.get("mesh"), None), result.model, status, "gloo (CPU)", None, None,
                            f"{what}; {result.stack.get('id', '') if isinstance(result.stack, dict) else ''}", cell,
                            f"{ranks} ranks · CPU · gloo"))
    return rows


def topology_text(doc: dict) -> str:
    """``"2 ranks · 1 GPU (shared) · gloo"`` from a benchmark file's ``topology`` (older files: one GPU per rank)."""
    topo = doc.get("topology")
    world = doc.get("world_size") or 1
    if not isinstance(topo, dict):
        gpu = doc.get("gpu", "?")
        return f"{world} rank{'s' if world != 1 else ''} · " + (
            "CPU · gloo" if gpu == "cpu" else f"{world} GPU{'s' if world != 1 else ''} · nccl")
    n = topo.get("world_size", world)
    devices = topo.get("devices")
    where = "CPU" if topo.get("device_type") == "cpu" else f"{devices} GPU{'s' if devices != 1 else ''}"
    if topo.get("shared_device"):
        where += " (shared; times are not NCCL times)"
    text = f"{n} rank{'s' if n != 1 else ''} · {where} · {topo.get('transport', '?')}"
    # a longest-row figure depends on the allocator (expandable segments or fragmentation): shown when not the default
    return text + (f" · allocator {topo['allocator']}" if topo.get("allocator") not in (None, "default") else "")


def _check_what(r: dict) -> str:
    """One line on what a benchmark row (``check``) measured, with its figure."""
    check = r.get("check")
    if r.get("error"):  # a row that failed before its figures: say why, never a row of None
        return f"{check}{' (' + r['row'] + ' row)' if r.get('row') else ''}: failed — {r['error'][:200]}"
    if check == "dp_vs_union":
        return (f"different rows per rank: loss, every gradient and the SGD step vs one process on the union (worst "
                f"gradient {_g(r.get('grad_ratio'))} of its allowance)")
    if check == "sp_vs_sp1":
        what = (f"SP vs SP=1 on {r.get('row_tokens')} tokens, {r.get('row_images')} images cut at the rank boundary: "
                f"loss Δ {_g(r.get('loss_abs_err'))}, worst gradient {_g(r.get('grad_ratio'))} of its allowance")
        if r.get("negative_control"):
            what = f"negative control ({r['negative_control']}): must fail the same check — {what}"
        return what
    if check == "grad_scaler_skip":
        return (f"fp16 mixed precision + GradScaler, inf in rank {r.get('planted_rank')}'s gradients: skipped on ranks "
                f"{r.get('skipped_on_ranks')}, scale {r.get('scales')}")
    if check == "fp16_row_vs_fp32":
        shape = f"{r['images']} images" if "images" in r else f"a {r.get('video_frames')}-frame video"
        return (f"fp16 on {shape} ({r.get('row_tokens')} tokens): loss {_g(r.get('loss'))} vs fp32 "
                f"{_g(r.get('fp32_reference_loss'))}")
    if check == "sp_loss":
        if r.get("loss_abs_err") is None:
            return f"SP vs SP=1 loss: {r.get('status', 'not run')} — {r.get('reason') or 'no figure recorded'}"
        return f"SP vs SP=1 loss on {r.get('row_tokens')} tokens: Δ {_g(r.get('loss_abs_err'))}"
    if check == "longest_row":
        sp_key = _sp_key(r)
        a = (r.get("sp1") or {}).get("longest_that_trains")
        b = (r.get(sp_key) or {}).get("longest_that_trains") if sp_key else None
        lower, upper = r.get("ratio_bounds") or (None, None)
        bounds = (f", between {lower}× and {upper}×" if lower is not None and upper is not None
                  else f", at least {lower}×" if lower is not None else f", at most {upper}×" if upper is not None
                  else "")
        src = r.get("sp1_from")
        sp1 = (f" (SP=1's search from {src.get('file')}, commit {str(src.get('commit'))[:7]}, {src.get('date')})"
               if src else "")
        return (f"longest row that trains at {r.get('memory_cap_GiB_per_rank')} GiB/rank: SP=1 {a}{sp1} vs "
                f"{(sp_key or 'sp?').upper()} {b} tokens ({r.get('ratio_longest_sp_over_sp1')}×"
                + (f"{bounds} by the searches' bounds" if bounds else "")
                + f", target ≥ {r.get('target_ratio')}; {_search_kind(r)})"
                + (f"; {r['reason']}" if r.get("reason") else ""))
    return str(check or "?")


def _sp_key(r: dict) -> str | None:
    """The SP=N search of a longest_row row (``sp2``, ``sp4``…; not ``sp1``, not ``sp1_from``)."""
    return next((k for k in r if re.fullmatch(r"sp\d+", k) and k != "sp1" and isinstance(r[k], dict)), None)


def _search_kind(r: dict) -> str:
    """How a longest-row row searched: the first word of its ``search`` text (files before it: coarse doubling)."""
    kind = str(r.get("search") or "coarse").split(":")[0].strip()
    return "coarse doubling search" if kind == "coarse" else f"{kind} search"


def _g(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _peak(r: dict):
    if r.get("check") == "longest_row":
        sp_key = _sp_key(r)
        tried = [t for t in ((r.get(sp_key) or {}).get("tried") or []) if t.get("trains")]
        peaks = [p for p in (tried[-1].get("peak_GiB_per_rank") or []) if p is not None] if tried else []
        return max(peaks) if peaks else None
    return r.get("peak_GiB", r.get("fsdp_peak_GiB"))


def from_benchmarks(directory: Path) -> tuple[list[DistRow], list[str]]:
    """Rows from ``distributed_*.json`` (``portvlm.records.BenchmarkRecord`` files, and older headers) in
    ``directory``; problems as text."""
    rows, problems = [], []
    if not directory.is_dir():
        return rows, problems
    for path in sorted(directory.glob("*.json")):
        if not path.name.startswith("distributed_") or path.stem.endswith("_smoke"):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: unreadable ({type(exc).__name__})")
            continue
        world = doc.get("world_size")
        gpu = doc.get("gpu", "?")
        topo = topology_text(doc)
        body = doc.get("result") or {}
        for r in doc.get("rows") or []:  # every part's rows (dp, grads, scaler, fp16rows, sp)
            if r.get("check", "").startswith("size/"):
                continue  # shown from the size result below
            status = r.get("status") or ("pass" if r.get("ok") else "fail")
            evidence = r.get("evidence") or _evidence(r.get("arch_policy", ""), gpu, doc.get("evidence", "?"))
            if "check" in r:
                what = _check_what(r)
            else:
                what = ("different rows per rank: loss + parameters after a step vs one process on the union"
                        if (world or 1) > 1 else "world size 1 (FSDP2 plumbing on one GPU): loss + parameters after a "
                        "step vs one unsharded process")
            review = r.get("review")  # a flaw found after the run: the recorded status stays, the table shows this
            if review:
                what += f" — recorded {status}, reviewed {review.get('date', '?')}: {review.get('why', '')}"
                status = review.get("status", status)
            rows.append(DistRow(r.get("arch_policy", "?"), _mesh(r.get("mesh"), world), r.get("model", "?"), status,
                                evidence, None, _peak(r), f"{gpu}; {what}", path.name, topo))
        for key, run in (body.get("runs") or {}).items():  # size
            rows.append(DistRow(run.get("arch_policy", "?"), _mesh(body.get("mesh"), world), body.get("model", "?"),
                                run.get("status", "?"), run.get("evidence", doc.get("evidence", "?")),
                                run.get("tokens_per_s"), run.get("peak_GiB"), f"{gpu}; {key}", path.name, topo))
        if body.get("longest_row_that_trains") is not None or "status" in body:  # sp (files before the rows format)
            search = body.get("search") or [{}]
            last = next((s for s in reversed(search) if s.get("trains")), search[-1])  # the longest that trained
            longest = body.get("longest_row_that_trains")
            if longest is not None and all(s.get("trains") for s in search):
                longest = f"≥ {longest} (the largest tried; none failed)"
            rows.append(DistRow(body.get("arch_policy", "?"), _mesh(body.get("mesh"), world), body.get("model", "?"),
                                body.get("status", "?"), body.get("evidence", "?"), None, last.get("peak_GiB"),
                                f"{gpu}; SP vs SP=1 loss on {body.get('row_tokens')} tokens; longest row that trains "
                                f"{longest}", path.name, topo))
    return rows, problems


def _evidence(policy: str, gpu: str, recorded: str) -> str:
    """Older files record one evidence per file: the sm70 policy off a V100 is emulated, whatever the file says."""
    return "emulated" if policy == "sm70" and "V100" not in gpu and recorded == "hardware" else recorded
