"""Publish results: SUPPORT.md, a static site/index.html and per-platform badges, all generated.

    results/<cell>.json + matrix.yaml → table.build_table() → SUPPORT.md, site/index.html, site/badges/*

Every expanded cell of the matrix appears, run or not. Unreadable results are noted, never fatal. The output
is deterministic: the same results and matrix give byte-identical files (no timestamps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from portvlm.publish.badges import UPSTREAM_LABEL, box_geometry, endpoint, svg_geometry, upstream_endpoint
from portvlm.publish.table import (
    EVIDENCE_STYLE,
    PLATFORMS,
    STATUS_STYLE,
    Slot,
    Table,
    build_table,
    format_kv,
    format_number,
    format_seconds,
    format_step,
    read_results,
)

__all__ = ["publish", "build_table", "read_results", "PLATFORMS"]

TEMPLATES = Path(__file__).parent / "templates"


def publish(results_dir="results", matrix=None, out_dir=".") -> dict[str, Path]:
    """Write SUPPORT.md, site/index.html, site/results/*.json and site/badges/*; return {relative name: path}."""
    return write_all(results_dir, matrix, out_dir)[0]


def write_all(results_dir="results", matrix=None, out_dir=".") -> tuple[dict[str, Path], Table]:
    """publish(), also returning the table it rendered (the CLI reports from it)."""
    matrix = _matrix(matrix)
    from portvlm.matrix import expand

    results_dir, out_dir = Path(results_dir), Path(out_dir)
    loaded = read_results(results_dir)
    table = build_table(expand(matrix), loaded, archs=tuple(a.id for a in matrix.archs),
                        stacks=tuple(s.id for s in matrix.stacks))
    from portvlm.publish import families as _families
    from portvlm.publish import upstream as _upstream

    newest, drift_json, drift_problems = _upstream.latest(results_dir)
    sweep, sweep_problems = _families.latest(results_dir)
    if drift_problems or sweep_problems:
        table = dataclasses.replace(table, problems=table.problems + tuple(drift_problems) + tuple(sweep_problems))
    context = {
        "table": table,
        "matrix_name": Path(getattr(matrix, "path", "matrix.yaml") or "matrix.yaml").name,
        "results_name": results_dir.name or "results",
        "status_style": STATUS_STYLE,
        "evidence_style": EVIDENCE_STYLE,
        "distributed": _distributed(loaded, results_dir),
        "upstream": newest,
        "families": sweep,
    }
    env = _jinja_env()
    link = Path(os.path.relpath(results_dir, out_dir)).as_posix()
    env.globals["md_slot"] = lambda slot: md_slot(slot, link)
    env.globals["results_link"] = link

    site = out_dir / "site"
    written: dict[str, Path] = {}

    def write(name: str, text: str) -> None:
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        written[name] = path

    write("SUPPORT.md", env.get_template("support.md.j2").render(context))
    write("site/index.html", env.get_template("index.html.j2").render(context))
    for summary in table.platforms:
        write(f"site/badges/{summary.platform}.json", json.dumps(endpoint(summary), indent=2, ensure_ascii=False) + "\n")
        write(f"site/badges/{summary.platform}.svg", env.get_template("badge.svg.j2").render(b=svg_geometry(summary)))
    write("site/badges/upstream.json", json.dumps(upstream_endpoint(newest), indent=2, ensure_ascii=False) + "\n")
    write("site/badges/upstream.svg", env.get_template("badge.svg.j2").render(
        b=box_geometry(UPSTREAM_LABEL, newest.message, newest.color)))
    write("site/badges/families.json", json.dumps(_families.endpoint(sweep), indent=2, ensure_ascii=False) + "\n")
    write("site/badges/families.svg", env.get_template("badge.svg.j2").render(
        b=box_geometry(_families.BADGE_LABEL, sweep.message, sweep.color)))
    from portvlm.publish import readme

    if readme.update(out_dir / "README.md", matrix):  # the README's matrix numbers (only where it has the markers)
        written["README.md"] = out_dir / "README.md"
    written.update(_copy_results(table, loaded.files, site / "results"))
    written.update(_copy_drift(drift_json, site / "drift"))
    return written, table


def _copy_drift(report_json: Path | None, target: Path) -> dict[str, Path]:
    """The latest drift report (JSON + Markdown) beside the page, so the upstream row's link resolves there."""
    if target.is_dir():
        for old in sorted(target.iterdir()):
            if report_json is None or old.stem != report_json.stem:
                old.unlink()
    out = {}
    for src in (report_json, report_json.with_suffix(".md")) if report_json is not None else ():
        if src.exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target / src.name)
            out[f"site/drift/{src.name}"] = target / src.name
    return out


def _distributed(loaded, results_dir: Path) -> list:
    """The distributed section's rows: the cells' sp checks, then the GPU benchmarks beside the results."""
    from portvlm.publish import distributed

    bench, _ = distributed.from_benchmarks(results_dir.resolve().parent / "benchmarks" / "results")
    return distributed.group_rows(distributed.from_cells(loaded.by_cell) + bench)


def _copy_results(table: Table, files: dict[str, Path], target: Path) -> dict[str, Path]:
    """Copy each shown result next to the page (so every cell link resolves); drop copies of stale ones."""
    target.mkdir(parents=True, exist_ok=True)
    shown = {s.cell_id for s in table.slots if s.has_result}
    for old in sorted(target.glob("*.json")):
        if old.stem not in shown:
            old.unlink()
    out = {}
    for cell_id in sorted(shown):
        dest = target / f"{cell_id}.json"
        shutil.copyfile(files[cell_id], dest)
        out[f"site/results/{cell_id}.json"] = dest
    return out


def _matrix(matrix):
    """A Matrix as given, or loaded from a path (None: the packaged one)."""
    if matrix is not None and not isinstance(matrix, (str, os.PathLike)):
        return matrix
    from portvlm.matrix import load_matrix

    return load_matrix(matrix)


def _jinja_env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2", "svg.j2"), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters.update(md=md_escape, num=format_number, secs=format_seconds, step=format_step, kv=format_kv, slug=lambda s: s.replace(" ", "-"))
    return env


def md_escape(text) -> str:
    """Text safe inside a Markdown table cell: one line, no pipes, no raw HTML."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def md_slot(slot: Slot | None, link: str) -> str:
    """One Markdown table cell: status (linked to its result) · evidence · numbers · reason."""
    if slot is None:
        return ""
    icon = STATUS_STYLE[slot.status]["icon"]
    ev = EVIDENCE_STYLE[slot.evidence]
    head = f"[{icon} {slot.status}]({link}/{slot.cell_id}.json)" if slot.has_result else f"{icon} {slot.status}"
    parts = [f"{head} {ev['glyph']} {ev['short']}"]
    if slot.has_result:
        parts.append(f"err {format_number(slot.parity_err)} · step {format_step(slot)}")
        if slot.kv_bytes is not None:
            parts.append(format_kv(slot.kv_bytes))
    if slot.reason and slot.status != "pass":
        parts.append(md_escape(slot.reason))
    return "<br>".join(parts)
