"""NVIDIA detection: NVML first (no CUDA context), then ``nvidia-smi``, then torch (creates a context).

pynvml is imported here only, lazily. Each probe returns a :class:`~portvlm.platform.Detection` with GPUs, or
one with none and the reasons why; nothing raises.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from portvlm.platform.probes import Probes, describe_error, try_import

VENDOR = "nvidia"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _cuda_version_from_int(value: int) -> str | None:
    """NVML's driver CUDA version (12040) → "12.4"."""
    if not isinstance(value, int) or value <= 0:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


def probe_nvml(probes: Probes):
    """GPUs through NVML (``pynvml`` from nvidia-ml-py): names, capabilities, memory, driver — no CUDA context."""
    from portvlm.platform import Detection, Gpu

    nvml, reason = try_import(probes, "pynvml")
    if nvml is None:
        return Detection(reasons=(f"NVML: {reason} (pip install nvidia-ml-py)",))
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on a machine without the driver
        return Detection(reasons=(f"NVML: init failed: {describe_error(exc)}",))
    try:
        gpus = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                Gpu(
                    index=i,
                    vendor=VENDOR,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    capability=(int(major), int(minor)),
                    memory_mib=int(memory.total) // (1 << 20),
                    source="nvml",
                )
            )
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        driver_cuda = None
        getter = getattr(nvml, "nvmlSystemGetCudaDriverVersion_v2", None) or getattr(
            nvml, "nvmlSystemGetCudaDriverVersion", None
        )
        if getter is not None:
            try:
                driver_cuda = _cuda_version_from_int(int(getter()))
            except Exception:
                driver_cuda = None
        if not gpus:
            return Detection(driver=driver, driver_cuda=driver_cuda, reasons=("NVML: driver loaded, 0 devices",))
        return Detection(vendor=VENDOR, gpus=tuple(gpus), driver=driver, driver_cuda=driver_cuda, source="nvml")
    except Exception as exc:
        return Detection(reasons=(f"NVML: query failed: {describe_error(exc)}",))
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


_SMI_QUERY = ["nvidia-smi", "--query-gpu=index,name,compute_cap,memory.total,driver_version",
              "--format=csv,noheader,nounits"]


def probe_smi(probes: Probes):
    """GPUs through ``nvidia-smi`` (``compute_cap`` needs driver ≥ 510); the header gives the driver's CUDA."""
    from portvlm.platform import Detection, Gpu

    result = probes.run(_SMI_QUERY)
    if result is None:
        return Detection(reasons=("nvidia-smi: not found",))
    if result.rc != 0:
        first = (result.stderr or result.stdout).strip().splitlines()[:1]
        return Detection(reasons=(f"nvidia-smi: exit {result.rc}" + (f": {first[0][:160]}" if first else ""),))
    gpus, driver = [], None
    for line in result.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            continue
        index, name, cap, mem, driver = parts[:5]
        capability = None
        m = re.fullmatch(r"(\d+)\.(\d+)", cap)
        if m:
            capability = (int(m.group(1)), int(m.group(2)))
        gpus.append(
            Gpu(
                index=int(index) if index.isdigit() else len(gpus),
                vendor=VENDOR,
                name=name,
                capability=capability,
                memory_mib=int(float(mem)) if re.fullmatch(r"[\d.]+", mem) else None,
                source="nvidia-smi",
            )
        )
    if not gpus:
        return Detection(reasons=("nvidia-smi: no GPUs listed",))
    driver_cuda = None
    header = probes.run(["nvidia-smi"])
    if header is not None and header.rc == 0:
        m = re.search(r"CUDA Version:\s*([\d.]+)", header.stdout)
        driver_cuda = m.group(1) if m else None
    return Detection(vendor=VENDOR, gpus=tuple(gpus), driver=driver, driver_cuda=driver_cuda, source="nvidia-smi")


def probe_torch(torch: Any):
    """GPUs through a CUDA torch build (last resort: ``get_device_properties`` creates a CUDA context)."""
    from portvlm.platform import Detection, torch_detection

    if torch is None:
        return Detection(reasons=("torch: not importable",))
    version = getattr(torch, "version", None)
    if getattr(version, "hip", None) or not getattr(version, "cuda", None):
        return Detection(reasons=("torch: not a CUDA build",))
    return torch_detection(
        torch, VENDOR, "CUDA", lambda props: {"capability": (int(props.major), int(props.minor))},
        unavailable="torch: torch.cuda.is_available() is False",
        note="read through torch: NVML and nvidia-smi unavailable (a CUDA context was created)",
    )


def probe(probes: Probes, torch: Any = None):
    """The first of NVML, nvidia-smi, torch that finds NVIDIA GPUs; else no GPUs and every reason."""
    from portvlm.platform import Detection

    reasons: list[str] = []
    driver = driver_cuda = None
    for step in (lambda: probe_nvml(probes), lambda: probe_smi(probes), lambda: probe_torch(torch)):
        found = step()
        driver = driver or found.driver
        driver_cuda = driver_cuda or found.driver_cuda
        if found.gpus:
            return Detection(
                vendor=found.vendor, gpus=found.gpus, driver=driver, driver_cuda=driver_cuda, source=found.source,
                reasons=tuple(reasons) + found.reasons,
            )
        reasons.extend(found.reasons)
    return Detection(driver=driver, driver_cuda=driver_cuda, reasons=tuple(reasons))
