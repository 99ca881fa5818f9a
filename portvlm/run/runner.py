"""Run matrix cells: choose how each can run here, build its environment, run it, record the result.

This is what `nox -s "test(arch=…, model=…)"` calls (`portvlm run --arch … --model …`). Each cell runs in
a child process with a timeout; the parent writes the result, so a crash or timeout is recorded as such
and no run touches another cell's file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from portvlm.errors import EnvironmentBuildError
from portvlm.matrix.schema import Arch, Cell
from portvlm.records import EVIDENCE_RANK, OK_STATUSES, CellReport, CellResult, Evidence, Mode, Status
from portvlm.run import env as envs
from portvlm.run.cell import evidence_for, host_label
from portvlm.run.results import overall_status, result_from_json, write_result
from portvlm.suites import DEFAULT_SUITES
from portvlm.terminal import PROGRESS_ENV


@dataclass(frozen=True)
class Plan:
    """How one cell runs on this host."""

    mode: Mode
    evidence: Evidence  # what the run records: decided here once, passed to the child
    reason: str = ""
    python: str | None = None  # for mode "python"
    image: str | None = None  # for mode "container"


def plan_cell(cell: Cell, host_arch: str | None, *, require_hardware: bool = False,
              python: str | None = None, image: str | None = None, archs: Sequence[Arch] = ()) -> Plan:
    """Pure: decide how ``cell`` runs on a host whose arch is ``host_arch`` (``archs``: the matrix's, for naming)."""
    if cell.expected == Status.EXCLUDED:
        return Plan(Mode.EXCLUDED, Evidence.NONE, cell.reason or "excluded by matrix.yaml")
    evidence = evidence_for(cell, host_arch)
    on_its_hardware = evidence == Evidence.HARDWARE
    host = host_label(host_arch, archs)
    if not on_its_hardware and require_hardware:
        return Plan(Mode.REFUSE, Evidence.NONE,
                    f"--require-hardware: cell needs {cell.arch.id} ({cell.arch.description}); this host is {host}")
    if image:
        return Plan(Mode.CONTAINER, evidence, f"inside image {image}", image=image)
    if python:
        return Plan(Mode.PYTHON, evidence, f"with the given interpreter {python}", python=python)
    if on_its_hardware and cell.arch.runtime == "container" and cell.stack.image:
        return Plan(Mode.CONTAINER, evidence, f"{cell.arch.id} cells run in {cell.stack.image}", image=cell.stack.image)
    if on_its_hardware:
        return Plan(Mode.VENV, evidence, "local venv with the stack's pins")
    return Plan(Mode.VENV, evidence,
                f"host is {host}: {cell.arch.id}'s policy runs emulated with the stack's transformers")


def env_spec_for(cell: Cell, plan: Plan) -> envs.EnvSpec:
    """The venv a cell runs in: the stack's pins on its own hardware, else host torch + stack transformers."""
    stack = cell.stack
    if plan.evidence == Evidence.HARDWARE and stack.torch_variant == "cpu":
        return envs.EnvSpec.for_stack(stack)
    host_py = f"{sys.version_info.major}.{sys.version_info.minor}"
    # The stack's overrides go with its transformers pin (they answer that release's requirements).
    return envs.EnvSpec.for_stack(stack, python=host_py, torch=envs.host_torch_spec())


def _log_dir() -> Path:
    return Path(os.environ.get("PORTVLM_LOGS", envs.REPO_ROOT / ".portvlm" / "logs"))


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the cell's process group, SIGKILL what is left after ``grace`` seconds; waits for the child."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``run_many``: the running cell was stopped; ``results`` are the cells that finished."""

    def __init__(self, results: list[CellResult], total: int):
        super().__init__(f"interrupted after {len(results)} of {total} cells")
        self.results = results
        self.total = total


def _base_result(cell: Cell, plan: Plan, started: str) -> CellResult:
    from dataclasses import asdict

    return CellResult(
        cell=cell.id, arch=cell.arch.id, model=cell.model.id, stack=asdict(cell.stack),
        expected=cell.expected, status=Status.ERROR, evidence=plan.evidence, reason=cell.reason, started_at=started,
    )


def run_cell(cell: Cell, plan: Plan, *, matrix_path: str | None, timeout: float, fast: bool,
             suites: str, say=print, note=None) -> CellResult:
    """Run one cell per ``plan``; always returns a result (crash/timeout included).

    ``note(text)`` hears where the cell is (its environment, each suite and check the child reports); by
    default it goes to ``say``.
    """
    note = note or (lambda text, minor=False: None if minor else say(f"  {text}"))
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    result = _base_result(cell, plan, started)
    if plan.mode == Mode.EXCLUDED:
        result.status, result.evidence = Status.EXCLUDED, Evidence.NONE
        return result
    t0 = time.perf_counter()
    try:
        if plan.mode == Mode.VENV:
            spec = env_spec_for(cell, plan)
            note(f"environment {spec.key}" + ("" if envs.is_ready(spec) else " (building with uv)"))
            python = str(envs.ensure_env(spec))
        elif plan.mode == Mode.PYTHON:
            python = plan.python
        else:
            python = "python3"
    except EnvironmentBuildError as exc:
        result.error = str(exc)
        result.evidence = Evidence.NONE
        result.timings = {"env_s": round(time.perf_counter() - t0, 2)}
        return result
    env_s = time.perf_counter() - t0
    _log_dir().mkdir(parents=True, exist_ok=True)
    log_path = _log_dir() / f"{cell.id}.log"
    with tempfile.TemporaryDirectory(prefix="portvlm-cell-") as tmp:
        out = os.path.join(tmp, "partial.json")
        if plan.mode == Mode.CONTAINER:
            cmd = envs.container_command(cell, plan.image, tmp, matrix_path=matrix_path, evidence=plan.evidence,
                                         fast=fast, suites=suites)
            if cmd is None:
                from portvlm.containers import NO_ENGINE

                result.error, result.evidence = NO_ENGINE, Evidence.NONE
                return result
        else:
            cmd = envs.child_command(python, cell.id, out, matrix=matrix_path, evidence=plan.evidence, suites=suites,
                                     fast=fast)
        note(f"running suites ({suites})")
        load_before = _loadavg()
        t1 = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PROGRESS_ENV: "1"}  # the child reports where it is
        with open(log_path, "w") as log:
            # Its own process group: a timeout or Ctrl-C stops the cell and everything it started (FSDP workers).
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(envs.REPO_ROOT),
                                    start_new_session=True)
            try:
                rc = wait_streaming(proc, log_path, timeout, note)
            except subprocess.TimeoutExpired:
                stop_group(proc)
                rc = None
            except BaseException:  # KeyboardInterrupt: stop the cell, then let run_many report what ran
                stop_group(proc)
                raise
        run_s = time.perf_counter() - t1
        result.timings = {"env_s": round(env_s, 2), "run_s": round(run_s, 2),
                          "total_s": round(time.perf_counter() - t0, 2), **host_load(load_before)}
        if rc is None:
            result.status = Status.TIMEOUT
            result.error = f"cell exceeded {timeout:.0f}s; log: {log_path}"
            return result
        partial = None
        if os.path.exists(out):
            try:
                with open(out) as fh:
                    partial = json.load(fh)
            except json.JSONDecodeError:
                partial = None
    if partial is None:
        tail = log_path.read_text()[-3000:] if log_path.exists() else ""
        result.error = f"cell process exited {rc} without a result; log {log_path}:\n{tail}"
        return result
    # Results are shared artefacts: this checkout's absolute path says nothing to a reader elsewhere.
    report = CellReport.from_json(json.loads(json.dumps(partial).replace(str(envs.REPO_ROOT), "<repo>")))
    if report.error:
        result.error = report.error
        return result
    result.evidence = report.evidence or plan.evidence
    result.evidence_notes = report.evidence_notes
    result.environment = report.environment
    result.shims = report.shims
    result.backends = report.backends
    result.suites = report.suites
    result.timings.update(report.timings)
    result.status = overall_status(cell.expected, result.suites)
    return result


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on this OS
        return None


def host_load(before: float | None) -> dict[str, float]:
    """The machine's 1-minute load average while the cell ran (the larger of start and end) and its CPU count:
    what a reader needs to judge the timings beside them (``portvlm.publish`` hides step times of busy runs)."""
    after = _loadavg()
    loads = [x for x in (before, after) if x is not None]
    out: dict[str, float] = {"host_cpus": os.cpu_count() or 0}
    if loads:
        out["host_load_1m"] = round(max(loads), 2)
    return out


def wait_streaming(proc: subprocess.Popen, log_path: Path, timeout: float, note, poll: float = 0.25) -> int:
    """Wait for ``proc`` (raises TimeoutExpired after ``timeout`` s) while passing the progress lines it writes
    to ``log_path`` (:func:`portvlm.terminal.child_progress`) to ``note``."""
    from portvlm.terminal import progress_text

    deadline = time.monotonic() + timeout
    offset, pending = 0, b""
    started = quiet_since = time.monotonic()

    def drain() -> None:
        nonlocal offset, pending, quiet_since
        with contextlib.suppress(OSError), open(log_path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
            offset += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                found = progress_text(line.decode("utf-8", "replace"))
                if found:
                    quiet_since = time.monotonic()
                if found and not found[1]:
                    note(found[0])
                elif found:
                    note(found[0], minor=True)

    while True:
        try:
            rc = proc.wait(timeout=max(0.0, min(poll, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            drain()
            if time.monotonic() >= deadline:
                raise
            if time.monotonic() - quiet_since >= 60:  # a long check says nothing: say the cell is alive
                note(f"still running ({time.monotonic() - started:.0f}s in the child)", minor=True)
                quiet_since = time.monotonic()
            continue
        drain()
        return rc


def _strength(r: CellResult) -> tuple[int, int]:
    """Evidence rank, then whether it ran on a GPU (an arch's policy emulated on a GPU runs real GPU kernels)."""
    host = (r.environment.get("arch") or {}).get("id") if isinstance(r.environment, dict) else None
    return EVIDENCE_RANK.get(r.evidence, 0), int(host not in (None, "cpu"))


def keep_existing(results_dir: Path, result: CellResult) -> CellResult | None:
    """A weaker run never replaces a stronger one (a CPU rerun keeps GPU results, emulated or hardware)."""
    path = results_dir / f"{result.cell}.json"
    if not path.exists():
        return None
    try:
        old = result_from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError):
        return None
    return old if _strength(old) > _strength(result) else None


def _summary_line(r: CellResult) -> str:
    parity = r.suites.get("parity")
    err = parity.figures.get("max_abs_err") if parity else None
    t = r.timings.get("total_s")
    bits = [f"{r.status:<8}", f"{r.evidence:<9}"]
    if err is not None:
        bits.append(f"parity {err:.2e}")
    if t is not None:
        bits.append(f"{t:.1f}s")
    why = r.reason if r.status in ("excluded", "xfail") else None
    failing = [f"{n}:{s.status}" for n, s in r.suites.items() if s.status != "pass"]
    if failing:
        bits.append(" ".join(failing))
    if why:
        bits.append(f"({why})")
    if r.error:
        bits.append(r.error.strip().splitlines()[-1][:160])
    return "  ".join(bits)


def run_many(cells, *, results_dir: str | Path = "results", matrix_path: str | None = None,
             host_arch: str | None = None, require_hardware: bool = False, python: str | None = None,
             image: str | None = None, timeout: float = 900, fast: bool = False,
             suites: str = DEFAULT_SUITES, say=None, archs: Sequence[Arch] = (),
             progress=None) -> list[CellResult]:
    """Run ``cells`` one after another, writing each result to ``results_dir``; raises :class:`Interrupted` on
    Ctrl-C (however the process was launched). Progress goes to ``progress`` (a :class:`portvlm.terminal.Progress`;
    default: one on stdout), or, when only ``say`` is given, as plain lines to ``say``."""
    from portvlm.terminal import Progress, interruptible

    results_dir = Path(results_dir)
    if host_arch is None:
        from portvlm.platform import detect

        host_arch = detect().arch_id
    out: list[CellResult] = []
    if progress is None and say is not None:
        progress = _SayProgress(say, len(cells))
    with contextlib.ExitStack() as stack:
        if progress is None:
            progress = stack.enter_context(Progress("cells", len(cells), min_note_interval=0.0))
        try:
            with interruptible():
                _run_each(cells, out, results_dir=results_dir, matrix_path=matrix_path, host_arch=host_arch,
                          require_hardware=require_hardware, python=python, image=image, timeout=timeout, fast=fast,
                          suites=suites, progress=progress, archs=archs)
        except KeyboardInterrupt:
            progress.say(f"\ninterrupted: {len(out)} of {len(cells)} cells ran; their results are kept in "
                         f"{results_dir}/ (the running cell was stopped and not recorded)")
            raise Interrupted(out, len(cells)) from None
    return out


class _SayProgress:
    """:class:`portvlm.terminal.Progress`'s interface over a plain ``say`` callable (tests, library callers)."""

    def __init__(self, say, total: int):
        self._say, self.total, self.index, self.t0 = say, total, 0, time.monotonic()

    def start(self, name: str) -> None:
        self.index += 1
        self._say(f"[{self.index}/{self.total}] {name} (elapsed {time.monotonic() - self.t0:.0f}s)")

    def note(self, text: str, minor: bool = False) -> None:
        if not minor:
            self._say(f"  {text}")

    def say(self, text: str = "") -> None:
        self._say(text)


def _run_each(cells, out: list[CellResult], *, results_dir: Path, matrix_path, host_arch, require_hardware, python,
              image, timeout, fast, suites, progress, archs=()) -> None:
    for cell in cells:
        plan = plan_cell(cell, host_arch, require_hardware=require_hardware, python=python, image=image, archs=archs)
        progress.start(cell.id)
        progress.note(f"{plan.mode}, evidence {plan.evidence}")
        if plan.mode == Mode.REFUSE:
            progress.say(f"  error: {plan.reason}")
            raise SystemExit(2)
        result = run_cell(cell, plan, matrix_path=matrix_path, timeout=timeout, fast=fast, suites=suites,
                          say=progress.say, note=progress.note)
        kept = keep_existing(results_dir, result)
        if kept is not None:
            progress.say(f"  kept the existing {kept.evidence} result for {cell.id} (stronger evidence); this "
                         f"{result.evidence} run was not written")
        else:
            write_result(result, results_dir)
        progress.say(f"{cell.id} → {_summary_line(result)}")
        out.append(result)


def print_summary(results: list[CellResult], results_dir: str) -> int:
    """The summary table; 1 when any cell is not ok."""
    if not results:
        print(f"0 cells ran; results in {results_dir}/")
        return 0
    bad = [r for r in results if r.status not in OK_STATUSES]
    width = max(len(r.cell) for r in results)
    print("\nsummary")
    for r in results:
        print(f"  {r.cell:<{width}}  {_summary_line(r)}")
    print(f"{len(results) - len(bad)} ok, {len(bad)} not ok of {len(results)} cells; results in {results_dir}/")
    return 1 if bad else 0


