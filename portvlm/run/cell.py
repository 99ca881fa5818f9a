"""Run one cell's suites inside its environment and write a partial result (the child process).

The runner (parent) owns the final record: it adds wall times and turns a crash or timeout of this process
into a result, so nothing here needs to be crash-proof beyond reporting what it saw.

    python -m portvlm.run.cell --cell cpu--qwen2_5vl--cpu-tf4.52.4 --out /tmp/partial.json
"""

from __future__ import annotations

import platform as _pyplatform
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from portvlm.matrix.schema import Arch, Cell
from portvlm.policy import NOT_DECLARED, match_arch_id
from portvlm.records import CellReport, Evidence

if TYPE_CHECKING:  # pragma: no cover
    from portvlm.platform import Platform
    from portvlm.policy import Policy


def evidence_for(cell: Cell, host_arch: str | None) -> Evidence:
    """hardware when the host is the cell's declared arch, else emulated (the arch's policy on other hardware).

    ``host_arch`` is the device's own arch id (``Platform.arch_id``: ``"sm100"`` on a B200, never the nearest
    declared arch); :func:`portvlm.policy.match_arch_id` decides. The runner decides it once (``plan_cell``) and
    hands it to the child (``--evidence``).
    """
    return match_arch_id(host_arch, (cell.arch,)).evidence_for(cell.arch.id)


def host_label(host_arch: str | None, archs: Sequence[Arch] = ()) -> str:
    """``"sm90"``; ``"sm110, not in matrix.yaml"`` when ``archs`` (the matrix's) do not declare the host's arch."""
    if not host_arch:
        return "unknown arch"
    if archs and not match_arch_id(host_arch, archs).exact:
        return f"{host_arch}, {NOT_DECLARED}"
    return host_arch


def differences(cell: Cell, actual: dict[str, Any], host: Platform, policy: Policy,
                archs: Sequence[Arch] = ()) -> list[str]:
    """What this run on ``host`` under ``policy`` (the cell arch's) differs in from the cell as declared: the
    evidence notes the table shows."""
    stack, notes = cell.stack, []
    want_torch = f"{stack.torch}+{stack.torch_variant}"
    if actual.get("torch") != want_torch:
        notes.append(f"torch {actual.get('torch') or 'missing'} instead of {want_torch}")
    if actual.get("transformers") != stack.transformers:
        notes.append(f"transformers {actual.get('transformers')} instead of {stack.transformers}")
    py = actual.get("python", "")
    if not py.startswith(stack.python + ".") and py != stack.python:
        notes.append(f"python {py} instead of {stack.python}")
    if evidence_for(cell, host.arch_id) != Evidence.HARDWARE:
        notes.append(f"ran on {host.name} ({host_label(host.arch_id, archs)}) instead of {cell.arch.id}: "
                     f"{cell.arch.id}'s policy (dtype {policy.dtype}, backend priority "
                     f"{', '.join(policy.vision_backends)}) with this device's kernels")
    for pkg in ("xformers", "flash_attn"):
        pin = getattr(stack, pkg)
        if pin and actual.get(pkg) != pin:
            notes.append(f"{pkg} {pin} not loaded here (found: {actual.get(pkg) or 'not installed'})")
    return notes


def _installed_versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"python": _pyplatform.python_version()}
    for dist, key in (("torch", "torch"), ("transformers", "transformers"), ("xformers", "xformers"),
                      ("flash-attn", "flash_attn")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    try:  # the metadata version drops the build tag (+cu130); the module's own string keeps it
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    return out


def override_records(cell: Cell) -> list[dict[str, Any]]:
    """The stack's declared overrides with what this env actually holds of each package (``installed``: a version,
    or None), so a result says which pin it ran around and proves the override took effect."""
    from importlib import metadata

    out = []
    for override in cell.stack.overrides:
        try:
            installed = metadata.version(override.package)
        except metadata.PackageNotFoundError:
            installed = None
        out.append({"package": override.package, "pin": override.pin, "install": override.install,
                    "reason": override.reason, "installed": installed, "summary": override.describe()})
    return out


def _host(cell: Cell | None = None, matrix=None) -> tuple[Platform, dict[str, Any]]:
    """(the host platform, doctor record) — each probe degrades to a reason, never raises.

    The record is about ``cell``: its verdict weighs the cell's model only (as ``portvlm doctor --model ID``), so
    a passing cell never carries FAIL because another family cannot run on this transformers.
    """
    env: dict[str, Any] = {}
    try:
        from dataclasses import replace

        from portvlm import doctor
        from portvlm.policy import packaged_matrix

        scope = matrix if matrix is not None else packaged_matrix()
        if cell is not None:
            scope = replace(scope, models=tuple(m for m in scope.models if m.id == cell.model.id) or (cell.model,))
        env = doctor.record(matrix=scope)
    except Exception as exc:  # noqa: BLE001 - the record says why it is missing
        env = {"error": f"doctor unavailable: {type(exc).__name__}: {exc}"}
    from portvlm.platform import CPU, detect

    try:
        return detect(), env
    except Exception as exc:  # noqa: BLE001
        env.setdefault("errors", []).append(f"platform detection failed: {exc}")
        return CPU, env


def _patch_report(cell: Cell, matrix) -> tuple[list[dict], dict]:
    """Which shims/backends portvlm applies for this cell, from a patch of the cell's tiny model."""
    try:
        import portvlm
        from portvlm.models import tiny

        model = tiny.build(cell.model.id)
        with portvlm.patch(model, arch=cell.arch.id, matrix=matrix) as handle:
            data = handle.report.to_dict()
    except Exception as exc:  # noqa: BLE001 - recorded, the suites still run and say what they saw
        return [{"shim": "patch", "applied": False, "reasons": [f"{type(exc).__name__}: {exc}"]}], {}
    shims = [{"shim": a["shim"], "applied": True, "target": a["target"], "why": a["why"]} for a in data["applied"]]
    shims += [{"shim": n["shim"], "applied": False, "reasons": n["reasons"]} for n in data["not_applied"]]
    backends = {
        "vision": data["vision_backend"],
        "text": data["text_backend"],
        "dtype": data["dtype"],
        "dtype_why": data["dtype_why"],
        "emulation": data["emulation"],
        "warnings": data["warnings"],
    }
    return shims, backends


def _checker():
    """``portvlm.check`` for the from_pretrained suite (imported here: the suites sit below the checker)."""
    from portvlm.checker import check

    return check


def run(cell: Cell, suites: tuple[str, ...], fast: bool, in_container: bool, evidence: str | None = None,
        matrix=None) -> CellReport:
    """Run ``cell``'s suites here under its arch's policy (``portvlm.policy.resolve_policy`` of ``matrix``, the
    Matrix the cell came from; None: the packaged one)."""
    from portvlm.policy import packaged_matrix, resolve_policy
    from portvlm.suites import SuiteContext, run_suites

    t0 = time.perf_counter()
    host, env = _host(cell, matrix)
    policy = resolve_policy(cell.arch.id, matrix=matrix, host=host)
    actual = _installed_versions()
    evidence = Evidence(evidence) if evidence else evidence_for(cell, host.arch_id)
    archs = (matrix if matrix is not None else packaged_matrix()).archs  # undeclared hosts are named either way
    notes = differences(cell, actual, host, policy, archs) if evidence == Evidence.EMULATED else []
    if in_container:
        notes.append("ran inside the stack's container image")
    device = "cuda" if host.arch_id not in (None, "cpu") else "cpu"
    shims, backends = _patch_report(cell, matrix)
    ctx = SuiteContext(
        model_id=cell.model.id,
        arch_id=cell.arch.id,
        device=device,
        dtype=policy.dtype,
        evidence=evidence,
        fast=fast,
        matrix=matrix,
        checker=_checker(),
    )
    results = run_suites(ctx, names=suites)
    return CellReport(
        evidence=evidence,
        evidence_notes=notes,
        environment={**env, "versions": actual, "overrides": override_records(cell)},
        shims=shims,
        backends=backends,
        suites=dict(results),
        timings={"suites_s": round(time.perf_counter() - t0, 3)},
    )


def cell_main(argv: list[str] | None = None) -> int:
    """``python -m portvlm.run.cell``: run one cell's suites and write its ``CellReport`` JSON to ``--out``."""
    import argparse
    import json
    import traceback

    p = argparse.ArgumentParser(prog="python -m portvlm.run.cell")
    p.add_argument("--cell", required=True)
    p.add_argument("--matrix", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--suites", default="parity,training,streaming")
    p.add_argument("--fast", action="store_true", help="skip the slowest checks (FSDP2 processes); recorded")
    p.add_argument("--in-container", action="store_true")
    p.add_argument("--evidence", choices=[e.value for e in Evidence], help="decided by the runner (plan_cell)")
    a = p.parse_args(argv)
    from portvlm.matrix import expand, load_matrix

    matrix = load_matrix(a.matrix)
    cells = {c.id: c for c in expand(matrix)}
    if a.cell not in cells:
        print(f"error: unknown cell {a.cell!r}; `portvlm matrix` lists them", file=sys.stderr)
        return 2
    try:
        report = run(cells[a.cell], tuple(s for s in a.suites.split(",") if s), a.fast, a.in_container, a.evidence,
                     matrix=matrix)
    except Exception:  # noqa: BLE001 - reported to the parent as the cell's error
        report = CellReport(error=traceback.format_exc()[-4000:])
    with open(a.out, "w") as fh:
        json.dump(report.to_json(), fh, default=str)
    return 0


if __name__ == "__main__":  # the runner's child starts this module as a process
    sys.exit(cell_main())
