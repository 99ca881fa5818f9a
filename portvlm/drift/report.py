"""The drift report: one JSON record and its Markdown reading per run, kept side by side under results/drift/.

Pure apart from :func:`write_report` / :func:`read_reports`. A run never overwrites an earlier report: the file is
named by date and versions, with ``-2``, ``-3`` … when that name is taken. The verdict is ``broken`` when upstream
broke a shim — a CPU cell failed, a shim that applies on the verified stack no longer does (or ``patch`` raised),
or a name portvlm uses is gone — else ``ok``; probe answers that changed without breaking anything are listed, not
counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from portvlm.drift.probe import AnswerChange
from portvlm.drift.symbols import SymbolChange
from portvlm.records import OK_STATUSES, CellResult

SCHEMA = "portvlm.drift-report/1"
DRIFT_DIR = "drift"  # under the results folder
OK, BROKEN = "ok", "broken"


@dataclass(frozen=True)
class Tested:
    """The versions the lane tested, and how it came to them."""

    transformers: str
    torch: str
    python: str
    verified: bool  # inside portvlm.shims.versions.VERIFIED_TRANSFORMERS
    verified_range: str
    transformers_source: str  # the index that listed it, or "forced by --transformers"
    torch_source: str


def first_failure(result: CellResult) -> dict | None:
    """The first check that failed in a cell (suites in run order), or its error; ``None`` for a passing cell."""
    if result.status in OK_STATUSES:
        return None
    for name, suite in result.suites.items():
        if suite.status == "pass" or suite.status == "skipped":
            continue
        bad = next((c for c in suite.checks if not c.ok), None)
        if bad is not None:
            detail = bad.detail or (f"{bad.value} > {bad.bound}" if bad.value is not None else "failed")
            return {"suite": name, "check": bad.name, "detail": _one_line(detail)}
        if suite.error:
            return {"suite": name, "check": None, "detail": _last_line(suite.error)}
    if result.error:
        return {"suite": None, "check": None, "detail": _last_line(result.error)}
    return {"suite": None, "check": None, "detail": f"status {result.status}"}


def cell_summary(result: CellResult) -> dict:
    parity = result.suites.get("parity")
    return {
        "cell": result.cell,
        "model": result.model,
        "status": str(result.status),
        "first_failure": first_failure(result),
        "parity_err": (parity.figures.get("max_abs_err") if parity else None),
        "total_s": result.timings.get("total_s"),
    }


def broken_reasons(cells: Sequence[dict], changes: Iterable[AnswerChange], symbols: Iterable[SymbolChange],
                   probe_errors: Iterable[str] = (), retired: Iterable[str] = ()) -> list[str]:
    """Why upstream broke a shim (empty: it did not).

    ``retired``: shims whose declared range excludes the tested version — their answer changing, or a name only they
    use going away, is what the declaration says, not drift.
    """
    retired = set(retired)
    reasons = [f"probe: {e}" for e in probe_errors]
    for c in cells:
        if c["status"] not in OK_STATUSES:
            f = c["first_failure"] or {}
            where = ": ".join(x for x in (f.get("suite"), f.get("check")) if x)
            reasons.append(f"{c['cell']}: {c['status']}" + (f" at {where}" if where else "")
                           + (f" — {f['detail']}" if f.get("detail") else ""))
    for ch in changes:
        if ch.baseline == "applies" and ch.newest != "applies" and ch.shim not in retired:
            reasons.append(f"shim {ch.shim} on {ch.model}: applies on the verified stack, {ch.newest} here"
                           + (f" ({ch.detail})" if ch.detail else ""))
    for s in symbols:
        only_retired = bool(s.used_at) and all(u.startswith("shim ") and u[5:] in retired for u in s.used_at)
        if s.kind == "missing" and not only_retired:
            reasons.append(f"{s.name} is gone ({s.detail}); used at {', '.join(s.used_at) or '?'}")
    return reasons


def build_report(*, tested_at: str, tested: Tested, baseline: Mapping[str, str] | None, cells: Sequence[CellResult],
                 newest_probe: Mapping, baseline_probe: Mapping | None, changes: Sequence[AnswerChange],
                 symbol_changes: Sequence[SymbolChange], notes: Sequence[str] = (), models: Sequence[str] = (),
                 retired: Sequence[str] = (), installable: Mapping | None = None) -> dict:
    """The report record (JSON-ready)."""
    summaries = [cell_summary(r) for r in cells]
    probe_errors = [f"{side}: {p['error']}" for side, p in (("newest", newest_probe), ("baseline", baseline_probe))
                    if isinstance(p, Mapping) and p.get("error")]
    reasons = broken_reasons(summaries, changes, symbol_changes, probe_errors, retired)
    return {
        "schema": SCHEMA,
        "tested_at": tested_at,
        "status": BROKEN if reasons else OK,
        "broken": reasons,
        "newest": asdict(tested),
        "installable": dict(installable) if installable else None,  # the resolver's answer and the override tried
        "baseline": dict(baseline) if baseline else None,
        "models": list(models),
        "cells": summaries,
        "probe_changes": [asdict(c) for c in changes],
        "symbol_changes": [asdict(s) for s in symbol_changes],
        "retired_shims": sorted(retired),
        "symbols_checked": len((newest_probe or {}).get("symbols", {}) or {}),
        "probes": {"newest": (newest_probe or {}).get("shims", {}),
                   "baseline": (baseline_probe or {}).get("shims", {}) if baseline_probe else {}},
        "notes": list(notes),
    }


def verdict_line(report: Mapping) -> str:
    """One line: versions, verified or not, and the verdict."""
    new = report["newest"]
    ver = "verified" if new["verified"] else f"unverified; portvlm verifies {new['verified_range']}"
    inst = report.get("installable") or {}
    if inst and not inst.get("ok"):
        tried = ", ".join(f"{o['package']} {'left out' if o['install'] == 'none' else 'as ' + o['install']}"
                          for o in inst.get("overrides", ())) or "no override"
        ver += f"; {inst['line']}; ran with {tried}"
    return (f"transformers {new['transformers']} ({ver}) + torch {new['torch']}: "
            + ("no shim broke" if report["status"] == OK else f"{len(report['broken'])} problem(s): upstream broke a shim"))


def render_markdown(report: Mapping) -> str:
    """The Markdown reading of a report."""
    new, base = report["newest"], report.get("baseline")
    lines = [
        f"# Upstream drift: transformers {new['transformers']}, torch {new['torch']}",
        "",
        f"Tested {report['tested_at']} by `nox -s drift` (portvlm.drift). **Status: {report['status']}** — "
        f"{verdict_line(report)}.",
        "",
        "| | newest (tested) | verified baseline |",
        "|---|---|---|",
        f"| transformers | {new['transformers']} ({'verified' if new['verified'] else 'unverified'}; from "
        f"{new['transformers_source']}) | {base['transformers'] if base else '—'} |",
        f"| torch | {new['torch']} (from {new['torch_source']}) | {base['torch'] if base else '—'} |",
        f"| python | {new['python']} | {base.get('python', '—') if base else '—'} |",
        f"| stack | — | {('`' + base['stack'] + '`') if base else 'none older than the tested version'} |",
        "",
    ]
    inst = report.get("installable") or {}
    if inst and not inst.get("ok"):
        lines += ["## Installability", "", f"**{_md(inst['line'])}.**", ""]
        lines += [f"- tried with the override `{o['pin']}` → install: {o['install']} "
                  f"({'declared in matrix.yaml' if o.get('declared') else 'suggested, not declared'}): {_md(o['reason'])}"
                  for o in inst.get("overrides", ())] or ["- no override to try: the resolver named no single pin"]
        if inst.get("declare"):
            lines += [f"- to declare it: `{inst['declare']}`"]
        lines.append("")
    lines += [
        "## What broke",
        "",
    ]
    lines += [f"- {_md(r)}" for r in report["broken"]] or ["Nothing: every CPU cell passed, no shim lost its answer, "
                                                          "no upstream name portvlm uses is gone."]
    lines += ["", "## CPU cells (first failing check)", "",
              "| cell | status | first failure | parity err | time |", "|---|---|---|---|---|"]
    for c in report["cells"]:
        f = c["first_failure"]
        ff = "—" if not f else ": ".join(x for x in (f.get("suite"), f.get("check"), f.get("detail")) if x)
        err = "—" if c["parity_err"] is None else f"{c['parity_err']:.1e}"
        t = "—" if c["total_s"] is None else f"{c['total_s']:.0f} s"
        lines.append(f"| `{c['cell']}` | {c['status']} | {_md(ff)} | {err} | {t} |")
    if not report["cells"]:
        lines.append("| (no cells ran) | | | | |")
    lines += ["", "## Shim probes that changed their answer (verified baseline → newest)", ""]
    if report["probe_changes"]:
        lines += ["| model | shim | baseline | newest | newest says |", "|---|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['shim']} | {_md(c['baseline'])} | {_md(c['newest'])} | {_md(c['detail'])} |"
                  for c in report["probe_changes"]]
    else:
        lines.append("None: every shim gives the same answer for every model as on the verified baseline.")
    lines += ["", f"## Upstream symbols that moved ({report['symbols_checked']} checked)", ""]
    if report["symbol_changes"]:
        lines += ["| symbol | change | detail | used at |", "|---|---|---|---|"]
        lines += [f"| `{s['name']}` | {s['kind']} | {_md(s['detail'])} | {_md(', '.join(s['used_at']))} |"
                  for s in report["symbol_changes"]]
    else:
        lines.append("None: every name portvlm uses that the verified baseline has is still there, in the same "
                     "module, with the same parameters.")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {_md(n)}" for n in report["notes"]]
    lines += ["", f"Reproduce: `nox -s drift -- --transformers {new['transformers']} --torch {new['torch']}"
              + (f" --models {','.join(report['models'])}" if report.get("models") else "") + "`", ""]
    return "\n".join(lines)


def report_name(report: Mapping) -> str:
    """``2026-12-02-tf5.24.0-torch2.13.0+cpu`` (no extension)."""
    new = report["newest"]
    return f"{report['tested_at'][:10]}-tf{new['transformers']}-torch{new['torch']}"


def write_report(report: Mapping, results_dir: str | Path, *, redact: Mapping[str, str] | None = None) -> Path:
    """Write ``<results>/drift/<name>.json`` and ``.md``, never over an earlier report; returns the JSON path.

    ``redact``: ``{this machine's path: placeholder}`` (default ``run.env.local_paths()``) applied to the text.
    """
    from portvlm.run.env import redact_paths

    folder = Path(results_dir) / DRIFT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, ensure_ascii=False, default=str)
    text = redact_paths(text, redact)
    data = json.loads(text)
    base, n = report_name(data), 1
    while (folder / f"{base}{'' if n == 1 else f'-{n}'}.json").exists():
        n += 1
    stem = f"{base}{'' if n == 1 else f'-{n}'}"
    (folder / f"{stem}.json").write_text(text + "\n", encoding="utf-8")
    (folder / f"{stem}.md").write_text(render_markdown(data), encoding="utf-8")
    return folder / f"{stem}.json"


def read_reports(results_dir: str | Path) -> tuple[list[tuple[Path, dict]], list[str]]:
    """Every drift report under ``<results>/drift/``, oldest first, and the files that could not be read (why)."""
    folder = Path(results_dir) / DRIFT_DIR
    out, problems = [], []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{DRIFT_DIR}/{path.name}: unreadable drift report ({type(exc).__name__})")
            continue
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            problems.append(f"{DRIFT_DIR}/{path.name}: not a {SCHEMA} record")
            continue
        out.append((path, data))
    out.sort(key=lambda pd: (str(pd[1].get("tested_at", "")), len(pd[0].stem), pd[0].stem))  # "-2" after its base
    return out, problems


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _md(text: Any) -> str:
    return _one_line(text).replace("|", "\\|")
