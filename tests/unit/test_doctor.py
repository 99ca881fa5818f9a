"""portvlm doctor without torch: every machine is described by fakes handed to ``Probes``.

Covers the faults the issue lists (torch missing / failing to import, no GPU, NVML and nvidia-smi missing or
failing, xformers built for another torch, flash-attn on sm70, an unknown ROCm gfx, transformers older than every
stack) plus the lanes: V100+cu130 (kernel image), V100+cu126 (+flash-attn), H100+cu130, MI300, CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from portvlm.doctor import SCHEMA, CommandResult, Probes, collect, diagnose, main
from portvlm.matrix import load_matrix
from portvlm.platform import CPU, detect, emulated, kernel_image_reasons

ROOT = Path(__file__).resolve().parents[2]
MATRIX = load_matrix(ROOT / "matrix.yaml")

CU130_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")
CU126_ARCHS = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
CU118_ARCHS = ("sm_37", "sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
ROCM_ARCHS = ("gfx900", "gfx906", "gfx908", "gfx90a", "gfx942", "gfx1030", "gfx1100")


# ----------------------------------------------------------------------------------------------------- fakes
def fake_torch(version="2.13.0+cpu", cuda=None, hip=None, archs=(), devices=(), varlen=True, tf32=False):
    """A torch facade: version, build, arch list, devices (name, (major, minor), MiB, gfx)."""
    props = [SimpleNamespace(name=n, major=c[0] if c else 9, minor=c[1] if c else 4, total_memory=mib << 20,
                             gcnArchName=gfx) for n, c, mib, gfx in devices]
    cuda_ns = SimpleNamespace(
        is_available=lambda: bool(devices),
        device_count=lambda: len(devices),
        get_arch_list=lambda: list(archs) if devices else [],
        get_device_properties=lambda i: props[i],
    )
    torch = SimpleNamespace(
        __version__=version,
        __file__="site-packages/torch/__init__.py",
        version=SimpleNamespace(cuda=cuda, hip=hip),
        cuda=cuda_ns,
        backends=SimpleNamespace(cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=tf32)),
                                 cudnn=SimpleNamespace(version=lambda: 91002, allow_tf32=True)),
        nn=SimpleNamespace(functional=SimpleNamespace(scaled_dot_product_attention=object())),
        ops=SimpleNamespace(aten=SimpleNamespace(_efficient_attention_forward=1, _efficient_attention_backward=1)),
        _C=SimpleNamespace(_cuda_getArchFlags=lambda: " ".join(archs)),
    )
    modules = {"torch": torch, "torch.nn.attention.flex_attention": SimpleNamespace(flex_attention=object())}
    if varlen:
        modules["torch.nn.attention.varlen"] = SimpleNamespace(varlen_attn=object())
    return modules


def fake_nvml(gpus, driver="580.82.07", cuda_driver=13000, init_error=None):
    """pynvml facade: gpus = [(name, (major, minor), MiB)]."""
    handles = list(range(len(gpus)))

    def init():
        if init_error:
            raise init_error

    return SimpleNamespace(
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: handles[i],
        nvmlDeviceGetName=lambda h: gpus[h][0].encode(),
        nvmlDeviceGetCudaComputeCapability=lambda h: gpus[h][1],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=gpus[h][2] << 20),
        nvmlSystemGetDriverVersion=lambda: driver,
        nvmlSystemGetCudaDriverVersion_v2=lambda: cuda_driver,
    )


def fake_amdsmi(gpus, driver="6.10.5"):
    """amdsmi facade: gpus = [(market name, gfx, MiB)]."""
    return SimpleNamespace(
        amdsmi_init=lambda: None,
        amdsmi_shut_down=lambda: None,
        amdsmi_get_processor_handles=lambda: list(range(len(gpus))),
        amdsmi_get_gpu_asic_info=lambda h: {"market_name": gpus[h][0], "target_graphics_version": gpus[h][1]},
        amdsmi_get_gpu_vram_info=lambda h: {"vram_size": gpus[h][2]},
        amdsmi_get_gpu_driver_info=lambda h: {"driver_version": driver},
    )


def fake_xformers(version="0.0.30", torch_pin="2.7.0", built_for="2.7.0+cu118", load_error=None, ops=None):
    ops = ops if ops is not None else [
        SimpleNamespace(NAME="cutlassF-pt", OPERATOR=object(), SUPPORTED_DEVICES={"cuda"},
                        SUPPORTED_DTYPES={"torch.float32", "torch.float16", "torch.bfloat16"}),
        SimpleNamespace(NAME="fa2F@2.5.7-pt", OPERATOR=object(), SUPPORTED_DEVICES={"cuda"},
                        CUDA_MINIMUM_COMPUTE_CAPABILITY=(8, 0), SUPPORTED_DTYPES={"torch.float16", "torch.bfloat16"}),
    ]
    meta = SimpleNamespace(torch_version=built_for, cuda_version="1108", hip_version=None)
    return {
        "xformers": SimpleNamespace(__version__=version),
        "xformers._cpp_lib": SimpleNamespace(_cpp_library_load_exception=load_error, _build_metadata=meta),
        "xformers.ops.fmha": SimpleNamespace(ALL_FW_OPS=ops),
    }, {"xformers": version}, {"xformers": (f"torch =={torch_pin}", "numpy")}


def machine(modules=None, versions=None, requires=None, commands=None, env=None, files=None):
    """Probes for a described machine. Unlisted modules are not installed; unlisted commands are missing."""
    modules = dict(modules or {})
    versions = dict(versions or {})
    commands = dict(commands or {})

    def import_module(name):
        if name in modules:
            value = modules[name]
            if isinstance(value, BaseException):
                raise value
            return value
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    def run(argv):
        key = argv[0] if argv[0] != "nvidia-smi" or len(argv) == 1 else "nvidia-smi --query"
        value = commands.get(key)
        return value

    with contextlib.suppress(Exception):  # no torch, a failing import, or a hostile facade
        versions.setdefault("torch", modules["torch"].__version__)
    return Probes(
        import_module=import_module,
        run=run,
        env=dict(env or {}),
        version_of=lambda name: versions.get(name),
        requires_of=lambda name: (requires or {}).get(name),
        read_text=lambda path: (files or {}).get(path),
        host=lambda: {"os": "Linux-test", "machine": "x86_64", "python": "3.11.7", "executable": "python",
                      "cpu_count": 8, "processor": "x86_64"},
    )


def report_for(probes, matrix=MATRIX):
    return diagnose(collect(probes), matrix)


def check(report, check_id):
    found = [c for c in report.checks if c.id == check_id]
    assert found, f"no {check_id} check in {[c.id for c in report.checks]}"
    return found[0]


def family(report, model="qwen2_5vl"):
    return next(f for f in report.families if f.model == model)


def v100(torch_version="2.13.0+cu126", cuda="12.6", archs=CU126_ARCHS, **extra):
    mods = {**fake_torch(torch_version, cuda=cuda, archs=archs, devices=[("Tesla V100-SXM2-32GB", (7, 0), 32768, None)]),
            "pynvml": fake_nvml([("Tesla V100-SXM2-32GB", (7, 0), 32768)], driver="570.86.15", cuda_driver=12080)}
    mods.update(extra.pop("modules", {}))
    return mods


def h100(**extra):
    return {**fake_torch("2.11.0+cu130", cuda="13.0", archs=CU130_ARCHS,
                         devices=[("NVIDIA H100 80GB HBM3", (9, 0), 81559, None)]),
            "pynvml": fake_nvml([("NVIDIA H100 80GB HBM3", (9, 0), 81559)])}


# ----------------------------------------------------------------------------------------------------- lanes
def test_cpu_is_ok_with_an_evidence_note():
    probes = machine(fake_torch(), versions={"transformers": "5.23.0"})
    report = report_for(probes)
    assert report.env.platform.vendor == "cpu" and report.arch == "cpu" and report.arch_match == "exact"
    assert report.verdict == "OK"
    assert "emulated" in report.evidence_note and report.evidence == "hardware"
    fam = family(report)
    assert fam.cell == "cpu--qwen2_5vl--cpu-tf5.23.0" and fam.match == "exact"
    assert fam.vision.chosen == "sdpa_masked" and fam.text.chosen == "sdpa_masked"
    assert fam.dtype == "float32"
    names = {s.name for s in fam.shims}
    assert {"layer_paths", "kv_cache"} <= names and "vision_dense_mask" not in names
    assert all(s.source == "declared" for s in fam.shims)  # portvlm.shims.patch.SHIMS, filtered by range


def test_shims_listing_follows_the_transformers_version():
    report = report_for(machine(fake_torch(), versions={"transformers": "4.53.3"}))
    names = [s.name for s in family(report).shims]
    assert "vision_dense_mask" in names and "text_registry" in names
    old = report_for(machine(fake_torch(), versions={"transformers": "4.50.3"}))
    assert "text_registry" not in [s.name for s in family(old).shims]  # no AttentionMaskInterface before 4.53
    shims = {s.name: s for s in family(report_for(machine(fake_torch(), versions={"transformers": "4.52.4"}))).shims}
    assert shims["vision_varlen"].label == "class patching" and shims["kv_cache"].label == "key_cache lists"
    assert "text_classes" in shims and "text_registry_legacy" not in shims  # per family: Qwen2.5-VL patches classes


def test_shims_listing_follows_the_declarations(monkeypatch):
    """Change a declaration and the doctor follows: range, families and label come from SHIMS, not from the doctor."""
    import dataclasses

    from portvlm.shims import patch

    probes = machine(fake_torch(), versions={"transformers": "5.23.0"})
    before = {s.name: s for s in family(report_for(probes)).shims}
    assert "kv_cache" in before and "vision_dense_mask" not in before
    changed = tuple(
        dataclasses.replace(s, labels=((">=5.0", "a relabelled cache"),)) if s.name == "kv_cache"
        else dataclasses.replace(s, present=None) if s.name == "vision_dense_mask"
        else dataclasses.replace(s, families=("llava",)) if s.name == "layer_paths"
        else s
        for s in patch.SHIMS
    )
    monkeypatch.setattr(patch, "SHIMS", changed)
    after = {s.name: s for s in family(report_for(probes)).shims}
    assert after["kv_cache"].label == "a relabelled cache"
    assert "vision_dense_mask" in after  # its declared range >=4.53.0 admits 5.23.0 once `present` is gone
    assert "layer_paths" not in after  # now declared for LLaVA only; the family shown is Qwen2.5-VL


def test_h100_cu130_is_ok_and_chooses_torch_varlen():
    report = report_for(machine(h100(), versions={"transformers": "5.17.0"}))
    assert report.verdict == "OK", [(c.id, c.message) for c in report.checks if c.status != "ok"]
    assert report.arch == "sm90" and report.env.platform.source == "nvml"
    fam = family(report)
    assert fam.cell == "sm90--qwen2_5vl--cu130-torch2.11.0-tf5.17.0" and fam.match == "exact"
    assert fam.differences == ()
    assert fam.dtype == "bfloat16"
    assert fam.vision.chosen == "torch_varlen"
    assert "usable, ranked below torch_varlen" in fam.vision.lost["efficient_varlen"][0]
    assert fam.text.chosen == "sdpa_masked"
    assert "bf16 native" in check(report, "precision").message
    assert check(report, "kernel_image").status == "ok"


def test_v100_with_cu130_torch_fails_the_kernel_image_check_naming_builds_that_work():
    probes = machine(v100("2.11.0+cu130", cuda="13.0", archs=CU130_ARCHS), versions={"transformers": "5.23.0"})
    report = report_for(probes)
    kernel = check(report, "kernel_image")
    assert kernel.status == "fail"
    assert "no kernel image is available" in kernel.message and "sm_70" in kernel.message
    assert "cu126" in kernel.fix and "cu118" in kernel.fix and "cu130" in kernel.fix  # "cu130/cu132 never ship"
    assert "download.pytorch.org/whl/cu126" in kernel.fix
    assert report.verdict == "FAIL"
    assert all(f.verdict == "FAIL" for f in report.families)
    assert family(report).fix == kernel.fix
    # the driver (CUDA 12.8) cannot run a CUDA 13.0 build either
    assert check(report, "driver").status == "fail"
    assert main(["--strict"], probes=probes, stdout=io.StringIO()) == 1


def test_v100_cu126_is_ok_without_bf16_and_picks_efficient_varlen():
    report = report_for(machine(v100("2.14.1+cu126"), versions={"transformers": "5.24.0"}))
    assert report.arch == "sm70"
    assert check(report, "kernel_image").status == "ok"
    precision = check(report, "precision")
    assert "bf16 emulated only" in precision.message and "is_bf16_supported" in precision.message
    fam = family(report)
    assert fam.cell == "sm70--qwen2_5vl--volta-cu126-torch2.14.1-tf5.24.0"
    assert fam.dtype == "float16"
    assert fam.vision.chosen == "efficient_varlen"
    assert report.verdict == "OK"


def test_v100_cu126_with_flash_attn_installed_warns_with_the_known_failures():
    mods = v100("2.14.1+cu126")
    mods["flash_attn"] = SimpleNamespace(__version__="2.8.3")
    report = report_for(machine(mods, versions={"transformers": "5.24.0", "flash-attn": "2.8.3"}))
    fa = check(report, "flash_attn")
    assert fa.status == "warn"
    assert "ms-swift#5002" in fa.message and "EasyR1#160" in fa.message and "sm80" in fa.message
    assert fa.fix == "pip uninstall -y flash-attn"
    assert report.verdict == "WARN" and family(report).verdict == "WARN"
    assert family(report).fix == "pip uninstall -y flash-attn"


def test_mi300_gfx942_is_ok_with_efficient_varlen_and_sdpa():
    mods = {**fake_torch("2.13.0+rocm7.2", hip="7.2.26015", archs=ROCM_ARCHS,
                         devices=[("AMD Instinct MI300X", None, 196592, "gfx942:sramecc+:xnack-")]),
            "amdsmi": fake_amdsmi([("AMD Instinct MI300X", "gfx942", 196592)])}
    report = report_for(machine(mods, versions={"transformers": "5.23.0"},
                                files={"/opt/rocm/.info/version": "7.2.0-43\n"}))
    assert report.env.platform.vendor == "amd" and report.env.platform.gfx == "gfx942"
    assert report.env.rocm == "7.2.0"
    assert report.arch == "gfx942" and report.verdict == "OK", [(c.id, c.message) for c in report.checks]
    assert check(report, "aotriton").status == "ok"
    fam = family(report)
    assert fam.cell == "gfx942--qwen2_5vl--rocm7.2-torch2.13.0-tf5.23.0"
    assert fam.vision.chosen == "efficient_varlen" and fam.text.chosen == "sdpa_masked"
    assert fam.dtype == "bfloat16"


# ----------------------------------------------------------------------------------------------------- faults
def test_torch_missing():
    report = report_for(machine({}, versions={"transformers": "5.23.0"}))
    torch = check(report, "torch")
    assert torch.status == "fail" and "not installed" in torch.message and "pip install torch" in torch.fix
    assert report.verdict == "FAIL"
    assert family(report).vision.chosen is None
    assert "needs torch" in next(iter(family(report).vision.lost.values()))[0]


def test_torch_import_error():
    err = OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")
    report = report_for(machine({"torch": err}, versions={"torch": "2.11.0+cu130", "transformers": "5.17.0"}))
    torch = check(report, "torch")
    assert torch.status == "fail" and "libcudnn.so.9" in torch.message and "2.11.0+cu130" in torch.message
    assert report.env.torch.installed and report.env.torch.error


def test_no_gpu_reports_why():
    report = report_for(machine(fake_torch(), versions={"transformers": "5.23.0"}))
    gpu = check(report, "gpu")
    assert gpu.status == "info"
    for reason in ("pynvml not installed", "nvidia-smi: not found", "amdsmi", "rocminfo: not found"):
        assert reason in gpu.message


def test_nvml_failing_falls_back_to_nvidia_smi():
    smi = CommandResult(0, "0, Tesla V100-SXM2-16GB, 7.0, 16384, 535.104.05\n")
    header = CommandResult(0, "| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2 |")
    mods = fake_torch("2.13.0+cu126", cuda="12.6", archs=CU126_ARCHS,
                      devices=[("Tesla V100-SXM2-16GB", (7, 0), 16384, None)])
    mods["pynvml"] = fake_nvml([], init_error=RuntimeError("NVML Shared Library Not Found"))
    report = report_for(machine(mods, versions={"transformers": "5.23.0"},
                                commands={"nvidia-smi --query": smi, "nvidia-smi": header}))
    p = report.env.platform
    assert p.source == "nvidia-smi" and p.capability == (7, 0) and p.arch_id == "sm70"
    assert report.env.driver == "535.104.05" and report.env.driver_cuda == "12.2"
    assert any("NVML: init failed" in n for n in p.notes)
    assert check(report, "driver").status == "ok"  # 12.2 driver runs a 12.6 build (minor-version compatibility)


def test_nvml_and_nvidia_smi_missing_fall_back_to_torch():
    mods = fake_torch("2.13.0+cu126", cuda="12.6", archs=CU126_ARCHS,
                      devices=[("Tesla V100-SXM2-32GB", (7, 0), 32768, None)])
    report = report_for(machine(mods, versions={"transformers": "5.23.0"},
                                commands={"nvidia-smi --query": CommandResult(9, "", "NVIDIA-SMI has failed")}))
    p = report.env.platform
    assert p.source == "torch" and p.arch_id == "sm70"
    assert any("nvidia-smi: exit 9" in n for n in p.notes)
    assert "CUDA context" in check(report, "gpu").message


def test_xformers_built_for_another_torch_fails_on_volta_with_the_pip_fix():
    mods, vers, reqs = fake_xformers("0.0.27", torch_pin="2.3.1", built_for="2.3.1+cu118",
                                     load_error=OSError("undefined symbol: _ZN3c104cuda9SetDevice"))
    machine_mods = {**v100("2.7.0+cu118", cuda="11.8", archs=CU118_ARCHS), **mods}
    report = report_for(machine(machine_mods, versions={"transformers": "4.57.6", **vers}, requires=reqs))
    x = check(report, "xformers")
    assert x.status == "fail"
    assert "built for torch 2.3.1" in x.message and "2.7.0+cu118" in x.message
    assert x.fix == "pip install 'xformers==0.0.30' --index-url https://download.pytorch.org/whl/cu118"
    fam = family(report)
    assert "xformers_blockdiag" in fam.vision.lost and "loadable xformers" in fam.vision.lost["xformers_blockdiag"][0]


def test_xformers_built_for_another_torch_is_a_warning_where_portvlm_does_not_use_it():
    mods, vers, reqs = fake_xformers("0.0.30", torch_pin="2.7.0", built_for="2.7.0+cu126",
                                     load_error=OSError("undefined symbol"))
    report = report_for(machine({**h100(), **mods}, versions={"transformers": "5.17.0", **vers}, requires=reqs))
    x = check(report, "xformers")
    assert x.status == "warn" and "xformers==0.0.35" in x.fix and "whl/cu130" in x.fix
    assert report.verdict == "WARN"


def test_unknown_rocm_gfx_warns_and_applies_the_nearest_policy():
    rocminfo = CommandResult(0, "*******\nAgent 2\n*******\n  Name:                    gfx1100\n"
                                "  Marketing Name:          Radeon RX 7900 XTX\n  Device Type:             GPU\n")
    mods = fake_torch("2.13.0+rocm7.2", hip="7.2.26015", archs=ROCM_ARCHS,
                      devices=[("Radeon RX 7900 XTX", None, 24560, "gfx1100")])
    report = report_for(machine(mods, versions={"transformers": "5.23.0"}, commands={"rocminfo": rocminfo}))
    p = report.env.platform
    # issue #13: the device keeps its own name; the matrix does not declare it
    assert p.vendor == "amd" and p.gfx == "gfx1100" and p.arch_id == "gfx1100" and p.source == "rocminfo"
    assert report.arch == "gfx942" and report.arch_match == "nearest"
    assert report.device_arch == "gfx1100" and report.declared is False
    assert check(report, "arch").status == "warn" and "gfx1100 (not in matrix.yaml)" in check(report, "arch").message
    assert "- id: gfx1100" in check(report, "arch").fix and "gfx: gfx1100" in report.add_to_matrix
    assert check(report, "aotriton").status == "warn"
    assert "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1" in check(report, "aotriton").fix
    assert report.verdict == "WARN" and report.evidence == "emulated"


def test_unknown_gfx_missing_from_torch_is_a_kernel_image_failure():
    mods = fake_torch("2.13.0+rocm7.2", hip="7.2.26015", archs=("gfx90a", "gfx942"),
                      devices=[("AMD Instinct MI100", None, 32752, "gfx908")])
    report = report_for(machine(mods, versions={"transformers": "5.23.0"}))
    assert check(report, "kernel_image").status == "fail" and "gfx908" in check(report, "kernel_image").message


def test_transformers_older_than_every_stack_fails_with_a_fix():
    report = report_for(machine(fake_torch(), versions={"transformers": "4.40.2"}))
    tf = check(report, "transformers")
    assert tf.status == "fail" and "older than every stack" in tf.message and "4.50.3" in tf.message
    assert tf.fix.startswith("pip install 'transformers==")
    assert report.verdict == "FAIL"


def test_transformers_newer_than_verified_fails_unless_allowed():
    report = report_for(machine(h100(), versions={"transformers": "5.30.0"}))
    tf = check(report, "transformers")
    assert tf.status == "fail" and "verified" in tf.message
    assert "transformers==5.17.0" in tf.fix and "PORTVLM_ALLOW_UNVERIFIED=1" in tf.fix  # newest tested on sm90
    fam = family(report)
    assert fam.match == "nearest" and fam.stack == "cu130-torch2.11.0-tf5.17.0" and fam.verdict == "FAIL"
    allowed = report_for(machine(h100(), versions={"transformers": "5.30.0"}, env={"PORTVLM_ALLOW_UNVERIFIED": "1"}))
    assert check(allowed, "transformers").status == "warn"
    assert allowed.verdict == "WARN"


def test_nearest_stack_explains_the_difference():
    report = report_for(machine(h100(), versions={"transformers": "5.10.4"}))
    fam = family(report)
    assert fam.match == "nearest" and fam.stack == "cu130-torch2.11.0-tf4.57.6"
    assert any("transformers 5.10.4 vs 4.57.6" in d for d in fam.differences)
    assert fam.verdict == "WARN"


def test_qwen3vl_needs_4_57_1():
    report = report_for(machine(fake_torch(), versions={"transformers": "4.52.4"}))
    fam = family(report, "qwen3vl")
    assert fam.verdict == "FAIL" and fam.expected == "excluded"
    assert fam.fix == "pip install 'transformers>=4.57.1'"
    assert family(report, "qwen2_5vl").verdict == "OK"
    assert main(["--strict", "--model", "qwen2_5vl"], probes=machine(fake_torch(), versions={"transformers": "4.52.4"}),
                stdout=io.StringIO()) == 0


def test_both_vendors_exactly_one_wins():
    mods = {**h100(), "amdsmi": fake_amdsmi([("AMD Instinct MI300X", "gfx942", 196592)])}
    p = detect(machine(mods))
    assert p.vendor == "nvidia" and any("both NVIDIA and AMD" in n for n in p.notes)


# ----------------------------------------------------------------------------------------------------- CLI
def test_json_is_schema_versioned_and_valid():
    jsonschema = pytest.importorskip("jsonschema")
    out = io.StringIO()
    assert main(["--json"], probes=machine(h100(), versions={"transformers": "5.17.0"}), stdout=out) == 0
    data = json.loads(out.getvalue())
    assert data["schema"] == SCHEMA == "portvlm.doctor/1"
    assert data["environment"]["platform"]["capability"] == [9, 0]
    assert data["families"][0]["vision"]["chosen"] == "torch_varlen"
    schema = json.loads((ROOT / "portvlm" / "data" / "doctor.schema.json").read_text())
    jsonschema.validate(data, schema)
    # every documented top-level and environment field is described in docs/doctor.md
    doc = (ROOT / "docs" / "doctor.md").read_text()
    for key in list(data) + list(data["environment"]) + list(data["environment"]["torch"]):
        assert f"`{key}`" in doc, key


def test_strict_exit_codes():
    ok = machine(fake_torch(), versions={"transformers": "5.23.0"})
    broken = machine({}, versions={"transformers": "5.23.0"})
    assert main([], probes=ok, stdout=io.StringIO()) == 0
    assert main(["--strict"], probes=ok, stdout=io.StringIO()) == 0
    assert main([], probes=broken, stdout=io.StringIO()) == 0
    assert main(["--strict"], probes=broken, stdout=io.StringIO()) == 1
    assert main(["--model", "nope"], probes=ok, stdout=io.StringIO()) == 2


def test_a_fail_verdict_says_why_the_exit_code_is_0(capsys):
    broken = machine({}, versions={"transformers": "5.23.0"})
    out = io.StringIO()
    assert main([], probes=broken, stdout=out) == 0 and "verdict FAIL" in out.getvalue()
    assert "--strict exits 1" in capsys.readouterr().err
    assert main(["--strict"], probes=broken, stdout=io.StringIO()) == 1
    assert "--strict exits 1" not in capsys.readouterr().err


def test_text_output_fits_one_screen_and_is_plain_when_not_a_tty(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    out = io.StringIO()
    main([], probes=machine(v100(), versions={"transformers": "5.23.0", "flash-attn": "2.8.3"}), stdout=out)
    text = out.getvalue()
    assert "\x1b[" not in text
    assert len(text.splitlines()) <= 60  # wrapped at 100 columns, never cut
    assert "verdict WARN" in text and "efficient_varlen" in text and "pip uninstall -y flash-attn" in text


def test_plain_text_wraps_long_lines_at_word_boundaries_instead_of_cutting_them(monkeypatch):
    """Every word of every reason is printed whole: no line over the width, no '…' cut (issue #28)."""
    from portvlm.doctor.render import lines

    monkeypatch.setenv("COLUMNS", "72")
    probes = machine(v100(), versions={"transformers": "5.23.0", "flash-attn": "2.8.3"})
    out = io.StringIO()
    main(["--no-color", "--matrix", str(MATRIX.path)], probes=probes, stdout=out)
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 72 or all(
        " " not in line.strip() for line in text.splitlines() if len(line) > 72)  # only one unbreakable word
    report = diagnose(collect(probes), MATRIX)
    words = [w for line in lines(report) for w in "".join(t for t, _ in line).split()]
    assert words == text.split()  # the same words in the same order: wrapped, none cut or lost


# ----------------------------------------------------------------------------------------------------- never raises
class Hostile(Exception):
    pass


def _boom(*args, **kwargs):
    raise Hostile("probe exploded")


class ExplodingEnv(dict):
    def __contains__(self, key):
        raise Hostile("env exploded")


def test_never_raises_when_every_probe_raises():
    probes = Probes(import_module=_boom, run=_boom, env=ExplodingEnv(), version_of=_boom, requires_of=_boom,
                    read_text=_boom, host=_boom)
    info = collect(probes)
    assert info.platform.vendor == "cpu"
    report = diagnose(info, MATRIX)
    assert report.verdict in ("OK", "WARN", "FAIL")
    assert any(c.id == "probes" for c in report.checks) or info.probe_errors == ()
    assert main(["--json"], probes=probes, stdout=io.StringIO()) in (0, 1)
    assert main([], probes=probes, stdout=io.StringIO()) == 0


def test_never_raises_on_hostile_modules():
    class Weird:
        def __getattr__(self, name):
            raise Hostile(name)

    mods = {"torch": Weird(), "pynvml": Weird(), "amdsmi": Weird(), "xformers": SystemExit(3),
            "flash_attn": KeyError("x")}
    info = collect(machine(mods, versions={"xformers": "0.0.30", "flash-attn": "2.8.3", "transformers": "5.23.0"}))
    report = diagnose(info, MATRIX)
    assert report.verdict in ("OK", "WARN", "FAIL")
    assert diagnose(info, None, matrix_error="no matrix").families == ()


# ----------------------------------------------------------------------------------------------------- platform
def test_kernel_image_rules():
    assert kernel_image_reasons(CU130_ARCHS, (7, 0))  # sm_75 does not run on sm_70; PTX 12.0 neither
    assert not kernel_image_reasons(CU126_ARCHS, (7, 0))
    assert not kernel_image_reasons(("sm_80",), (8, 6))  # same major, lower minor
    assert kernel_image_reasons(("sm_90a",), (10, 0))  # arch-specific cubins run nowhere else
    assert not kernel_image_reasons(("sm_80", "compute_90"), (12, 0))  # PTX JIT
    assert not kernel_image_reasons((), (7, 0))  # unknown list: not judged
    assert kernel_image_reasons(("gfx90a", "gfx942"), gfx="gfx1100")


def test_emulated_keeps_host_kernels_and_takes_the_arch_policy():
    sm70 = MATRIX.arch("sm70")
    p = emulated(sm70, CPU)
    assert p.emulating == "sm70" and p.arch_id == "sm70" and p.capability == (7, 0) and p.device == "cpu"
    assert p.vendor == "nvidia" and any("kernels are the host's" in n for n in p.notes)


def test_detect_without_anything_is_cpu():
    p = detect(machine({}))
    assert p.vendor == "cpu" and p.arch_id == "cpu" and p.torch_archs == ()


def test_doctor_answers_every_backend_probe_from_the_one_declaration():
    """Every feature probe portvlm.backends declares is judged by the doctor, in the live probe's own words."""
    from portvlm import backends
    from portvlm.doctor.diagnose import feature_probe

    info = report_for(machine(h100(), versions={"transformers": "5.17.0"})).env
    probe = feature_probe(info)
    for need in backends.PROBES:
        why = probe(need, info.platform, "float16", 64)
        assert why is None or "has no probe" not in why, (need, why)
    missing = dataclasses.replace(info.torch, features={})
    info = dataclasses.replace(info, torch=missing)
    for name in backends.TORCH_FEATURES:
        assert feature_probe(info)(name, info.platform, "float16", 64) == \
            backends.torch_feature_reason(name, False, info.torch.version)
