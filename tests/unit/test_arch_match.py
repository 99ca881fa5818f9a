"""Issue #13, hardware newer than the matrix: a device arch matrix.yaml does not declare is named as such, runs the
nearest declared policy as `emulated` evidence, and the doctor says what to add. One decision
(portvlm.policy.match_arch) serves detection, the doctor, the runner and portvlm.patch(arch=None)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from test_doctor import CU130_ARCHS, ROCM_ARCHS, check, fake_amdsmi, fake_nvml, fake_torch, machine

from portvlm.doctor import CommandResult, diagnose
from portvlm.doctor.render import plain
from portvlm.matrix import load_matrix, parse_matrix
from portvlm.matrix.schema import Cell
from portvlm.platform import CPU, Platform, arch_id_for, detect, parse_arch_id
from portvlm.policy import match_arch, match_arch_id, match_platform, resolve_policy
from portvlm.records import Evidence
from portvlm.run import cell as cellmod
from portvlm.run import runner

ROOT = Path(__file__).resolve().parents[2]
MATRIX_TEXT = (ROOT / "portvlm" / "data" / "matrix.yaml").read_text()
MATRIX = load_matrix(ROOT / "matrix.yaml")
ARCHS = MATRIX.archs
# the matrix as it was before sm100/sm120 were declared: a B200 was then reported as sm90 "exact"
BEFORE = dataclasses.replace(MATRIX, archs=tuple(a for a in ARCHS if a.id not in ("sm100", "sm120")))


def nvidia(capability):
    return match_arch(ARCHS, vendor="nvidia", capability=capability)


# ----------------------------------------------------------------------------------------------------- the decision
@pytest.mark.parametrize(("capability", "arch"), [((7, 0), "sm70"), ((8, 0), "sm80"), ((9, 0), "sm90"),
                                                  ((10, 0), "sm100"), ((12, 0), "sm120")])
def test_declared_capability_is_exact_hardware(capability, arch):
    m = nvidia(capability)
    assert (m.match, m.arch.id, m.device, m.evidence, m.label, m.reason) == ("exact", arch, arch, "hardware", arch, None)


@pytest.mark.parametrize(("capability", "device", "policy"), [
    ((11, 0), "sm110", "sm100"),  # between two declared archs: the highest below
    ((10, 3), "sm103", "sm100"),  # B300
    ((12, 1), "sm121", "sm120"),  # GB10
    ((8, 6), "sm86", "sm80"),  # an RTX 3090 is not A100 hardware evidence
    ((7, 5), "sm75", "sm70"),
])
def test_undeclared_capability_is_named_and_emulates_the_nearest_below(capability, device, policy):
    m = nvidia(capability)
    assert (m.match, m.device, m.arch.id, m.evidence) == ("nearest", device, policy, "emulated")
    assert m.label == f"{device} (not in matrix.yaml)"
    assert f"{device} (not in matrix.yaml)" in m.reason and f"{policy}'s policy" in m.reason
    assert m.evidence_for(policy) == Evidence.EMULATED  # never `hardware` evidence of the borrowed arch


def test_below_every_declared_arch_takes_the_lowest_and_says_so():
    m = nvidia((6, 1))
    assert (m.device, m.arch.id, m.match) == ("sm61", "sm70", "nearest") and "none is below it" in m.reason


def test_blackwell_before_the_declaration_was_not_sm90_hardware():
    m = match_arch(BEFORE.archs, vendor="nvidia", capability=(10, 0))
    assert (m.device, m.arch.id, m.match, m.evidence) == ("sm100", "sm90", "nearest", "emulated")
    assert m.evidence_for("sm90") == "emulated" and m.label == "sm100 (not in matrix.yaml)"


@pytest.mark.parametrize(("gfx", "device", "policy", "match"), [
    ("gfx942", "gfx942", "gfx942", "exact"), ("gfx90a:sramecc+:xnack-", "gfx90a", "gfx90a", "exact"),
    ("gfx950", "gfx950", "gfx942", "nearest"), ("gfx1100", "gfx1100", "gfx942", "nearest"),
    ("gfx908", "gfx908", "gfx90a", "nearest"),  # below every declared gfx: the lowest
])
def test_amd_gfx_targets(gfx, device, policy, match):
    m = match_arch(ARCHS, vendor="amd", gfx=gfx)
    assert (m.device, m.arch.id, m.match) == (device, policy, match)
    assert (m.reason is None) == (match == "exact")


def test_cpu_unread_and_undeclared_vendors():
    assert match_arch(ARCHS, vendor="cpu").label == "cpu" and match_platform(CPU, ARCHS).exact
    unread = match_arch(ARCHS, vendor="nvidia")
    assert unread.arch is None and unread.match == "none" and "could not be read" in unread.reason
    no_amd = match_arch(tuple(a for a in ARCHS if a.vendor != "amd"), vendor="amd", gfx="gfx942")
    assert no_amd.arch is None and "declares no amd arch" in no_amd.reason


def test_arch_ids_round_trip_and_the_runner_adapter_agrees():
    for cap in ((7, 0), (8, 6), (10, 0), (10, 3), (11, 0), (12, 1)):
        assert parse_arch_id(arch_id_for(cap)) == ("nvidia", cap, None)
        assert match_arch_id(arch_id_for(cap), ARCHS) == nvidia(cap)
    assert parse_arch_id("gfx950") == ("amd", None, "gfx950") and parse_arch_id("cpu") == ("cpu", None, None)
    assert parse_arch_id("hopper") == (None, None, None) and match_arch_id("hopper", ARCHS).match == "none"


# ----------------------------------------------------------------------------------------------------- detection
def gpu_machine(name, capability, transformers="5.17.0"):
    mods = {**fake_torch("2.11.0+cu130", cuda="13.0", archs=CU130_ARCHS, devices=[(name, capability, 183359, None)]),
            "pynvml": fake_nvml([(name, capability, 183359)])}
    return machine(mods, versions={"transformers": transformers})


def test_detect_names_the_device_arch_not_the_nearest_declared():
    assert detect(gpu_machine("NVIDIA B200", (10, 0))).arch_id == "sm100"
    assert detect(gpu_machine("NVIDIA RTX PRO 6000 Blackwell", (12, 0))).arch_id == "sm120"
    assert detect(gpu_machine("NVIDIA Thor", (11, 0))).arch_id == "sm110"


# ----------------------------------------------------------------------------------------------------- doctor
def doctor(probes, matrix=MATRIX):
    from portvlm.doctor import collect

    return diagnose(collect(probes), matrix)


def test_doctor_b200_is_exact_hardware_once_declared():
    report = doctor(gpu_machine("NVIDIA B200", (10, 0)))
    assert (report.arch, report.arch_match, report.evidence, report.device_arch, report.declared) == (
        "sm100", "exact", "hardware", "sm100", True)
    assert check(report, "arch").status == "ok" and report.add_to_matrix is None
    assert check(report, "kernel_image").status == "ok"  # cu130 carries sm_100
    fam = next(f for f in report.families if f.model == "qwen2_5vl")
    assert fam.cell == "sm100--qwen2_5vl--cu130-torch2.11.0-tf5.17.0" and fam.dtype == "bfloat16"
    assert fam.vision.chosen == "torch_varlen"


def test_doctor_b200_before_the_declaration_said_emulated_sm90():
    report = doctor(gpu_machine("NVIDIA B200", (10, 0)), BEFORE)
    assert (report.arch, report.arch_match, report.evidence, report.device_arch) == ("sm90", "nearest", "emulated",
                                                                                     "sm100")
    assert "sm100:" not in (check(report, "arch").fix or "") and "- id: sm100" in check(report, "arch").fix


def _with_entry(entry: str):
    """matrix.yaml with the doctor's suggested entry pasted under archs:."""
    assert MATRIX_TEXT.count("\narchs:\n") == 1
    return parse_matrix(MATRIX_TEXT.replace("\narchs:\n", "\narchs:\n" + entry + "\n\n", 1).encode(), "pasted.yaml")


def test_doctor_undeclared_capability_names_it_emulates_the_nearest_and_suggests_the_entry():
    probes = gpu_machine("NVIDIA B300", (10, 3))
    report = doctor(probes)
    assert (report.arch, report.arch_match, report.evidence, report.device_arch, report.declared) == (
        "sm100", "nearest", "emulated", "sm103", False)
    assert "sm103 (not in matrix.yaml)" in report.evidence_note and "sm100" in report.evidence_note
    arch = check(report, "arch")
    assert arch.status == "warn" and "NVIDIA B300" in arch.message and "sm103 (not in matrix.yaml)" in arch.message
    assert arch.fix.startswith("add sm103 to portvlm/data/matrix.yaml under archs:") and report.add_to_matrix in arch.fix
    # the families run sm100's policy: what portvlm.patch(arch=None) would do here
    fam = next(f for f in report.families if f.model == "qwen2_5vl")
    assert fam.cell.startswith("sm100--") and fam.dtype == "bfloat16"
    # the entry is valid matrix.yaml; pasted in, the same machine is an exact, hardware match
    pasted = _with_entry(report.add_to_matrix)
    new = pasted.arch("sm103")
    assert (new.vendor, new.capability, new.dtypes) == ("nvidia", (10, 3), MATRIX.arch("sm100").dtypes)
    assert new.stacks == MATRIX.arch("sm100").stacks  # sm_100 cubins run on 10.3
    again = doctor(probes, pasted)
    assert (again.arch, again.arch_match, again.evidence, again.add_to_matrix) == ("sm103", "exact", "hardware", None)
    text = plain(report)
    assert "arch    sm103 (not in matrix.yaml) → policy sm100 (nearest) · evidence emulated" in text
    assert "                         - id: sm103" in text  # the entry is printed under the fix, indented


def test_doctor_entry_says_when_no_stack_is_known_to_carry_the_kernels():
    report = doctor(gpu_machine("NVIDIA Thor", (11, 0)))
    assert (report.device_arch, report.arch) == ("sm110", "sm100")
    assert "none of sm100's stacks is known to carry sm110 kernels" in report.add_to_matrix
    assert "torch 2.11+cu130 carries no sm_110 cubin" in report.add_to_matrix
    new = _with_entry(report.add_to_matrix).arch("sm110")  # still a valid entry: an arch needs a stack
    assert new.capability == (11, 0) and new.stacks == MATRIX.arch("sm100").stacks


def test_doctor_entry_leaves_out_stacks_without_the_kernels():
    """sm86 borrows sm80's policy: its stacks whose torch carries sm_8x cubins are kept, one of unknown build is not."""
    cu118 = dataclasses.replace(MATRIX.stack("volta-cu118-torch2.3.1-tf4.50.3"), id="old-cu118")
    sm80 = dataclasses.replace(MATRIX.arch("sm80"), stacks=MATRIX.arch("sm80").stacks + ("old-cu118", "no-facts"))
    odd = dataclasses.replace(MATRIX.stack("cu130-torch2.11.0-tf5.17.0"), id="no-facts", torch="2.0.0")
    matrix = dataclasses.replace(MATRIX, archs=tuple(sm80 if a.id == "sm80" else a for a in MATRIX.archs),
                                 stacks=MATRIX.stacks + (cu118, odd))
    report = doctor(gpu_machine("NVIDIA RTX A6000", (8, 6)), matrix)
    assert (report.device_arch, report.arch) == ("sm86", "sm80")
    assert "stacks: [cu130-torch2.11.0-tf5.17.0, cu130-torch2.11.0-tf4.57.6, old-cu118]" in report.add_to_matrix
    assert "left out: torch 2.0+cu130's arch list is not in portvlm's facts" in report.add_to_matrix


def test_doctor_unknown_amd_gfx_is_named_and_the_entry_carries_its_gfx():
    rocminfo = CommandResult(0, "*******\nAgent 2\n*******\n  Name:                    gfx950\n"
                                "  Marketing Name:          AMD Instinct MI355X\n  Device Type:             GPU\n")
    mods = {**fake_torch("2.13.0+rocm7.2", hip="7.2.26015", archs=ROCM_ARCHS + ("gfx950",),
                         devices=[("AMD Instinct MI355X", None, 294896, "gfx950")]),
            "amdsmi": fake_amdsmi([("AMD Instinct MI355X", "gfx950", 294896)])}
    report = doctor(machine(mods, versions={"transformers": "5.23.0"}, commands={"rocminfo": rocminfo}))
    assert (report.arch, report.arch_match, report.evidence, report.device_arch) == ("gfx942", "nearest", "emulated",
                                                                                     "gfx950")
    assert "gfx950 (not in matrix.yaml)" in check(report, "arch").message
    new = _with_entry(report.add_to_matrix).arch("gfx950")
    assert (new.vendor, new.gfx, new.stacks) == ("amd", "gfx950", MATRIX.arch("gfx942").stacks)
    assert "check that each stack's torch lists gfx950" in report.add_to_matrix


# ----------------------------------------------------------------------------------------------------- patch policy
SM110 = Platform(vendor="nvidia", device="cuda", name="NVIDIA Thor", capability=(11, 0), arch_id="sm110")
B200 = Platform(vendor="nvidia", device="cuda", name="NVIDIA B200", capability=(10, 0), arch_id="sm100")


def test_patch_policy_on_an_undeclared_host_is_the_nearest_emulated_with_the_reason():
    policy = resolve_policy(None, host=SM110)
    assert policy.arch.id == "sm100" and policy.platform.emulating == "sm100" and policy.dtype == "bfloat16"
    assert "sm110 (not in matrix.yaml)" in policy.emulation and "policy of sm100" in policy.emulation
    assert policy.host.device == "sm110" and not policy.host.exact


def test_patch_policy_on_a_declared_blackwell_is_its_own():
    policy = resolve_policy(None, host=B200)
    assert (policy.arch.id, policy.emulation, policy.platform) == ("sm100", None, B200)
    assert policy.vision_backends == MATRIX.arch("sm90").vision_backends


# ----------------------------------------------------------------------------------------------------- runner
def _cell(arch_id, stack="cu130-torch2.11.0-tf5.17.0"):
    return Cell(MATRIX.arch(arch_id), MATRIX.stack(stack), MATRIX.models[0])


def test_runner_plans_hardware_only_on_the_declared_arch_itself():
    assert runner.plan_cell(_cell("sm100"), "sm100", archs=ARCHS).evidence == "hardware"
    sm90_on_b200 = runner.plan_cell(_cell("sm90"), "sm100", archs=ARCHS)
    assert sm90_on_b200.evidence == "emulated" and "host is sm100: sm90's policy runs emulated" in sm90_on_b200.reason
    on_thor = runner.plan_cell(_cell("sm100"), "sm110", archs=ARCHS)
    assert on_thor.evidence == "emulated" and "host is sm110, not in matrix.yaml" in on_thor.reason
    refused = runner.plan_cell(_cell("sm100"), "sm110", archs=ARCHS, require_hardware=True)
    assert refused.mode == "refuse" and "this host is sm110, not in matrix.yaml" in refused.reason


def test_cell_notes_name_the_undeclared_host_and_the_policy_run():
    actual = {"torch": "2.11.0+cu130", "transformers": "5.17.0", "python": "3.12.3"}
    thor = Platform("nvidia", "cuda", "NVIDIA Thor", capability=(11, 0), arch_id="sm110")
    policy = resolve_policy("sm100", matrix=MATRIX, host=thor)
    notes = cellmod.differences(_cell("sm100"), actual, thor, policy, ARCHS)
    assert notes == ["ran on NVIDIA Thor (sm110, not in matrix.yaml) instead of sm100: sm100's policy (dtype "
                     "bfloat16, backend priority torch_varlen, flex_document, efficient_varlen, sdpa_masked) with this "
                     "device's kernels"]
    b200 = Platform("nvidia", "cuda", "NVIDIA B200", capability=(10, 0), arch_id="sm100")
    assert cellmod.differences(_cell("sm100"), actual, b200, resolve_policy("sm100", matrix=MATRIX, host=b200),
                               ARCHS) == []


def test_runner_records_emulated_evidence_for_a_borrowed_policy(tmp_path, monkeypatch):
    """End to end through run_many: the child is told `emulated` and the record keeps it with the reason."""
    monkeypatch.setenv("PORTVLM_LOGS", str(tmp_path / "logs"))
    script = tmp_path / "fakepython"
    script.write_text(f"#!{sys.executable}\nimport sys, json\n"
                      "out = sys.argv[sys.argv.index('--out') + 1]\n"
                      "ev = sys.argv[sys.argv.index('--evidence') + 1]\n"
                      "json.dump({'evidence': ev, 'evidence_notes': ['ran on NVIDIA Thor (sm110, not in matrix.yaml)'],"
                      " 'suites': {'parity': {'name': 'parity', 'status': 'pass'}}}, open(out, 'w'))\n")
    script.chmod(0o755)
    said = []
    results = runner.run_many([_cell("sm100")], results_dir=tmp_path / "res", host_arch="sm110", python=str(script),
                              timeout=60, say=said.append, archs=ARCHS)
    (r,) = results
    assert (r.status, r.evidence) == ("pass", "emulated") and "sm110, not in matrix.yaml" in r.evidence_notes[0]
    assert any("evidence emulated" in line for line in said)


def test_detection_reads_no_matrix(monkeypatch):
    """Detection names the device without the matrix: on an H200 whose python lacked jsonschema, the matrix lookup
    detection used to make raised, and `portvlm doctor` reported no GPU at all."""
    import portvlm.matrix
    import portvlm.matrix.load

    def broken(*args, **kwargs):
        raise portvlm.matrix.MatrixError("could not read the matrix (ModuleNotFoundError: No module named 'jsonschema')")

    for module in (portvlm.matrix, portvlm.matrix.load):
        for name in ("load_matrix", "parse_matrix", "default_matrix"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, broken)
    smi = CommandResult(0, "0, NVIDIA H200, 9.0, 143771, 580.159.04\n")
    p = detect(machine({}, commands={"nvidia-smi --query": smi}))
    assert (p.vendor, p.name, p.capability, p.arch_id, p.source) == ("nvidia", "NVIDIA H200", (9, 0), "sm90", "nvidia-smi")
