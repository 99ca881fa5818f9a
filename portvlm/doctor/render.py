"""The one-screen text form of a :class:`Report`: coloured through rich on a terminal, plain otherwise.

Lines are lists of ``(text, style)`` segments so the plain and the rich renderings cannot drift apart.
"""

from __future__ import annotations

import sys
from typing import TextIO

from portvlm.doctor.report import BackendChoice, Report
from portvlm.platform import sm_name
from portvlm.records import CheckStatus

Segment = tuple[str, str | None]
STYLE = {CheckStatus.OK: "green", CheckStatus.INFO: "cyan", CheckStatus.WARN: "yellow", CheckStatus.FAIL: "bold red",
         "OK": "bold green", "WARN": "bold yellow", "FAIL": "bold red"}
MAX_REASON = 70  # kept for callers; lines are wrapped at print time, never cut mid-word


def _short(text: str, limit: int = MAX_REASON) -> str:
    """``text`` on one line. Never cut: a long line wraps at word boundaries when printed (``plain``, rich)."""
    return " ".join(str(text).split())


def _backend(choice: BackendChoice | None) -> list[Segment]:
    if choice is None:
        return [("—", None)]
    if choice.chosen is None:
        first = next((r[0] for r in choice.lost.values() if r), choice.error or "?")
        return [("none", "red"), (f" ({_short(first, 90)})", "dim")]
    out: list[Segment] = [(choice.chosen, "bold")]
    losers = [(n, r) for n, r in choice.lost.items() if not (r and r[0].startswith("usable, ranked below"))]
    if losers:
        out.append(("; lost: " + "; ".join(f"{n}: {_short(r[0] if r else '?', 48)}" for n, r in losers), "dim"))
    return out


def lines(report: Report) -> list[list[Segment]]:
    """The report as styled lines (≈ 30-40 for three families)."""
    env, p, t = report.env, report.env.platform, report.env.torch
    out: list[list[Segment]] = []
    out.append([("portvlm doctor ", "bold"), (env.portvlm, None), ("  verdict ", None),
                (report.verdict, STYLE[report.verdict]), ("  (schema portvlm.doctor/1; --json for all fields)", "dim")])
    s = env.system
    out.append([("system  ", "bold"), (f"{s.os or '?'} · Python {s.python or '?'} · {s.cpu or '?'}"
                                       f" ×{s.cpu_count or '?'}", None)])
    if p.is_gpu:
        cap = sm_name(p.capability) if p.capability else (p.gfx or "?")
        mem = f" · {p.memory_mib / 1024:.0f} GiB" if p.memory_mib else ""
        more = f" ×{p.count}" if p.count > 1 else ""
        runtime = f"driver {env.driver or '?'}" + (f" (CUDA {env.driver_cuda})" if env.driver_cuda else "") + (
            f" · ROCm {env.rocm}" if env.rocm else "")
        out.append([("gpu     ", "bold"), (f"{p.name}{more} · {cap}{mem} · {runtime} · via {p.source}", None)])
    else:
        out.append([("gpu     ", "bold"), ("none", None), ("  (why: see the gpu check)", "dim")])
    if t.installed and not t.error:
        build = f"CUDA {t.cuda}" if t.cuda else f"HIP {t.hip}" if t.hip else "CPU build"
        archs = " ".join(t.arch_list) if t.arch_list else "—"
        feats = ",".join(k for k, v in sorted(t.features.items()) if v) or "—"
        out.append([("torch   ", "bold"), (f"{t.version} · {build} · archs: {archs}", None),
                    (f" · features: {feats}", "dim")])
    else:
        out.append([("torch   ", "bold"), (t.error or "not installed", "red")])
    x, f = env.xformers, env.flash_attn
    out.append([("libs    ", "bold"), (f"transformers {env.transformers.version or '—'} · xformers {x.version or '—'}"
                                       f" · flash-attn {f.version or '—'} · triton {t.triton or '—'}", None)])
    arch = f"{report.arch or 'none'} ({report.arch_match})"
    if report.declared is False and report.device_arch:  # name the device's own arch before the policy it borrows
        arch = f"{report.device_arch} (not in matrix.yaml) → policy {arch}"
    out.append([("arch    ", "bold"), (arch, None),
                (f" · evidence {report.evidence}", None)]
               + ([(f" · {_short(report.evidence_note, 100)}", "dim")] if report.evidence_note else []))
    out.append([])
    out.append([("checks", "bold")])
    for c in report.checks:
        out.append([(f"  {c.status:<5} ", STYLE.get(c.status)), (f"{c.id:<13}", None), (_short(c.message, 150), None)])
        if c.fix and c.status in (CheckStatus.WARN, CheckStatus.FAIL):
            first, *more = c.fix.splitlines()  # a multi-line fix (a matrix.yaml entry) keeps its indentation
            out.append([("                    fix: ", "dim"), (first, "bold")])
            out.extend([("                         ", None), (line, "bold")] for line in more)
    out.append([])
    where = report.matrix or "—"
    out.append([("families", "bold"), (f" (matrix {where})", "dim")])
    if not report.families:
        out.append([("  none: ", None), (report.matrix_error or "no matrix", "yellow")])
    previous_said = None
    previous = None  # a family's vision / text / shims / fix lines, printed only where they differ from the one above
    for fam in report.families:
        cell = f"{fam.cell} ({fam.match})" if fam.cell else "no cell"
        out.append([(f"  {fam.verdict:<5} ", STYLE[fam.verdict]), (f"{fam.model:<11}", "bold"), (cell, None),
                    (f" · {fam.dtype}", None)])
        own = [r for r in fam.reasons if not r.startswith("environment ")]
        said = "; ".join(own).replace(fam.model, "{model}")
        if own and said != previous_said:  # else the family above said the same, but for its name
            out.append([("        ", None), (_short("; ".join(own)), STYLE.get(fam.verdict.lower()))])
        previous_said = said
        block = [[("        vision ", None)] + _backend(fam.vision), [("        text   ", None)] + _backend(fam.text)]
        if fam.shims:
            src = fam.shims[0].source
            block.append([(f"        shims ({src}) ", None),
                          (" · ".join(f"{s.name} ({s.label or _short(s.detail, 30)})" for s in fam.shims), "dim")])
        if fam.fix and fam.verdict != "OK" and (not report.checks or fam.fix not in {c.fix for c in report.checks}):
            block.append([("        fix: ", "dim"), (fam.fix, "bold")])
        out.extend(line for i, line in enumerate(block) if previous is None or i >= len(previous)
                   or line != previous[i])
        previous = block
    out.append([("next    ", "bold"), ("your own model or port: portvlm check module:function (parity vs fp32)", "dim")])
    return out


def plain(report: Report, width: int | None = None) -> str:
    """The report as plain text, each long line wrapped at word boundaries to ``width`` (the terminal's, else 100)."""
    from portvlm.terminal import wrap

    out = []
    for line in lines(report):
        out.extend(wrap("".join(text for text, _ in line), width, indent="      "))
    return "\n".join(out)


def use_colour(stream: TextIO, env) -> bool:
    if env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except Exception:
        return False


def write(report: Report, stream: TextIO | None = None, colour: bool | None = None, env=None) -> None:
    """Print the report: rich markup on a terminal (if rich is installed), plain text elsewhere."""
    import os

    stream = stream or sys.stdout
    env = os.environ if env is None else env
    colour = use_colour(stream, env) if colour is None else colour
    if colour:
        try:
            from rich.console import Console
            from rich.text import Text

            console = Console(file=stream, highlight=False)  # wraps at the terminal's width, on words
            for line in lines(report):
                console.print(Text.assemble(*[(t, s) if s else t for t, s in line]))
            return
        except Exception:
            pass
    stream.write(plain(report) + "\n")
