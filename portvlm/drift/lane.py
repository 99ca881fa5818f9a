"""``portvlm drift`` / ``nox -s drift``: the shell that runs the lane end to end (resolve → envs → probe → cells → report).

    portvlm drift                                 # newest transformers + newest torch CPU build, every model
    portvlm drift --transformers 5.24.0           # force a version (a "fake release": the lane's test hook)
    portvlm drift --models qwen2_5vl,llava --torch 2.13.0+cpu

Exit status: 0 no shim broke, 1 upstream broke one (the report says where), 2 the lane could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from portvlm.drift import probe, report, resolve, symbols
from portvlm.errors import EnvironmentBuildError, MatrixError
from portvlm.shims.versions import parse as parse_version

DRIFT_STACK = "drift-tf{transformers}"


def baseline_stack(matrix, transformers: str):
    """The newest CI CPU stack not newer than ``transformers`` (the verified stack drift is measured against)."""
    stacks = [s for s in matrix.ci_cpu_stacks() if parse_version(s.transformers) <= parse_version(transformers)]
    return max(stacks, key=lambda s: parse_version(s.transformers), default=None)


def drift_matrix_text(matrix_text: str, *, transformers: str, torch: str, python: str,
                      overrides: Sequence = ()) -> tuple[str, str]:
    """The matrix with one more CPU stack (the tested versions) as the cpu arch's only stack: ``(yaml, stack id)``.

    Pure. Expectations by transformers range (qwen3vl before 4.57.1) still apply to it. ``overrides``
    (``matrix.schema.Override``) go on the stack, so its cells record them.
    """
    data = yaml.safe_load(matrix_text)
    stack_id = DRIFT_STACK.format(transformers=transformers)
    base = parse_version(torch)
    stack = {
        "id": stack_id, "python": python, "torch": base.base_version, "torch_variant": base.local or "cpu",
        "transformers": transformers, "ci": False,
        "notes": ["the drift lane's newest upstream release (nox -s drift); not a declared stack"],
    }
    if overrides:
        stack["overrides"] = [{"package": o.package, "pin": o.pin, "install": o.install, "reason": o.reason}
                              for o in overrides]
    data["stacks"].append(stack)
    for arch in data["archs"]:
        if arch["id"] == "cpu":
            arch["stacks"] = [stack_id]
    return yaml.safe_dump(data, sort_keys=False), stack_id


@contextlib.contextmanager
def _allowed_unverified():
    """``PORTVLM_ALLOW_UNVERIFIED=1`` for the cells this process starts, restored afterwards."""
    old = {k: os.environ.get(k) for k in probe.ALLOW}
    os.environ.update(probe.ALLOW)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cells(matrix_text: str, *, transformers: str, torch: str, python: str, interpreter: str, models: Sequence[str],
              timeout: float, fast: bool, say: Callable = print, overrides: Sequence = ()) -> list:
    """The CPU cells of ``models`` on the tested versions, through the matrix runner (results kept out of results/)."""
    from portvlm.matrix import expand, parse_matrix, select
    from portvlm.run.runner import run_many

    text, stack_id = drift_matrix_text(matrix_text, transformers=transformers, torch=torch, python=python,
                                       overrides=overrides)
    with tempfile.TemporaryDirectory(prefix="portvlm-drift-cells-") as tmp:
        path = Path(tmp) / "matrix.yaml"
        path.write_text(text)
        cells = select(expand(parse_matrix(text, str(path))), arch="cpu", model=list(models), stack=stack_id)
        with _allowed_unverified():
            return run_many(cells, results_dir=Path(tmp) / "results", matrix_path=str(path), host_arch="cpu",
                            python=interpreter, timeout=timeout, fast=fast,
                            say=None if say is print else say)  # print: the runner's own progress display


def run_drift(*, transformers: str | None = None, torch: str | None = None, python: str | None = None,
              models: Sequence[str] | None = None, results_dir: str | Path = "results", matrix_path: str | None = None,
              timeout: float = 900, fast: bool = False, skip_cells: bool = False, say: Callable = print,
              resolve_transformers: Callable = resolve.resolve_transformers,
              resolve_torch: Callable = resolve.resolve_torch_cpu,
              ensure_env: Callable | None = None, probe_env: Callable = probe.probe_env,
              cells_runner: Callable = run_cells, now: Callable | None = None,
              check_installable: Callable = resolve.check_installable) -> tuple[dict, Path]:
    """Run the lane; returns ``(report, path of its JSON)``. Every step is injectable (the tests fake the index)."""
    from portvlm.matrix import load_matrix, packaged_path
    from portvlm.run import env as envs
    from portvlm.shims import versions

    ensure_env = ensure_env or envs.ensure_env
    matrix = load_matrix(matrix_path)
    matrix_text = Path(matrix_path or packaged_path()).read_text()
    ci_cpu = matrix.ci_cpu_stacks()
    python = python or (max(ci_cpu, key=lambda s: parse_version(s.transformers)).python if ci_cpu else "3.11")
    known = [m.id for m in matrix.models]
    models = list(models or known)
    unknown = [m for m in models if m not in known]
    if unknown:
        raise LookupError(f"unknown model(s) {', '.join(unknown)}; --models takes ids of {', '.join(known)}")
    for flag, value in (("--transformers", transformers), ("--torch", torch)):
        if value and versions.parse_or_none(value) is None:
            raise LookupError(f"{flag} {value!r} is not a version (PEP 440, e.g. 5.24.0 or 2.13.0+cpu)")
    if torch and parse_version(torch).local != "cpu":
        raise LookupError(f"--torch {torch!r} is not a CPU build: the drift lane runs the CPU cells; pass X+cpu "
                          "(e.g. 2.13.0+cpu)")
    notes: list[str] = []

    if transformers:
        tf = resolve.Resolved("transformers", transformers, "forced by --transformers")
    else:
        tf = resolve_transformers(python=python)
    th = resolve.Resolved("torch", torch, "forced by --torch") if torch else resolve_torch(python=python)
    notes += [*tf.notes, *th.notes]
    verified = versions.VERIFIED_TRANSFORMERS.contains(parse_version(tf.version), prereleases=True)
    tested = report.Tested(tf.version, th.version, python, verified, versions.VERIFIED_RANGE_TEXT, tf.source, th.source)
    say(f"drift: transformers {tf.version} ({tf.source}; {'verified' if verified else 'unverified'}), "
        f"torch {th.version} ({th.source}), python {python}")

    installable, overrides = installability(matrix, tf.version, python, check_installable)
    if installable is not None and not installable.ok:
        say(f"drift: transformers {tf.version} {installable.line}")
        notes += [f"transformers {tf.version}: {installable.line}"] + [
            f"ran with the override {o.describe()}" for o in overrides]
    spec = envs.EnvSpec(python, th.version, tf.version, excludes=tuple(o.package for o in overrides if o.excluded),
                        overrides=tuple(o.install for o in overrides if not o.excluded))
    try:
        newest_py = str(ensure_env(spec))
    except EnvironmentBuildError as exc:
        if installable is None or installable.ok:
            raise
        raise EnvironmentBuildError(f"transformers {tf.version} {installable.line}; the override "
                                    f"{'; '.join(o.describe() for o in overrides) or '(none found)'} did not build "
                                    f"either: {exc}") from exc
    base = baseline_stack(matrix, tf.version)
    base_py = None
    if base is not None:
        base_py = str(ensure_env(envs.EnvSpec.for_stack(base)))  # with the stack's declared overrides
        if base.transformers == tf.version:
            notes.append(f"the newest release is the CI stack {base.id}: its answers are the baseline's")
    else:
        notes.append(f"no CI CPU stack is older than transformers {tf.version}: nothing to compare probes with")

    syms = symbols.scan_package(envs.REPO_ROOT / "portvlm")
    say(f"drift: probing {len(models)} model(s) and {len(syms)} upstream names in {newest_py}")
    newest_probe = probe_env(newest_py, syms, models, cwd=envs.REPO_ROOT)
    base_probe = None
    if base_py is not None:
        say(f"drift: probing the verified baseline {base.id}")
        base_probe = newest_probe if base_py == newest_py else probe_env(base_py, syms, models, cwd=envs.REPO_ROOT)
    changes = probe.compare_answers(base_probe.get("shims", {}), newest_probe.get("shims", {})) if base_probe else []
    used = {s.name: s.used_at for s in syms}
    sym_changes = (symbols.compare_symbols(base_probe.get("symbols", {}), newest_probe.get("symbols", {}), used)
                   if base_probe else [])

    from portvlm.shims.patch import SHIMS

    retired = [s.name for s in SHIMS if not versions.in_range(s.transformers, parse_version(tf.version))]
    cells = []
    if skip_cells:
        notes.append("cells not run (--no-cells)")
    else:
        say(f"drift: running the CPU cells of {', '.join(models)} (PORTVLM_ALLOW_UNVERIFIED=1)")
        cells = cells_runner(matrix_text, transformers=tf.version, torch=th.version, python=python,
                             interpreter=newest_py, models=models, timeout=timeout, fast=fast, say=say,
                             overrides=overrides)
    stamp = (now or (lambda: _dt.datetime.now(_dt.timezone.utc)))().isoformat(timespec="seconds")
    baseline = ({"stack": base.id, "transformers": base.transformers, "torch": f"{base.torch}+{base.torch_variant}",
                 "python": base.python} if base is not None else None)
    record = report.build_report(tested_at=stamp, tested=tested, baseline=baseline, cells=cells,
                                 newest_probe=newest_probe, baseline_probe=base_probe, changes=changes,
                                 symbol_changes=sym_changes, notes=notes, models=models, retired=retired,
                                 installable=installability_record(installable, overrides, matrix, tf.version))
    path = report.write_report(record, results_dir)
    return record, path


def installability(matrix, transformers: str, python: str, check: Callable) -> tuple:
    """``(Installability or None, overrides to build with)`` for the tested release.

    A release the user's sources cannot install is run with the override matrix.yaml declares for that transformers
    version, else with the one the resolver's answer suggests (the unsatisfiable package left out); either way the
    report says which, and that the release is not installable as it is.
    """
    from portvlm.matrix.schema import Override

    declared = next((s.overrides for s in matrix.stacks if s.transformers == transformers and s.overrides), ())
    result = check("transformers", transformers, python=python)
    if result is None or result.ok:
        return result, tuple(declared)
    if declared:
        return result, tuple(declared)
    if result.package is None:
        return result, ()
    return result, (Override(result.package, result.needs, "none",
                             f"{result.line} (suggested by the drift lane; not declared in matrix.yaml)"),)


def installability_record(result, overrides, matrix, transformers: str) -> dict | None:
    """The report's ``installable`` entry: the resolver's answer and the override tried, declared or suggested."""
    if result is None:
        return None
    declared = any(s.transformers == transformers and s.overrides for s in matrix.stacks)
    out = result.to_dict()
    out["overrides"] = [{"package": o.package, "pin": o.pin, "install": o.install, "reason": o.reason,
                         "declared": declared} for o in overrides]
    if not result.ok and overrides and not declared:
        o = overrides[0]
        out["declare"] = (f"overrides: [{{package: {o.package}, pin: \"{o.pin}\", install: none, reason: \"...\"}}] "
                          f"under the stack that pins transformers {transformers} in matrix.yaml")
    return out


def main(argv: list[str] | None = None) -> int:
    """``portvlm drift [--transformers X] [--torch X+cpu] [--models a,b] [--results DIR]``."""
    p = argparse.ArgumentParser(prog="portvlm drift", description="test portvlm on the newest upstream releases")
    p.add_argument("--transformers", help="test this version instead of the newest on the index (a fake release)")
    p.add_argument("--torch", help="torch build to test with (default: the newest +cpu wheel offered), e.g. 2.13.0+cpu")
    p.add_argument("--python", help="interpreter version of the env (default: the newest CI CPU stack's)")
    p.add_argument("--models", help="comma-separated model ids (default: every model in the matrix)")
    p.add_argument("--results", default="results", help="reports go to RESULTS/drift/ (default: results)")
    p.add_argument("--matrix", default=None)
    p.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    p.add_argument("--fast", action="store_true", help="skip the slowest checks (recorded as skipped)")
    p.add_argument("--no-cells", action="store_true", help="probes and symbols only")
    a = p.parse_args(argv)
    from portvlm.matrix import cli_matrix_path

    models = [m for m in (a.models or "").split(",") if m] or None
    try:
        record, path = run_drift(transformers=a.transformers, torch=a.torch, python=a.python, models=models,
                                 results_dir=a.results, matrix_path=cli_matrix_path(a.matrix), timeout=a.timeout, fast=a.fast,
                                 skip_cells=a.no_cells)
    except (LookupError, EnvironmentBuildError, MatrixError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"drift: {report.verdict_line(record)}")
    for reason in record["broken"]:
        print(f"  broken: {reason}")
    for change in record["probe_changes"]:
        print(f"  probe changed: {change['model']} {change['shim']}: {change['baseline']} -> {change['newest']}")
    print(f"drift: report {path} (+ .md); `nox -s publish` shows it as the 'newest upstream' row")
    return 0 if record["status"] == report.OK else 1


if __name__ == "__main__":
    sys.exit(main())
