"""The CPU image, built for real with the engine found, runs portvlm doctor and a CPU cell inside.

Needs podman (scripts/bootstrap-podman.sh) or docker with a daemon, and the base image
localhost/debian-base:bookworm (the same script makes it). Cold: ~2-6 min (wheelhouse + install); cached: seconds.
    pytest -m container tests/container
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from portvlm import containers as C
from portvlm.matrix import load_matrix

pytestmark = pytest.mark.container
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built():
    engine = C.find_engine()
    if engine is None:
        pytest.skip(C.NO_ENGINE)
    if subprocess.run([engine.exe, "image", "inspect", C.CPU_BASE], capture_output=True).returncode != 0:
        pytest.skip(f"base image {C.CPU_BASE} missing: run scripts/bootstrap-podman.sh")
    spec = C.find_spec(load_matrix(ROOT / "matrix.yaml"), C.CPU_SLUG)
    record = C.build(spec, engine, out=ROOT / C.OUT_DIR)
    return spec, engine, record


def _run(built, *cmd, volumes=()):
    spec, engine, _ = built
    proc = C.run_in(spec, list(cmd), engine, volumes=volumes, capture=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_build_is_recorded(built):
    spec, _, record = built
    saved = json.loads((C.state_dir(spec) / "build.json").read_text())
    assert saved["image_id"] == record.image_id and record.size_bytes


def test_doctor_is_the_default_command(built):
    report = json.loads(_run(built))  # CMD ["portvlm", "doctor", "--json"]
    assert report["arch"]["id"] == "cpu" and report["arch"]["evidence"] == "hardware"


def test_stack_is_installed_as_pinned(built):
    spec = built[0]
    out = _run(built, "python", "-c", "import torch, transformers, portvlm; print(torch.__version__, transformers.__version__)")
    assert out.split() == [f"{spec.stack.torch}+cpu", spec.stack.transformers]


def test_runs_as_non_root_with_labels(built):
    spec, engine, _ = built
    assert _run(built, "id", "-u").strip() == str(C.UID)
    info = json.loads(subprocess.run([engine.exe, "image", "inspect", spec.tag], capture_output=True, text=True).stdout)
    labels = info[0]["Config"]["Labels"]
    assert labels["io.portvlm.stack"] == spec.stack.id
    assert labels["io.portvlm.cells"].split(",") == list(spec.cells)


def test_a_cpu_cell_runs_inside(built, tmp_path):
    spec = built[0]
    tmp_path.chmod(0o777)  # the image's user (uid 10001) writes the result
    cell = spec.cells[0]
    from portvlm.run.env import child_command

    _run(built, *child_command("python", cell, "/results/cell.json", fast=True, in_container=True),
         volumes=[f"{tmp_path}:/results"])
    result = json.loads((tmp_path / "cell.json").read_text())
    assert result["evidence"] == "hardware"
    assert {name: s["status"] for name, s in result["suites"].items()} == dict.fromkeys(result["suites"], "pass")


def test_runner_runs_a_cell_in_the_image_and_records_it(built, tmp_path):
    """`portvlm run --image cpu` goes through the runner: results/<cell>.json with hardware evidence."""
    from portvlm.run import cli as run_cli
    from portvlm.run.results import load_results

    spec = built[0]
    cell = spec.cells[0]
    arch, model, stack = cell.split("--")
    rc = run_cli.main(["--arch", arch, "--model", model, "--stack", stack, "--image", spec.slug, "--fast",
                      "--results", str(tmp_path)])
    (result,) = load_results(tmp_path)
    assert rc == 0 and result.status == "pass"
    assert result.evidence == "hardware" and "ran inside the stack's container image" in result.evidence_notes
