"""What hardware a run is on, as a comparable record. Detection lives in the vendor modules.

``detect()`` asks each vendor module (``cuda.py``: NVML → nvidia-smi → torch; ``rocm.py``: amdsmi → rocminfo →
torch) for GPUs; exactly one vendor may win, the CPU is the fallback. Vendor libraries (pynvml, amdsmi) are
imported only there, lazily. Probes return a value or a reason; nothing here raises on a machine without a GPU,
and nothing runs at import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from portvlm.matrix.schema import Arch
    from portvlm.platform.probes import Probes



# bf16 truth, in one place (doctor, backend selection and the patch policy all ask here). Volta/Turing have no bf16
# units; torch.cuda.is_bf16_supported() counts emulation (True on sm70/sm75), so it cannot be the judge.
BF16_MIN_CAPABILITY = (8, 0)


def bf16_reasons(vendor: str | None, capability: tuple[int, int] | None) -> list[str]:
    """Why bfloat16 cannot be the compute dtype on this GPU (empty: it can, or nothing is known against it)."""
    if vendor != "nvidia" or capability is None or tuple(capability) >= BF16_MIN_CAPABILITY:
        return []
    need = f"{BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]}"
    return [f"bfloat16 needs compute capability >= {need}, found {capability[0]}.{capability[1]} (no bf16 units below "
            "sm80; torch.cuda.is_bf16_supported() counts emulation)"]


@dataclass(frozen=True)
class Platform:
    vendor: str  # "cpu" | "nvidia" | "amd"
    device: str  # torch device type: "cpu" | "cuda" (ROCm is "cuda" in torch too)
    name: str  # "Tesla V100-SXM2-32GB", "AMD Instinct MI300X", "x86_64 CPU"
    capability: tuple[int, int] | None = None  # CUDA compute capability
    gfx: str | None = None  # ROCm gfx arch, e.g. "gfx942"
    arch_id: str | None = None  # the device's own arch id ("sm90", "sm100", "gfx1100", "cpu"; declared or not), None if unread
    torch_archs: tuple[str, ...] = ()  # torch.cuda.get_arch_list() of the installed build
    emulating: str | None = None  # set when an arch's policy runs on other hardware: the emulated arch id
    memory_mib: int | None = None  # device 0's memory
    count: int = 0  # GPUs of this vendor seen
    source: str | None = None  # which probe found it: "nvml" | "nvidia-smi" | "amdsmi" | "rocminfo" | "torch" | "cpu"
    notes: tuple[str, ...] = ()  # how it was found, what was skipped and why

    @property
    def is_gpu(self) -> bool:
        return self.device == "cuda"


CPU = Platform(vendor="cpu", device="cpu", name="CPU", arch_id="cpu", source="cpu")


@dataclass(frozen=True)
class Gpu:
    """One GPU as a vendor probe saw it."""

    index: int
    vendor: str
    name: str
    capability: tuple[int, int] | None = None
    gfx: str | None = None
    memory_mib: int | None = None
    source: str = ""


@dataclass(frozen=True)
class Detection:
    """A vendor probe's answer: GPUs found (maybe none) and the reasons for every step that found nothing."""

    vendor: str | None = None
    gpus: tuple[Gpu, ...] = ()
    driver: str | None = None  # kernel driver version ("535.104.05", amdgpu "6.8.5")
    driver_cuda: str | None = None  # highest CUDA the NVIDIA driver supports ("12.4")
    runtime: str | None = None  # system ROCm release ("6.4.1")
    source: str | None = None
    reasons: tuple[str, ...] = ()


def sm_name(capability: tuple[int, int] | None) -> str | None:
    """``(7, 0)`` → ``"sm70"`` (the one spelling of a CUDA capability as an arch id); ``None`` → ``None``."""
    return None if capability is None else f"sm{capability[0]}{capability[1]}"


def arch_id_for(capability: tuple[int, int] | None = None, gfx: str | None = None) -> str | None:
    """The device's own arch id: ``(10, 0)`` → ``"sm100"``, ``"gfx942:sramecc+"`` → ``"gfx942"``, neither → ``"cpu"``.

    Named whether or not matrix.yaml declares it: which declared arch's policy applies, and as what evidence, is
    :func:`portvlm.policy.match_arch`'s answer.
    """
    if gfx:
        return gfx.split(":")[0].lower()
    if capability is None:
        return "cpu"
    return sm_name(capability)


_ARCH_ID = re.compile(r"^(?:sm(\d+)(\d)|(gfx[0-9a-f]{3,4})|(cpu))$")


def parse_arch_id(arch_id: str | None) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """``"sm120"`` → ``("nvidia", (12, 0), None)``; ``"gfx942"`` → ``("amd", None, "gfx942")``; else ``(None, …)``.

    The inverse of :func:`arch_id_for` (the minor is always one digit).
    """
    m = _ARCH_ID.match((arch_id or "").strip().lower())
    if not m:
        return None, None, None
    if m.group(1):
        return "nvidia", (int(m.group(1)), int(m.group(2))), None
    if m.group(3):
        return "amd", None, m.group(3)
    return "cpu", None, None


# --------------------------------------------------------------------------------------------------------------
# Kernel images: does the installed torch carry code this GPU can run? ("no kernel image is available")
# --------------------------------------------------------------------------------------------------------------
_SM = re.compile(r"^(sm|compute)_(\d+)([a-z]?)$")


def parse_cuda_arch(entry: str) -> tuple[str, int, int, str] | None:
    """``"sm_86"`` → ``("sm", 8, 6, "")``; ``"compute_120"`` → ``("compute", 12, 0, "")``; ``"sm_90a"`` → suffix "a"."""
    m = _SM.match(entry.strip().lower())
    if not m:
        return None
    digits = m.group(2)
    return m.group(1), int(digits[:-1] or 0), int(digits[-1]), m.group(3)


def kernel_image_reasons(torch_archs: tuple[str, ...], capability: tuple[int, int] | None = None,
                         gfx: str | None = None) -> list[str]:
    """Why the installed torch has no kernels for this GPU; empty = it has some.

    CUDA: a cubin runs on the same major with an equal or higher minor (sm_80 runs on sm_86, sm_75 does NOT run
    on sm_70); arch-specific cubins (``sm_90a``) run only on exactly that arch; PTX (``compute_XY``) is JIT-compiled
    for any device ≥ XY. torch's own import-time check only compares majors, so it stays silent for a V100 under a
    build whose only sm_7x cubin is sm_75 — the run then fails with "no kernel image is available".
    ROCm: the gfx target must be in the list (code objects are not portable across gfx targets).
    """
    if not torch_archs:
        return []  # unknown: nothing to judge (CPU build, or the list could not be read)
    if gfx:
        listed = {a.split(":")[0].lower() for a in torch_archs}
        if gfx.lower() in listed:
            return []
        return [f"torch was built for {' '.join(sorted(listed))}; no code objects for {gfx}"]
    if capability is None:
        return []
    major, minor = capability
    for entry in torch_archs:
        parsed = parse_cuda_arch(entry)
        if parsed is None:
            continue
        kind, a_major, a_minor, suffix = parsed
        if kind == "sm" and suffix and (a_major, a_minor) == (major, minor):
            return []
        if kind == "sm" and not suffix and a_major == major and a_minor <= minor:
            return []
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return []
    return [f"torch was built for {' '.join(torch_archs)}; none runs on sm_{major}{minor}"]


# --------------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------------
def torch_arch_list(torch: Any) -> tuple[str, ...]:
    """``torch.cuda.get_arch_list()`` (no CUDA context); the compiled-in flags when torch sees no device."""
    if torch is None:
        return ()
    try:
        archs = tuple(torch.cuda.get_arch_list() or ())
    except Exception:
        archs = ()
    if archs:
        return archs
    version = getattr(torch, "version", None)
    if getattr(version, "cuda", None) or getattr(version, "hip", None):
        try:  # get_arch_list() returns [] when is_available() is False; the flags are still compiled in
            flags = torch._C._cuda_getArchFlags()
            return tuple(str(flags).split()) if flags else ()
        except Exception:
            return ()
    return ()


def torch_detection(torch: Any, vendor: str, label: str, gpu_fields, *, unavailable: str, note: str) -> Detection:
    """GPUs through torch's device properties (the last-resort probe of every vendor: it creates a device context).

    The vendor files say what differs: the build check before this, ``label`` ("CUDA" / "ROCm") in the reasons, and
    ``gpu_fields(props) -> dict`` (compute capability or gfx target).
    """
    from portvlm.platform.probes import describe_error

    try:
        if not torch.cuda.is_available():
            return Detection(reasons=(unavailable,))
        gpus = []
        for i in range(int(torch.cuda.device_count())):
            props = torch.cuda.get_device_properties(i)
            gpus.append(Gpu(index=i, vendor=vendor, name=str(props.name), memory_mib=int(props.total_memory) // (1 << 20),
                            source="torch", **gpu_fields(props)))
    except Exception as exc:
        return Detection(reasons=(f"torch: {label} query failed: {describe_error(exc)}",))
    if not gpus:
        return Detection(reasons=(f"torch: 0 {label} devices",))
    return Detection(vendor=vendor, gpus=tuple(gpus), source="torch", reasons=(note,))


def _torch(probes: Probes) -> Any:
    from portvlm.platform.probes import try_import

    module, _ = try_import(probes, "torch")
    return module


def detect_all(probes: Probes | None = None, torch: Any = None) -> tuple[Platform, Detection]:
    """The platform portvlm would run on, and the winning vendor probe's full answer (all GPUs, driver).

    ``torch``: an already imported module, ``None`` to import it through ``probes``, ``False`` for "unusable".
    """
    from portvlm.platform import cpu, cuda, rocm
    from portvlm.platform.probes import Probes as _Probes

    probes = probes or _Probes()
    if torch is None:
        torch = _torch(probes)
    elif torch is False:  # the caller already knows torch is unusable
        torch = None
    nvidia = _guard(lambda: cuda.probe(probes, torch), "nvidia")
    amd = _guard(lambda: rocm.probe(probes, torch), "amd")
    winners = [d for d in (nvidia, amd) if d.gpus]
    notes: list[str] = []
    if len(winners) > 1:
        # Exactly one vendor may win: the one the installed torch was built for (a ROCm build drives AMD GPUs).
        hip = getattr(getattr(torch, "version", None), "hip", None)
        chosen = amd if hip else nvidia
        notes.append(f"both NVIDIA and AMD GPUs found; using {chosen.vendor} (the installed torch's build)")
        winners = [chosen]
    archs = torch_arch_list(torch)
    if not winners:
        reasons = tuple(dict.fromkeys(nvidia.reasons + amd.reasons))  # both vendors probe torch: say it once
        name = _guard_value(lambda: cpu.cpu_name(probes), "CPU")
        return replace(CPU, name=name, torch_archs=archs, notes=tuple(notes) + reasons), Detection(
            driver=nvidia.driver or amd.driver, driver_cuda=nvidia.driver_cuda, reasons=reasons)
    found = winners[0]
    gpu = found.gpus[0]
    platform = Platform(
        vendor=found.vendor or gpu.vendor,
        device="cuda",
        name=gpu.name,
        capability=gpu.capability,
        gfx=gpu.gfx,
        arch_id=arch_id_for(gpu.capability, gpu.gfx) if (gpu.capability or gpu.gfx) else None,
        torch_archs=archs,
        memory_mib=gpu.memory_mib,
        count=len(found.gpus),
        source=found.source,
        notes=tuple(notes) + found.reasons,
    )
    return platform, found


def detect(probes: Probes | None = None) -> Platform:
    """The platform portvlm would run on (GPU 0 of the one winning vendor, else the CPU); never raises."""
    try:
        return detect_all(probes)[0]
    except Exception as exc:  # a probe bug must not take the caller down
        return replace(CPU, notes=(f"detection failed: {type(exc).__name__}: {exc}",))


def emulated(arch: Arch, host: Platform) -> Platform:
    """The platform ``arch``'s *policy* sees when run on ``host``.

    Capability / gfx / arch id come from ``arch`` (so dtype rules and backend priorities are the arch's: an sm70
    run on a CPU host gets fp16 and no bf16), while the device, name and torch kernels stay the host's: kernel
    availability is always judged on the real host device, never on the emulated arch.
    """
    return replace(
        host,
        vendor=arch.vendor,
        capability=arch.capability,
        gfx=arch.gfx,
        arch_id=arch.id,
        emulating=arch.id,
        notes=host.notes + (f"policy of {arch.id} emulated on {host.name} ({host.device}); kernels are the host's",),
    )


def _guard(fn, vendor: str) -> Detection:
    try:
        return fn()
    except Exception as exc:
        return Detection(reasons=(f"{vendor} probe failed: {type(exc).__name__}: {exc}",))


def _guard_value(fn, default):
    try:
        return fn()
    except Exception:
        return default
