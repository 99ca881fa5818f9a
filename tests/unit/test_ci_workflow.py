"""The GitHub Actions workflow is generated from matrix.yaml: golden equality and GitHub's workflow schema."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from portvlm import ci
from portvlm.matrix import expand, load_matrix, select

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ci.WORKFLOW_PATH


@pytest.fixture(scope="module")
def matrix():
    return load_matrix(ROOT / "matrix.yaml")


@pytest.fixture(scope="module")
def generated(matrix) -> str:
    return ci.render(matrix)


def test_checked_in_workflow_equals_generator_output(generated):
    """Regenerate with `PORTVLM_UPDATE_GOLDEN=1 pytest tests/unit/test_ci_workflow.py` or `python ci/workflow.py`."""
    if os.environ.get("PORTVLM_UPDATE_GOLDEN"):
        WORKFLOW.parent.mkdir(parents=True, exist_ok=True)
        WORKFLOW.write_text(generated, encoding="utf-8", newline="\n")
    assert WORKFLOW.is_file(), f"{ci.WORKFLOW_PATH} is missing: run `python ci/workflow.py`"
    assert WORKFLOW.read_text(encoding="utf-8") == generated, (
        f"{ci.WORKFLOW_PATH} is stale: regenerate with `python ci/workflow.py` (or PORTVLM_UPDATE_GOLDEN=1)"
    )


def _check_jsonschema() -> list[str] | None:
    exe = shutil.which("check-jsonschema")
    if exe:
        return [exe]
    if importlib.util.find_spec("check_jsonschema") is not None:
        return [sys.executable, "-m", "check_jsonschema"]
    return None


def test_workflow_validates_against_githubs_schema(tmp_path, generated):
    cmd = _check_jsonschema()
    if cmd is None:
        pytest.skip("check-jsonschema is not installed (`pip install check-jsonschema`; CI installs it)")
    target = tmp_path / "portvlm.yml"
    target.write_text(generated)
    for path in (target, WORKFLOW):
        if not path.exists():
            continue
        proc = subprocess.run([*cmd, "--builtin-schema", "vendor.github-workflows", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_catches_a_broken_workflow(tmp_path, generated):
    cmd = _check_jsonschema()
    if cmd is None:
        pytest.skip("check-jsonschema is not installed (`pip install check-jsonschema`; CI installs it)")
    doc = yaml.safe_load(generated)
    doc["jobs"]["tests"]["runs-on"] = {"not": "a runner"}
    doc["jobs"]["tests"]["stepz"] = doc["jobs"]["tests"].pop("steps")
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([*cmd, "--builtin-schema", "vendor.github-workflows", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0


def test_output_is_deterministic_and_marked_generated(matrix, generated):
    assert ci.render(matrix) == generated
    assert generated.startswith("# GENERATED from matrix.yaml")
    assert "\non:\n" in generated and "'on'" not in generated
    assert str(ROOT) not in generated  # no absolute path of the checkout


def test_cpu_job_covers_exactly_the_ci_selected_cpu_cells(matrix, generated):
    doc = yaml.safe_load(generated)
    cells = select(expand(matrix), arch="cpu", ci=True)
    wanted = list(dict.fromkeys(c.model.id for c in cells if c.expected != "excluded"))
    include = doc["jobs"]["cpu"]["strategy"]["matrix"]["include"]
    assert [e["model"] for e in include] == wanted
    assert [e["session"] for e in include] == [f"test(arch='cpu', model='{m}')" for m in wanted]
    assert doc["jobs"]["cpu"]["runs-on"] == "ubuntu-latest"
    runs = [s.get("run", "") for s in doc["jobs"]["cpu"]["steps"]]
    assert 'nox -s "${{ matrix.session }}" -- --ci --publish' in runs  # results/ is uploaded: publish it


def test_gpu_jobs_run_on_self_hosted_runners_labelled_by_arch(matrix, generated):
    doc = yaml.safe_load(generated)
    gpu_archs = [a for a in matrix.archs if a.vendor != "cpu"]
    assert gpu_archs
    for arch in gpu_archs:
        job = doc["jobs"][arch.id]
        assert job["runs-on"] == ["self-hosted", arch.id]
        assert job["if"] == "github.event_name != 'pull_request'"
        models = [e["model"] for e in job["strategy"]["matrix"]["include"]]
        assert models == list(dict.fromkeys(c.model.id for c in select(expand(matrix), arch=arch.id)
                                            if c.expected != "excluded"))
        assert any("--require-hardware" in s.get("run", "") for s in job["steps"])
        if arch.runtime == "container":
            assert job["needs"] == ["images"]
            pulls = next(s["run"] for s in job["steps"] if s.get("name") == "Pull the stack images")
            for stack_id in arch.stacks:
                assert f"pull(image='{matrix.stack(stack_id).image}')" in pulls


def test_images_job_builds_and_pushes_every_containerised_stack(matrix, generated):
    doc = yaml.safe_load(generated)
    job = doc["jobs"]["images"]
    include = job["strategy"]["matrix"]["include"]
    images = [s.image for s in matrix.stacks if s.image]
    assert sorted(e["image"] for e in include) == sorted(set(images))
    for entry in include:
        assert entry["dockerfile"] == f"containers/{entry['image'].rsplit('/', 1)[-1]}/Dockerfile"
        stack = next(s for s in matrix.stacks if s.image == entry["image"])
        assert entry["tag"] == f"tf{stack.transformers}", "the tag portvlm.containers pulls and runs"
        assert (ROOT / entry["dockerfile"]).is_file(), entry["dockerfile"]
    build = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@"))
    assert build["with"]["push"] == "${{ github.event_name != 'pull_request' }}"
    assert build["with"]["context"] == "${{ steps.ctx.outputs.dir }}"
    assert "${{ env.PORTVLM_REGISTRY }}/${{ matrix.image }}:${{ matrix.tag }}" in build["with"]["tags"]
    assert 'PORTVLM_REGISTRY=ghcr.io/' in next(s["run"] for s in job["steps"] if s.get("name") == "Registry")
    assert job["permissions"]["packages"] == "write"


def test_results_are_uploaded_and_published(matrix, generated):
    doc = yaml.safe_load(generated)
    jobs = doc["jobs"]
    cell_jobs = [n for n in jobs if n not in ("tests", "images", "publish", "pages", "drift")]
    for name in cell_jobs:
        upload = next(s for s in jobs[name]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
        assert upload["with"]["path"] == "results/" and upload["if"] == "always()"
        assert upload["with"]["name"].startswith("results-")
    publish = jobs["publish"]
    assert publish["needs"] == [*cell_jobs, "drift"] and publish["if"] == "${{ !cancelled() }}"
    download = next(s for s in publish["steps"] if s.get("uses", "").startswith("actions/download-artifact@"))
    assert download["with"] == {"pattern": "results-*", "path": "results", "merge-multiple": True}
    assert any(s.get("run") == "nox -s publish" for s in publish["steps"])
    assert any(s.get("uses", "").startswith("actions/upload-pages-artifact@") for s in publish["steps"])
    assert jobs["pages"]["permissions"] == {"pages": "write", "id-token": "write"}


def test_tests_job_runs_the_readme_test_command(generated):
    doc = yaml.safe_load(generated)
    assert any(s.get("run") == "nox -s tests" for s in doc["jobs"]["tests"]["steps"])


def test_script_check_mode(tmp_path, generated):
    target = tmp_path / "wf.yml"
    script = [sys.executable, str(ROOT / "ci" / "workflow.py"), "--out", str(target), "--matrix",
              str(ROOT / "matrix.yaml")]
    assert subprocess.run([*script, "--check"], capture_output=True, timeout=120).returncode == 1
    assert subprocess.run(script, capture_output=True, timeout=120).returncode == 0
    assert target.read_text() == generated
    assert subprocess.run([*script, "--check"], capture_output=True, timeout=120).returncode == 0


def test_drift_job_runs_weekly_and_feeds_the_upstream_row(generated):
    """`nox -s drift` on the schedule (and by hand), never on pushes or pull requests; its report reaches publish."""
    doc = yaml.safe_load(generated)
    on = doc.get("on", doc.get(True))  # YAML 1.1 reads the key `on` as a boolean
    assert on["schedule"] and "workflow_dispatch" in on
    drift = doc["jobs"]["drift"]
    assert drift["if"] == ci.DRIFT_EVENTS and "schedule" in drift["if"] and "pull_request" not in drift["if"]
    runs = [s.get("run") for s in drift["steps"]]
    assert "nox -s drift" in runs
    upload = next(s for s in drift["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "results/drift/"
    commit = next(s for s in drift["steps"] if "git push" in (s.get("run") or ""))
    assert "results/drift" in commit["run"] and "schedule" in commit["if"] and drift["permissions"] == {"contents": "write"}
    publish = doc["jobs"]["publish"]
    get = next(s for s in publish["steps"] if s.get("with", {}).get("name") == upload["with"]["name"])
    assert get["with"]["path"] == "results/drift" and "needs.drift.result" in get["if"]
    steps = [s.get("name") or s.get("run") for s in publish["steps"]]
    assert steps.index(get["name"]) < steps.index("Support table, page and badges")
