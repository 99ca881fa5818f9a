"""The runner's pure planning, result records, and crash/timeout handling (no torch: the child is faked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from portvlm.matrix.schema import Arch, Cell, Model, Stack
from portvlm.run import runner
from portvlm.run.results import CellResult, SuiteResult, load_results, overall_status, write_result

CPU = Arch(id="cpu", vendor="cpu", description="cpu", stacks=("s",))
SM70 = Arch(id="sm70", vendor="nvidia", description="Volta", capability=(7, 0), dtypes=("float16", "float32"),
            vision_backends=("efficient_varlen", "sdpa_masked"), runtime="container", stacks=("v",))
STACK = Stack(id="s", python="3.11", torch="2.13.0", torch_variant="cpu", transformers="4.52.4")
VSTACK = Stack(id="v", python="3.10", torch="2.3.1", torch_variant="cu118", transformers="4.50.3",
               xformers="0.0.27", image="portvlm/sm70")
MODEL = Model(id="qwen2_5vl", family="qwen2_5_vl", description="", min_transformers="4.49.0")


def test_plan_cpu_cell_on_cpu_is_hardware_venv():
    plan = runner.plan_cell(Cell(CPU, STACK, MODEL), "cpu")
    assert (plan.mode, plan.evidence) == ("venv", "hardware")


def test_plan_gpu_cell_on_cpu_is_emulated_and_says_so():
    plan = runner.plan_cell(Cell(SM70, VSTACK, MODEL), "cpu")
    assert (plan.mode, plan.evidence) == ("venv", "emulated")
    assert "emulated" in plan.reason and "cpu" in plan.reason


def test_plan_require_hardware_refuses_instead_of_emulating():
    plan = runner.plan_cell(Cell(SM70, VSTACK, MODEL), "cpu", require_hardware=True)
    assert plan.mode == "refuse" and "sm70" in plan.reason


def test_plan_gpu_cell_on_its_gpu_uses_the_stack_image():
    plan = runner.plan_cell(Cell(SM70, VSTACK, MODEL), "sm70")
    assert (plan.mode, plan.evidence, plan.image) == ("container", "hardware", "portvlm/sm70")


def test_emulated_cell_notes_state_the_policy_resolve_policy_gives():
    """The child's notes quote portvlm.policy.resolve_policy (the one dtype rule), not a copy of it."""
    from portvlm.platform import CPU as CPU_HOST
    from portvlm.policy import resolve_policy
    from portvlm.run.cell import differences

    cell = Cell(SM70, VSTACK, MODEL)
    policy = resolve_policy("sm70", host=CPU_HOST, matrix=_matrix_of(SM70))
    actual = {"python": "3.10.14", "torch": "2.3.1+cu118", "transformers": "4.50.3", "xformers": "0.0.27"}
    notes = differences(cell, actual, CPU_HOST, policy)
    assert notes == ["ran on CPU (cpu) instead of sm70: sm70's policy (dtype float16, backend priority "
                     "efficient_varlen, sdpa_masked) with this device's kernels"]
    fp32 = resolve_policy("sm70", dtype="float32", host=CPU_HOST, matrix=_matrix_of(SM70))
    assert "dtype float32" in differences(cell, actual, CPU_HOST, fp32)[0]


def _matrix_of(*archs):
    from portvlm.matrix.schema import Matrix

    return Matrix(archs=archs, stacks=(STACK, VSTACK), models=(MODEL,))


def test_plan_excluded_cell_carries_its_reason():
    cell = Cell(CPU, STACK, MODEL, expected="excluded", reason="Qwen3-VL first ships in 4.57.1")
    plan = runner.plan_cell(cell, "cpu")
    assert plan.mode == "excluded" and "4.57.1" in plan.reason


def test_emulated_env_uses_host_torch_and_stack_transformers(monkeypatch):
    monkeypatch.setenv("PORTVLM_HOST_TORCH", "2.13.0+cpu")
    spec = runner.env_spec_for(Cell(SM70, VSTACK, MODEL), runner.plan_cell(Cell(SM70, VSTACK, MODEL), "cpu"))
    assert spec.torch == "2.13.0+cpu" and spec.transformers == "4.50.3"


@pytest.mark.parametrize(
    ("expected", "statuses", "want"),
    [
        ("pass", ["pass", "pass"], "pass"),
        ("pass", ["pass", "fail"], "fail"),
        ("pass", ["pass", "error"], "fail"),
        ("pass", ["skipped", "skipped"], "skipped"),
        ("xfail", ["fail", "pass"], "xfail"),
        ("xfail", ["pass", "pass"], "xpass"),
        ("pass", [], "error"),
    ],
)
def test_overall_status_never_counts_skips_or_errors_as_pass(expected, statuses, want):
    suites = {str(i): SuiteResult(name=str(i), status=s) for i, s in enumerate(statuses)}
    assert overall_status(expected, suites) == want


def _result(cell="c1", evidence="emulated", status="pass"):
    return CellResult(cell=cell, arch="cpu", model="m", stack={}, expected="pass", status=status, evidence=evidence)


def test_write_result_is_atomic_and_leaves_other_cells_alone(tmp_path):
    write_result(_result("a"), tmp_path)
    write_result(_result("b"), tmp_path)
    write_result(_result("a", status="fail"), tmp_path)
    got = {r.cell: r.status for r in load_results(tmp_path)}
    assert got == {"a": "fail", "b": "pass"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_written_result_names_local_roots_by_placeholder(tmp_path, monkeypatch):
    """A result travels (git, the site): the venv root and the checkout are <envs> / <repo>, never this machine's."""
    import dataclasses

    from portvlm.run import env as envs

    monkeypatch.setenv("PORTVLM_ENVS", "/machine/envs")
    rec = dataclasses.replace(_result("a"), environment={"python": "/machine/envs/py3.11/bin/python",
                                                         "matrix": f"{envs.REPO_ROOT}/matrix.yaml"})
    text = write_result(rec, tmp_path).read_text()
    assert "/machine/envs" not in text and str(envs.REPO_ROOT) not in text
    assert '"<envs>/py3.11/bin/python"' in text and '"<repo>/matrix.yaml"' in text


def test_weaker_evidence_never_replaces_hardware_result(tmp_path):
    write_result(_result("a", evidence="hardware"), tmp_path)
    assert runner.keep_existing(tmp_path, _result("a", evidence="emulated")).evidence == "hardware"
    assert runner.keep_existing(tmp_path, _result("a", evidence="hardware")) is None


def _fake_child(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fakepython"
    script.write_text(f"#!{sys.executable}\nimport sys, json, time\n{body}\n")
    script.chmod(0o755)
    return str(script)


def _argv_out():
    return "out = sys.argv[sys.argv.index('--out') + 1]"


def test_crashing_cell_is_recorded_as_error_with_log_tail(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTVLM_LOGS", str(tmp_path / "logs"))
    py = _fake_child(tmp_path, "print('boom: segfault-ish'); sys.exit(139)")
    cell = Cell(CPU, STACK, MODEL)
    plan = runner.Plan("python", "hardware", python=py)
    r = runner.run_cell(cell, plan, matrix_path=None, timeout=30, fast=True, suites="parity", say=lambda *_: None)
    assert r.status == "error" and "139" in r.error and "boom" in r.error


def test_hanging_cell_is_recorded_as_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTVLM_LOGS", str(tmp_path / "logs"))
    py = _fake_child(tmp_path, "time.sleep(30)")
    plan = runner.Plan("python", "hardware", python=py)
    r = runner.run_cell(Cell(CPU, STACK, MODEL), plan, matrix_path=None, timeout=1, fast=True, suites="parity",
                        say=lambda *_: None)
    assert r.status == "timeout"


def test_child_partial_result_is_folded_into_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTVLM_LOGS", str(tmp_path / "logs"))
    partial = {"evidence": "hardware", "evidence_notes": [], "suites": {
        "parity": {"name": "parity", "status": "pass", "figures": {"max_abs_err": 1e-6}, "checks": [
            {"name": "logits", "ok": True, "detail": "", "value": 1e-6, "bound": 1e-4}]},
        "training": {"name": "training", "status": "fail", "figures": {}, "checks": []}}}
    py = _fake_child(tmp_path, f"{_argv_out()}\njson.dump({partial!r}, open(out, 'w'))")
    plan = runner.Plan("python", "hardware", python=py)
    r = runner.run_cell(Cell(CPU, STACK, MODEL), plan, matrix_path=None, timeout=30, fast=True, suites="parity",
                        say=lambda *_: None)
    assert r.status == "fail" and r.suites["parity"].checks[0].bound == 1e-4
    written = write_result(r, tmp_path / "res")
    assert json.loads(written.read_text())["schema"] == "portvlm.cell-result/1"


def test_emulated_on_gpu_is_kept_over_emulated_on_cpu(tmp_path):
    gpu = _result("a", evidence="emulated")
    gpu.environment = {"arch": {"id": "sm90"}}
    write_result(gpu, tmp_path)
    cpu = _result("a", evidence="emulated")
    cpu.environment = {"arch": {"id": "cpu"}}
    assert runner.keep_existing(tmp_path, cpu) is not None
    assert runner.keep_existing(tmp_path, gpu) is None


def test_cell_envs_carry_every_runtime_dependency_of_portvlm():
    import re

    from portvlm.run.env import CELL_REQUIREMENTS

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    names = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower() for d in pyproject["project"]["dependencies"]}
    assert names <= set(CELL_REQUIREMENTS), names - set(CELL_REQUIREMENTS)


def test_ctrl_c_stops_the_running_cell_keeps_results_and_exits_130(tmp_path):
    """SIGINT to a runner mid-run: the running cell's process group is killed, finished results stay, exit 130."""
    import os
    import signal
    import subprocess
    import time

    marker, grandchild = tmp_path / "slow-started", tmp_path / "grandchild.pid"
    partial = {"evidence": "hardware", "suites": {"parity": {"name": "parity", "status": "pass"}}}
    py = _fake_child(tmp_path, f"""
import subprocess
cell = sys.argv[sys.argv.index('--cell') + 1]
if cell.endswith('--fast'):
    {_argv_out()}
    json.dump({partial!r}, open(out, 'w'))
else:  # the slow cell: a worker of its own (as FSDP starts), then it hangs
    worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    open({str(grandchild)!r}, 'w').write(str(worker.pid))
    open({str(marker)!r}, 'w').write('1')
    time.sleep(120)
""")
    script = f"""
import sys
from portvlm.matrix.schema import Arch, Cell, Model, Stack
from portvlm.run import runner
stacks = [Stack(id=i, python="3.11", torch="2.13.0", torch_variant="cpu", transformers="4.52.4")
          for i in ("fast", "slow", "never")]
arch = Arch(id="cpu", vendor="cpu", description="cpu", stacks=tuple(s.id for s in stacks))
model = Model(id="m", family="qwen2_5_vl", description="", min_transformers="4.49.0")
cells = [Cell(arch, s, model) for s in stacks]
try:
    runner.run_many(cells, results_dir={str(tmp_path / 'res')!r}, host_arch="cpu", python={py!r}, timeout=300)
except runner.Interrupted as stop:
    runner.print_summary(stop.results, "res")
    sys.exit(130)
"""
    env = {**os.environ, "PORTVLM_LOGS": str(tmp_path / "logs"), "PYTHONPATH": str(Path(runner.__file__).parents[2])}
    # Started with SIGINT ignored, as a background job or some CI runners start processes (and as this test's own
    # process may have been started): the runner must still stop on Ctrl-C, and so must what it starts.
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert "interrupted: 1 of 3 cells ran" in out and "Traceback" not in out, out
    assert [p.name for p in (tmp_path / "res").glob("*.json")] == ["cpu--m--fast.json"]
    worker = int(grandchild.read_text())
    for _ in range(50):  # the killed worker may take a moment to be reaped by init
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the running cell's worker survived Ctrl-C")


def test_ctrl_c_test_passes_when_pytest_itself_was_started_with_sigint_ignored(tmp_path):
    """The Ctrl-C test above, run by a pytest that inherited SIGINT ignored (a background job): it still passes."""
    import os
    import signal
    import subprocess

    if os.environ.get("PORTVLM_NESTED_SIGINT_TEST"):
        pytest.skip("already the nested run")
    env = {**os.environ, "PORTVLM_NESTED_SIGINT_TEST": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", f"{__file__}::"
         "test_ctrl_c_stops_the_running_cell_keeps_results_and_exits_130", "--basetemp", str(tmp_path / "t")],
        capture_output=True, text=True, env=env, timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_the_child_s_progress_lines_reach_the_parent_as_they_happen(tmp_path, monkeypatch):
    """Suites in the child report where they are; the runner passes those lines on (minor ones marked)."""
    from portvlm.terminal import MINOR_PREFIX, PROGRESS_PREFIX

    monkeypatch.setenv("PORTVLM_LOGS", str(tmp_path / "logs"))
    partial = {"evidence": "hardware", "suites": {"parity": {"name": "parity", "status": "pass"}}}
    py = _fake_child(tmp_path, f"""import os
assert os.environ.get("PORTVLM_PROGRESS") == "1"
print("ordinary log line")
print({PROGRESS_PREFIX!r} + "suite parity (1/1)", flush=True)
print({MINOR_PREFIX!r} + "parity: logits ok", flush=True)
time.sleep(0.6)
print({PROGRESS_PREFIX!r} + "suite parity: pass", end="", flush=True)
{_argv_out()}
json.dump({partial!r}, open(out, 'w'))""")
    heard = []
    r = runner.run_cell(Cell(CPU, STACK, MODEL), runner.Plan("python", "hardware", python=py), matrix_path=None,
                        timeout=30, fast=True, suites="parity", say=lambda *_: None,
                        note=lambda text, minor=False: heard.append((text, minor)))
    assert r.status == "pass"
    assert heard == [("running suites (parity)", False), ("suite parity (1/1)", False),
                     ("parity: logits ok", True)], heard  # a last line without its newline is never half-read


def test_plain_progress_is_one_line_per_event_with_counts_and_elapsed():
    import io

    from portvlm.terminal import Progress

    out = io.StringIO()
    with Progress("cells", 2, stream=out) as p:
        p.start("cpu--a")
        p.note("suite parity (1/3)")
        p.note("parity: logits ok", minor=True)
        p.say("cpu--a → pass")
        p.start("cpu--b")
    lines = out.getvalue().splitlines()
    assert lines == ["[1/2 0s] cells: cpu--a", "  [1/2 0s] cpu--a · suite parity (1/3)", "cpu--a → pass",
                     "[2/2 0s] cells: cpu--b"]
    assert "\x1b[" not in out.getvalue()


def test_a_user_s_run_writes_portvlm_results_and_only_publish_writes_the_tracked_results(tmp_path, monkeypatch,
                                                                                        capsys):
    """`portvlm run` (what `nox` calls) writes ./portvlm-results/; `--publish` writes ./results/ and says so."""
    from portvlm.run.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORTVLM_LOGS", str(tmp_path / "logs"))
    partial = {"evidence": "hardware", "suites": {"parity": {"name": "parity", "status": "pass"}}}
    py = _fake_child(tmp_path, f"{_argv_out()}\njson.dump({partial!r}, open(out, 'w'))")
    args = ["--arch", "cpu", "--model", "llava", "--stack", "cpu-tf5.24.0", "--python", py, "--host-arch", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "portvlm-results" / "cpu--llava--cpu-tf5.24.0.json").read_text())
    assert not (tmp_path / "results").exists() and "publishing" not in out
    assert written["timings"]["host_cpus"] >= 1 and written["timings"]["host_load_1m"] >= 0  # judged by publish
    assert main([*args, "--publish"]) == 0
    assert "publishing: results go to the tracked results/" in capsys.readouterr().out
    assert (tmp_path / "results" / "cpu--llava--cpu-tf5.24.0.json").is_file()
    with pytest.raises(SystemExit):
        main([*args, "--publish", "--results", "elsewhere"])


def test_the_main_job_runs_into_portvlm_results_and_ends_with_a_local_report_not_publish():
    """`nox` alone = the CPU cells + `report` (into portvlm-results/); `publish` is asked for by name."""
    import subprocess

    pytest.importorskip("nox")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "nox", "--script-mode", "none", "-l", "--json"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sessions = [s["session"] for s in json.loads(proc.stdout)]
    assert sessions[-1] == "report" and "publish" not in sessions
    assert all(s.startswith("test(arch='cpu'") for s in sessions[:-1]) and len(sessions) > 1
    noxfile = (root / "noxfile.py").read_text()
    assert '"--results", LOCAL_RESULTS, "--out", LOCAL_RESULTS)' in noxfile  # `nox -- --fast`: not publish's args
    assert "/portvlm-results/" in (root / ".gitignore").read_text().splitlines()


def test_a_cell_s_embedded_doctor_record_is_about_that_cell_s_model_only():
    """A passing llava cell never carries FAIL because another family cannot run on its transformers."""
    from portvlm.matrix import expand, load_matrix
    from portvlm.run.cell import _host

    root = Path(__file__).resolve().parents[2]
    matrix = load_matrix(root / "matrix.yaml")
    cell = next(c for c in expand(matrix) if c.arch.id == "cpu" and c.model.id == "llava")
    _, record = _host(cell, matrix)
    assert [f["model"] for f in record["families"]] == ["llava"], record.get("families")


def test_ensure_envs_builds_in_parallel_keeps_order_and_says_what_it_builds(monkeypatch):
    import threading
    import time

    from portvlm.run import env as envs

    specs = [envs.EnvSpec("3.11", "2.13.0+cpu", v) for v in ("4.50.3", "4.52.4", "5.24.0")]
    running, peak, lock = [0], [0], threading.Lock()

    def fake_build(spec):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return Path(f"/envs/{spec.transformers}/bin/python")

    monkeypatch.setattr(envs, "ensure_env", fake_build)
    monkeypatch.setattr(envs, "is_ready", lambda spec: spec.transformers == "4.50.3")
    said = []
    pythons = envs.ensure_envs(specs, jobs=3, say=said.append)
    assert [p.parts[2] for p in pythons] == ["4.50.3", "4.52.4", "5.24.0"]
    assert peak[0] >= 2  # concurrently, not one after another
    assert said[0].startswith("building 2 of 3 environments") and len(said) == 3


def test_plain_progress_shows_a_minor_note_after_a_quiet_heartbeat():
    """A long suite whose checks are minor notes still shows, in a CI log, that it is alive and where."""
    import io
    import time

    from portvlm.terminal import Progress

    out = io.StringIO()
    with Progress("cells", 1, stream=out, heartbeat=0.2) as p:
        p.start("cpu--a")
        p.note("training: first ok", minor=True)  # within the heartbeat of the start line: not printed
        time.sleep(0.25)
        p.note("training: fsdp ok", minor=True)
    assert out.getvalue().splitlines()[1:] == ["  [1/1 0s] cpu--a · training: fsdp ok"]
