"""transformers 5.25 / torch 2.15 (issue #25), without torch: declared overrides of unsatisfiable pins, the doctor's
hub-kernel and no-sm_70 verdicts (fake probes), and ``patch``'s refusal naming the version to install."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_doctor import CU126_ARCHS, check, fake_torch, machine, report_for, v100

from portvlm.errors import MatrixError, UnsupportedError
from portvlm.matrix import load_matrix, parse_matrix
from portvlm.run import env as envs
from portvlm.run.env import env_main
from portvlm.shims import versions

ROOT = Path(__file__).resolve().parents[2]
MATRIX = load_matrix(ROOT / "matrix.yaml")
TORCH_215_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")  # the PyPI 2.15.0+cu132 wheel
NEEDS = "kernels<0.20,>=0.19.1"  # transformers 5.25.0's Requires-Dist, as its metadata writes it


# ----------------------------------------------------------------------------------------------- overrides
def test_the_525_stack_declares_its_kernels_override_with_a_reason():
    stack = MATRIX.stack("cpu-tf5.25.0")
    (override,) = stack.overrides
    assert (override.package, override.pin, override.install) == ("kernels", "kernels>=0.19.1,<0.20", "none")
    assert override.excluded and "0.17.2" in override.reason
    assert override.describe().startswith("kernels>=0.19.1,<0.20 overridden: not installed (")
    assert stack.ci and stack in MATRIX.ci_cpu_stacks()


def _matrix_with(override: str) -> bytes:
    text = (ROOT / "matrix.yaml").read_text()
    block = re.search(r"    overrides:\n(      .*\n)+", text).group(0)
    return text.replace(block, "    overrides:\n" + override).encode()


@pytest.mark.parametrize(("override", "words"), [
    ('      - {package: kernels, pin: "kernels>=0.19.1,<0.20", reason: "x"}\n', "install"),
    ('      - {package: kernels, pin: "flash-attn>=2", install: none, reason: "x"}\n', "names 'flash-attn'"),
    ('      - {package: kernels, pin: "kernels>=0.19.1", install: "kernels=0.17", reason: "x"}\n', "not a requirement"),
])
def test_an_override_that_does_not_name_its_package_is_refused_with_the_fix(override, words):
    with pytest.raises(MatrixError) as err:
        parse_matrix(_matrix_with(override), "matrix.yaml")
    assert words in str(err.value)


def test_an_override_with_a_replacement_parses_and_goes_to_uv_as_an_override():
    m = parse_matrix(_matrix_with('      - {package: kernels, pin: "kernels>=0.19.1,<0.20", install: "kernels==0.17.2", '
                                  'reason: "the index has 0.17.2"}\n'), "matrix.yaml")
    spec = envs.EnvSpec.for_stack(m.stack("cpu-tf5.25.0"))
    assert spec.excludes == () and spec.overrides == ("kernels==0.17.2",)
    assert "kernels==0.17.2 installed instead" in spec.notes[0]


def test_the_env_of_a_stack_with_an_exclusion_is_its_own_and_says_so(tmp_path):
    stack = MATRIX.stack("cpu-tf5.25.0")
    spec = envs.EnvSpec.for_stack(stack)
    assert spec.excludes == ("kernels",) and spec.key.endswith("-no-kernels")
    assert spec.key != envs.EnvSpec(stack.python, "2.13.0+cpu", "5.25.0").key  # never shares a venv with a plain one
    assert "exclude kernels" in spec.resolution()
    args = envs.override_args(spec.excludes, spec.overrides, tmp_path)
    assert args == ["--excludes", str(tmp_path / "excludes.txt")] and (tmp_path / "excludes.txt").read_text() == "kernels\n"
    emulated = envs.EnvSpec.for_stack(stack, python="3.12", torch="2.13.0+cpu")  # an emulated cell keeps the override
    assert emulated.excludes == ("kernels",)


def test_python_m_portvlm_run_env_applies_the_declared_override(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("portvlm.run.env.ensure_env", lambda spec: seen.append(spec) or "/venv/bin/python")
    assert env_main(["--transformers", "5.25.0", "--torch", "2.13.0+cpu", "--python", "3.11"]) == 0
    assert seen[-1].excludes == ("kernels",)
    assert "overridden: not installed" in capsys.readouterr().err  # never silent
    assert env_main(["--stack", "cpu-tf5.24.0"]) == 0 and seen[-1].excludes == ()
    assert env_main(["--stack", "cpu-tf5.25.0", "--transformers", "5.24.0"]) == 2


# ----------------------------------------------------------------------------------------------- hub kernels
def _cpu(tf="5.25.0", kernels=None, env=None, requires=(NEEDS, 'kernels<0.20,>=0.19.1; extra == "torch"')):
    versions_ = {"transformers": tf, **({"kernels": kernels} if kernels else {})}
    return machine(fake_torch(), versions=versions_, requires={"transformers": requires}, env=env)


def test_doctor_says_from_pretrained_will_raise_without_kernels_and_names_both_fixes():
    hub = check(report_for(_cpu()), "hub_kernels")
    assert hub.status == "fail"
    assert "from_pretrained will raise" in hub.message and "needs kernels>=0.19.1,<0.20" in hub.message
    assert "kernels is not installed" in hub.message
    assert "USE_HUB_KERNELS=0" in hub.fix and "pip install 'kernels>=0.19.1,<0.20'" in hub.fix
    too_old = check(report_for(_cpu(kernels="0.17.2")), "hub_kernels")
    assert too_old.status == "fail" and "kernels 0.17.2 is installed" in too_old.message


def test_doctor_hub_kernels_ok_when_switched_off_or_not_loaded_by_default():
    assert check(report_for(_cpu(env={"USE_HUB_KERNELS": "0"})), "hub_kernels").status == "ok"
    older = report_for(_cpu(tf="5.24.0", requires=('kernels<0.20,>=0.19.1; extra == "kernels"',)))
    assert "hub_kernels" not in [c.id for c in older.checks]  # kernels only under an extra: loaded only if asked


def test_doctor_on_v100_with_kernels_says_the_sm70_policy_keeps_them_off():
    probes = machine(v100("2.14.1+cu126"), versions={"transformers": "5.25.0", "kernels": "0.19.1"},
                     requires={"transformers": (NEEDS,)})
    hub = check(report_for(probes), "hub_kernels")
    assert hub.status == "warn" and "sm70 policy keeps them off" in hub.message and "USE_HUB_KERNELS=0" in hub.fix
    cpu = check(report_for(_cpu(kernels="0.19.1")), "hub_kernels")
    assert cpu.status == "info" and "cpu policy allows them" in cpu.message


# ----------------------------------------------------------------------------------------------- torch 2.15
def test_doctor_on_v100_with_a_torch_without_sm70_names_the_last_torch_for_volta():
    probes = machine(v100("2.15.0+cu132", cuda="13.2", archs=TORCH_215_ARCHS), versions={"transformers": "5.25.0"})
    kernel = check(report_for(probes), "kernel_image")
    assert kernel.status == "fail"
    assert "torch was built for sm_75 sm_80 sm_86 sm_90 sm_100 sm_120; none runs on sm_70" in kernel.message
    assert "no torch 2.15 build ships sm_70: the last torch for sm70 is 2.14.1+cu126" in kernel.message
    assert kernel.fix.startswith("pip install 'torch==2.14.1' --index-url ") and kernel.fix.split()[4].endswith("/cu126")


def test_doctor_reads_the_arch_list_not_the_version():
    # A (hypothetical) 2.15 build that lists sm_70 passes: the verdict comes from what the build was compiled for.
    ok = machine(v100("2.15.0+cu126", cuda="12.6", archs=CU126_ARCHS), versions={"transformers": "5.25.0"})
    assert check(report_for(ok), "kernel_image").status == "ok"
    # and a 2.14 build without sm_70 fails although 2.14 + cu126 would have it
    bad = machine(v100("2.14.1+cu130", cuda="13.0", archs=TORCH_215_ARCHS), versions={"transformers": "5.25.0"})
    kernel = check(report_for(bad), "kernel_image")
    assert kernel.status == "fail" and "no torch 2.14 build" not in kernel.message


# ----------------------------------------------------------------------------------------------- the version gate
def test_patch_refusal_names_the_newest_verified_version_as_the_doctor_does():
    newest = versions.newest_verified()
    assert newest == "5.25.0"
    with pytest.raises(UnsupportedError) as err:
        versions.check_transformers(versions.parse("5.26.0"), environ={})
    assert f"pip install 'transformers=={newest}'" in str(err.value) and "PORTVLM_ALLOW_UNVERIFIED=1" in str(err.value)
    doctor = check(report_for(machine(fake_torch(), versions={"transformers": "5.26.0"})), "transformers")
    assert doctor.status == "fail" and f"pip install 'transformers=={newest}'" in doctor.fix


def test_newest_verified_skips_stacks_outside_the_verified_range():
    assert versions.newest_verified(["4.50.3", "5.25.0", "9.0.0"]) == "5.25.0"
    assert versions.newest_verified(["9.0.0"]) is None
