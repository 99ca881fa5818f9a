"""Ask one environment what portvlm's shims see there: each shim's answer per model, and the upstream symbols.

    python -m portvlm.drift.probe --symbols symbols.json --models qwen2_5vl,llava --out probe.json

runs inside a cell venv (the child half, ``collect``); :func:`probe_env` starts it from the lane (the shell half);
:func:`compare_answers` says which shims answered differently in two environments (pure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from portvlm.drift.symbols import Symbol
from portvlm.shims.versions import ALLOW_UNVERIFIED_ENV

ALLOW = {ALLOW_UNVERIFIED_ENV: "1"}  # the newest release may be outside the verified range: probe it anyway


# -- child: runs inside the environment -----------------------------------------------------------------------------


def _resolve(name: str):
    """The object a dotted name points at: the longest importable module prefix, then attributes."""
    import importlib

    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for i, attr in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attr):
                raise LookupError(f"{'.'.join(parts[:i])} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise LookupError(f"no module of {name!r} imports")


def _defined_in(leaf: str) -> list[str]:
    """Modules of the installed transformers whose source defines ``leaf`` (where a missing name went)."""
    import re

    import transformers

    root = Path(transformers.__file__).parent
    pattern = re.compile(rf"^\s*(?:def|class)\s+{re.escape(leaf)}\b|^{re.escape(leaf)}\s*[:=]", re.M)
    out = []
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if leaf in text and pattern.search(text):
            out.append("transformers." + ".".join(path.relative_to(root).with_suffix("").parts))
    return out[:5]


def symbol_answer(name: str) -> dict:
    """``{"found", "home", "params"}`` for one dotted name here, or ``{"found": False, "missing", "defined_in"}``."""
    import inspect

    try:
        obj = _resolve(name)
    except Exception as exc:  # noqa: BLE001 - an import error inside transformers is an answer too
        return {"found": False, "missing": f"{type(exc).__name__}: {exc}", "defined_in": _defined_in(name.split(".")[-1])}
    routine = inspect.isroutine(obj)
    home = getattr(obj, "__module__", None) if (inspect.isclass(obj) or routine) else None
    try:
        params = list(inspect.signature(obj).parameters) if routine else None
    except (TypeError, ValueError):
        params = None
    return {"found": True, "home": home, "params": params}


def shim_answers(model_id: str, arch: str = "cpu") -> dict:
    """``{shim: {"applies", "detail"}}`` from a patch of ``model_id``'s tiny model, or ``{"error": …}``."""
    try:
        import portvlm
        from portvlm.models import tiny

        missing = tiny.is_available(model_id)
        if missing:
            return {"unavailable": "; ".join(missing)}
        model = tiny.build(model_id)
        with portvlm.patch(model, arch=arch) as handle:
            report = handle.report
    except Exception as exc:  # noqa: BLE001 - the answer is that patch failed, and how
        return {"error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, dict] = {}
    for a in report.applied:
        out.setdefault(a.shim, {"applies": True, "detail": []})["detail"].append(a.target)
    for n in report.not_applied:
        out[n.shim] = {"applies": False, "detail": list(n.reasons)}
    return out


def collect(symbols: Iterable[str], models: Iterable[str]) -> dict:
    """Everything the lane asks of one environment (run inside it)."""
    import platform

    import torch
    import transformers

    return {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "shims": {m: shim_answers(m) for m in models},
        "symbols": {name: symbol_answer(name) for name in symbols},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m portvlm.drift.probe", description="probe shims and symbols here")
    p.add_argument("--symbols", required=True, help="JSON list of dotted upstream names")
    p.add_argument("--models", required=True, help="comma-separated model ids")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    names = json.loads(Path(a.symbols).read_text())
    data = collect(names, [m for m in a.models.split(",") if m])
    Path(a.out).write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    return 0


# -- parent: starts the child -------------------------------------------------------------------------------------


def probe_env(python: str, symbols: Sequence[Symbol], models: Sequence[str], *, cwd: Path,
              timeout: float = 600) -> dict:
    """Run the probe in the environment of ``python`` (this checkout's portvlm: ``cwd`` is its root)."""
    with tempfile.TemporaryDirectory(prefix="portvlm-drift-") as tmp:
        names, out = Path(tmp) / "symbols.json", Path(tmp) / "probe.json"
        names.write_text(json.dumps([s.name for s in symbols]))
        env = {**os.environ, **ALLOW}
        env.pop("PYTHONPATH", None)
        cmd = [python, "-m", "portvlm.drift.probe", "--symbols", str(names), "--models", ",".join(models),
               "--out", str(out)]
        proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            return {"error": f"probe exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
        return json.loads(out.read_text())


# -- pure: which answers changed --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerChange:
    """A shim whose probe gave another answer for a model on the newest release than on the verified stack."""

    model: str
    shim: str
    baseline: str  # "applies" | "does not apply" | "missing" | "error: …" | "unavailable: …"
    newest: str
    detail: str  # the newest's targets or reasons


def _answer(per_model: Mapping, shim: str) -> tuple[str, str]:
    if "error" in per_model:
        return f"patch error: {per_model['error']}", per_model["error"]
    if "unavailable" in per_model:
        return "model unavailable", per_model["unavailable"]
    got = per_model.get(shim)
    if got is None:
        return "not reported", ""
    return ("applies" if got.get("applies") else "does not apply"), "; ".join(got.get("detail") or [])


def compare_answers(baseline: Mapping[str, Mapping], newest: Mapping[str, Mapping]) -> list[AnswerChange]:
    """Shims (per model) whose answer differs between two probes' ``shims`` sections."""
    out = []
    for model in sorted(set(baseline) | set(newest)):
        old, new = baseline.get(model, {"error": "not probed"}), newest.get(model, {"error": "not probed"})
        shims = sorted({k for side in (old, new) for k in side if k not in ("error", "unavailable")}) or ["patch"]
        for shim in shims:
            (a, _), (b, detail) = _answer(old, shim), _answer(new, shim)
            if a != b:
                out.append(AnswerChange(model, shim, a, b, detail))
    return out


if __name__ == "__main__":
    sys.exit(main())
