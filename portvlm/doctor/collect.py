"""``collect(probes) -> EnvInfo``: one typed record of this machine, filled by small probes that never raise.

Every probe returns a value or a reason (``error`` fields, ``reasons`` tuples). A probe that raises anyway is
caught by :func:`_safe`, recorded in ``EnvInfo.probe_errors`` and replaced by its empty value, so ``collect``
itself never raises. Nothing is judged here: ``diagnose`` turns the record into verdicts.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from portvlm.platform import CPU, Detection, Gpu, Platform, detect_all, torch_arch_list
from portvlm.platform.probes import Probes, describe_error, try_import

SCHEMA = "portvlm.doctor/1"

# Environment variables that change what runs (shown and recorded; nothing else from the environment is read).
ENV_VARS = (
    "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "PYTORCH_NVML_BASED_CUDA_CHECK",
    "TORCH_CUDA_ARCH_LIST", "PYTORCH_ROCM_ARCH", "HSA_OVERRIDE_GFX_VERSION", "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL",
    "FLASH_ATTENTION_TRITON_AMD_ENABLE", "NVIDIA_TF32_OVERRIDE", "PORTVLM_MATRIX", "PORTVLM_ALLOW_UNVERIFIED",
    "USE_HUB_KERNELS", "HF_HUB_OFFLINE",
)


@dataclass(frozen=True)
class SystemInfo:
    os: str | None = None
    machine: str | None = None
    python: str | None = None
    executable: str | None = None
    cpu: str | None = None
    cpu_count: int | None = None


@dataclass(frozen=True)
class TorchInfo:
    installed: bool = False
    version: str | None = None
    cuda: str | None = None  # torch.version.cuda: the CUDA runtime the wheel was built with
    hip: str | None = None  # torch.version.hip
    arch_list: tuple[str, ...] = ()  # torch.cuda.get_arch_list() (or the compiled-in flags)
    cuda_available: bool | None = None
    device_count: int | None = None
    cudnn: int | None = None
    tf32_matmul: bool | None = None  # matmul TF32 allowed (torch default: False)
    tf32_cudnn: bool | None = None  # cuDNN conv TF32 allowed (torch default: True)
    features: dict[str, bool] = field(default_factory=dict)  # sdpa, efficient_attention_op, varlen_attn, flex_attention
    triton: str | None = None  # triton version if importable
    path: str | None = None
    error: str | None = None  # why torch could not be used: not installed / import failed


@dataclass(frozen=True)
class XformersOp:
    name: str  # xformers' NAME: "cutlassF-pt", "fa2F@2.5.7", "ckF"
    built: bool  # OPERATOR is not None
    devices: tuple[str, ...] = ()
    min_capability: tuple[int, int] | None = None
    dtypes: tuple[str, ...] = ()


@dataclass(frozen=True)
class XformersInfo:
    version: str | None = None  # installed distribution version; None = not installed
    requires_torch: str | None = None  # the wheel's Requires-Dist pin: "==2.7.0", ">=2.10"
    built_for_torch: str | None = None  # build metadata (cpp_lib.json): the torch the extension was compiled against
    built_cuda: str | None = None
    built_hip: str | None = None
    extension_loaded: bool | None = None  # xformers._cpp_lib._cpp_library_load_exception is None
    extension_error: str | None = None
    ops: tuple[XformersOp, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class FlashAttnInfo:
    version: str | None = None
    importable: bool | None = None
    error: str | None = None


@dataclass(frozen=True)
class PackageInfo:
    name: str
    version: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class HubKernelsInfo:
    """What decides whether ``from_pretrained`` kernelizes (transformers 5.25+): the pin and the installed kernels."""

    required: str | None = None  # transformers' unconditional Requires-Dist on kernels ("kernels>=0.19.1,<0.20")
    kernels: str | None = None  # the installed kernels version; None: not installed


@dataclass(frozen=True)
class EnvInfo:
    """Everything ``portvlm doctor`` knows about this machine (JSON: ``to_json()``, schema ``portvlm.doctor/1``)."""

    system: SystemInfo = field(default_factory=SystemInfo)
    platform: Platform = CPU
    gpus: tuple[Gpu, ...] = ()
    gpu_reasons: tuple[str, ...] = ()  # how the GPUs were found, or why none were
    driver: str | None = None
    driver_cuda: str | None = None
    rocm: str | None = None
    torch: TorchInfo = field(default_factory=TorchInfo)
    transformers: PackageInfo = field(default_factory=lambda: PackageInfo("transformers"))
    xformers: XformersInfo = field(default_factory=XformersInfo)
    flash_attn: FlashAttnInfo = field(default_factory=FlashAttnInfo)
    hub_kernels: HubKernelsInfo = field(default_factory=HubKernelsInfo)
    env: dict[str, str] = field(default_factory=dict)
    portvlm: str = ""
    probe_errors: tuple[str, ...] = ()  # probes that raised (a bug in a probe, or a hostile module): name: error

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# probes
# --------------------------------------------------------------------------------------------------------------
def probe_system(probes: Probes, platform: Platform) -> SystemInfo:
    facts = probes.host() or {}
    return SystemInfo(
        os=facts.get("os"),
        machine=facts.get("machine"),
        python=facts.get("python"),
        executable=facts.get("executable"),
        cpu=_cpu_name(probes),
        cpu_count=facts.get("cpu_count"),
    )


def _cpu_name(probes: Probes) -> str | None:
    from portvlm.platform.cpu import cpu_name

    return cpu_name(probes)


def _flag(getter) -> bool | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = getter()
    except Exception:
        return None
    return value if isinstance(value, bool) else None


def _tf32_matmul(torch: Any) -> bool | None:
    def new_api():  # torch 2.9+: fp32_precision "tf32" / "ieee"
        return torch.backends.cuda.matmul.fp32_precision == "tf32"

    value = _flag(lambda: torch.backends.cuda.matmul.allow_tf32)
    return value if value is not None else _flag(new_api)


def probe_torch(probes: Probes) -> tuple[TorchInfo, Any]:
    """torch's version, build, compiled archs and attention features (no CUDA context is created here)."""
    torch, reason = try_import(probes, "torch")
    if torch is None:
        return TorchInfo(installed=probes.version_of("torch") is not None, version=probes.version_of("torch"),
                         error=reason), None
    version = getattr(torch, "version", None)
    from portvlm.backends import TORCH_FEATURES, torch_feature_present

    features = {f.record: torch_feature_present(name, torch, probes.import_module) for name, f in TORCH_FEATURES.items()}
    triton = probes.version_of("triton") or probes.version_of("pytorch-triton-rocm")
    cuda_available = device_count = None
    try:
        cuda_available = bool(torch.cuda.is_available())  # cudaGetDeviceCount / NVML: no context
        device_count = int(torch.cuda.device_count()) if cuda_available else 0
    except Exception:
        pass
    cudnn = None
    try:
        cudnn = int(torch.backends.cudnn.version()) if getattr(version, "cuda", None) else None
    except Exception:
        cudnn = None
    return TorchInfo(
        installed=True,
        version=str(getattr(torch, "__version__", "") or "") or None,
        cuda=_str(getattr(version, "cuda", None)),
        hip=_str(getattr(version, "hip", None)),
        arch_list=torch_arch_list(torch),
        cuda_available=cuda_available,
        device_count=device_count,
        cudnn=cudnn,
        tf32_matmul=_tf32_matmul(torch),
        tf32_cudnn=_flag(lambda: torch.backends.cudnn.allow_tf32),
        features=features,
        triton=triton,
        path=_str(getattr(torch, "__file__", None)),
    ), torch


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def probe_transformers(probes: Probes) -> PackageInfo:
    """transformers' version from its metadata (importing it takes seconds and proves nothing more here)."""
    version = probes.version_of("transformers")
    return PackageInfo("transformers", version, None if version else "transformers not installed")


def probe_hub_kernels(probes: Probes) -> HubKernelsInfo:
    """transformers' own requirement on ``kernels`` (its metadata, no import) and the installed kernels version."""
    from portvlm.shims.hub_kernels import pin_of

    return HubKernelsInfo(required=pin_of(probes.requires_of("transformers")), kernels=probes.version_of("kernels"))


_PIN = re.compile(r"^torch\s*(\(?\s*[=<>!~].*?)\)?\s*(;.*)?$", re.I)


def probe_xformers(probes: Probes, torch_ok: bool) -> XformersInfo:
    """xformers: installed version, the torch its wheel pins, whether its C++ extension loaded, its fmha ops."""
    version = probes.version_of("xformers")
    if version is None:
        return XformersInfo(error="xformers not installed")
    requires_torch = None
    for line in probes.requires_of("xformers") or ():
        m = _PIN.match(line.strip())
        if m and "extra" not in (m.group(2) or ""):
            requires_torch = m.group(1).replace(" ", "").strip("()")
            break
    if not torch_ok:
        return XformersInfo(version=version, requires_torch=requires_torch, error="not imported: torch unusable")
    module, reason = try_import(probes, "xformers")
    if module is None:
        return XformersInfo(version=version, requires_torch=requires_torch, error=reason)
    built_for = built_cuda = built_hip = None
    loaded, load_error = None, None
    cpp, reason = try_import(probes, "xformers._cpp_lib")
    if cpp is not None:
        exc = getattr(cpp, "_cpp_library_load_exception", None)
        loaded = exc is None
        load_error = None if exc is None else describe_error(exc) if isinstance(exc, BaseException) else str(exc)
        meta = getattr(cpp, "_build_metadata", None)
        if meta is not None:
            built_for = _str(getattr(meta, "torch_version", None))
            built_cuda = _str(getattr(meta, "cuda_version", None))
            built_hip = _str(getattr(meta, "hip_version", None))
        if exc is not None and built_for is None:
            # xFormersInvalidLibException carries the build info of the wheel it refused to load.
            info = getattr(exc, "build_info", None)
            built_for = _str(getattr(info, "torch_version", None)) if info is not None else None
    else:
        load_error = reason
    ops: list[XformersOp] = []
    fmha, _ = try_import(probes, "xformers.ops.fmha")
    for op in tuple(getattr(fmha, "ALL_FW_OPS", ()) or ()) if fmha is not None else ():
        try:
            devices = tuple(sorted(str(d) for d in getattr(op, "SUPPORTED_DEVICES", ()) or ()))
            cap = getattr(op, "CUDA_MINIMUM_COMPUTE_CAPABILITY", None)
            dtypes = tuple(sorted(str(d).removeprefix("torch.") for d in getattr(op, "SUPPORTED_DTYPES", ()) or ()))
            ops.append(XformersOp(
                name=str(getattr(op, "NAME", getattr(op, "__name__", "?"))),
                built=getattr(op, "OPERATOR", None) is not None,
                devices=devices,
                min_capability=tuple(int(x) for x in cap) if cap else None,
                dtypes=dtypes,
            ))
        except Exception:
            continue
    return XformersInfo(version=version, requires_torch=requires_torch, built_for_torch=built_for,
                        built_cuda=built_cuda, built_hip=built_hip, extension_loaded=loaded,
                        extension_error=load_error, ops=tuple(ops))


def probe_flash_attn(probes: Probes, torch_ok: bool) -> FlashAttnInfo:
    """flash-attn: installed version, and whether it imports (its CUDA extension loads) on this machine."""
    version = probes.version_of("flash-attn") or probes.version_of("flash_attn")
    if version is None:
        return FlashAttnInfo(error="flash-attn not installed")
    if not torch_ok:
        return FlashAttnInfo(version=version, error="not imported: torch unusable")
    module, reason = try_import(probes, "flash_attn")
    return FlashAttnInfo(version=version, importable=module is not None, error=reason)


# --------------------------------------------------------------------------------------------------------------
# collect
# --------------------------------------------------------------------------------------------------------------
class _Errors:
    def __init__(self):
        self.items: list[str] = []

    def safe(self, name: str, fn, default):
        """Run one probe; a probe that raises becomes ``default`` plus a recorded error (never an exception)."""
        try:
            return fn()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - the doctor must survive anything a probe can throw
            self.items.append(f"{name}: {describe_error(exc)}")
            return default


def collect(probes: Probes | None = None) -> EnvInfo:
    """Fill an :class:`EnvInfo` through ``probes`` (default: the real machine); never raises."""
    probes = probes or Probes()
    errors = _Errors()
    from portvlm import __version__

    torch_info, torch = errors.safe("torch", lambda: probe_torch(probes), (TorchInfo(error="torch probe failed"), None))
    torch_ok = torch is not None
    # torch=False: the torch probe already failed; detection must not import it a second time.
    platform, detection = errors.safe("gpu", lambda: detect_all(probes, torch=torch if torch_ok else False),
                                      (CPU, Detection()))
    system = errors.safe("system", lambda: probe_system(probes, platform), SystemInfo())
    rocm = None
    if platform.vendor == "amd":
        from portvlm.platform.rocm import rocm_version

        rocm = errors.safe("rocm", lambda: detection.runtime or rocm_version(probes), None)
    env = errors.safe("env", lambda: {k: str(probes.env[k]) for k in ENV_VARS if k in probes.env}, {})
    return EnvInfo(
        system=system,
        platform=platform,
        gpus=detection.gpus,
        gpu_reasons=detection.reasons,
        driver=detection.driver,
        driver_cuda=detection.driver_cuda,
        rocm=rocm,
        torch=torch_info,
        transformers=errors.safe("transformers", lambda: probe_transformers(probes),
                                 PackageInfo("transformers", error="probe failed")),
        xformers=errors.safe("xformers", lambda: probe_xformers(probes, torch_ok), XformersInfo(error="probe failed")),
        flash_attn=errors.safe("flash_attn", lambda: probe_flash_attn(probes, torch_ok),
                               FlashAttnInfo(error="probe failed")),
        hub_kernels=errors.safe("hub_kernels", lambda: probe_hub_kernels(probes), HubKernelsInfo()),
        env=env,
        portvlm=__version__,
        probe_errors=tuple(errors.items),
    )
