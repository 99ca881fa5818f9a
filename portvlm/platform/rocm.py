"""AMD detection: amdsmi first (no HIP context), then ``rocminfo``, then a ROCm torch build.

amdsmi is imported here only, lazily. gfx targets are reported without feature suffixes
(``gfx90a:sramecc+:xnack-`` → ``gfx90a``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from portvlm.platform.probes import Probes, describe_error, try_import

VENDOR = "amd"


def normalize_gfx(value: Any) -> str | None:
    """``"gfx942:sramecc+:xnack-"`` → ``"gfx942"``; ``None`` for anything that is not a gfx target."""
    if value is None:
        return None
    text = (value.decode(errors="replace") if isinstance(value, bytes) else str(value)).strip().lower()
    text = text.split(":")[0]
    if re.fullmatch(r"[0-9a-f]{3,4}", text):
        text = "gfx" + text
    return text if re.fullmatch(r"gfx[0-9a-f]{3,4}", text) else None


def probe_amdsmi(probes: Probes):
    """GPUs through amdsmi: market name, gfx target, VRAM, driver."""
    from portvlm.platform import Detection, Gpu

    smi, reason = try_import(probes, "amdsmi")
    if smi is None:
        return Detection(reasons=(f"amdsmi: {reason}",))
    try:
        smi.amdsmi_init()
    except Exception as exc:
        return Detection(reasons=(f"amdsmi: init failed: {describe_error(exc)}",))
    try:
        gpus, driver = [], None
        for i, handle in enumerate(smi.amdsmi_get_processor_handles()):
            asic = smi.amdsmi_get_gpu_asic_info(handle) or {}
            memory_mib = None
            try:
                memory_mib = int((smi.amdsmi_get_gpu_vram_info(handle) or {}).get("vram_size"))
            except Exception:
                memory_mib = None
            with contextlib.suppress(Exception):
                driver = driver or (smi.amdsmi_get_gpu_driver_info(handle) or {}).get("driver_version")
            gpus.append(
                Gpu(
                    index=i,
                    vendor=VENDOR,
                    name=str(asic.get("market_name") or "AMD GPU"),
                    gfx=normalize_gfx(asic.get("target_graphics_version")),
                    memory_mib=memory_mib,
                    source="amdsmi",
                )
            )
        if not gpus:
            return Detection(driver=driver, reasons=("amdsmi: 0 devices",))
        return Detection(vendor=VENDOR, gpus=tuple(gpus), driver=driver, source="amdsmi")
    except Exception as exc:
        return Detection(reasons=(f"amdsmi: query failed: {describe_error(exc)}",))
    finally:
        with contextlib.suppress(Exception):
            smi.amdsmi_shut_down()


def probe_rocminfo(probes: Probes):
    """GPU agents from ``rocminfo`` (its ``Name: gfx…`` and ``Marketing Name:`` lines)."""
    from portvlm.platform import Detection, Gpu

    result = probes.run(["rocminfo"])
    if result is None:
        return Detection(reasons=("rocminfo: not found",))
    if result.rc != 0:
        return Detection(reasons=(f"rocminfo: exit {result.rc}",))
    gpus = []
    for agent in re.split(r"\n\*{5,}\s*\n", result.stdout):
        if not re.search(r"Device Type:\s*GPU", agent):
            continue
        gfx = None
        for m in re.finditer(r"^\s*Name:\s*(\S+)", agent, re.M):
            gfx = gfx or normalize_gfx(m.group(1))
        market = re.search(r"Marketing Name:\s*(.+)", agent)
        gpus.append(Gpu(index=len(gpus), vendor=VENDOR, name=(market.group(1).strip() if market else "AMD GPU"),
                        gfx=gfx, source="rocminfo"))
    if not gpus:
        return Detection(reasons=("rocminfo: no GPU agents",))
    return Detection(vendor=VENDOR, gpus=tuple(gpus), source="rocminfo")


def probe_torch(torch: Any):
    """GPUs through a ROCm torch build (``gcnArchName``); last resort, creates a HIP context."""
    from portvlm.platform import Detection, torch_detection

    if torch is None:
        return Detection(reasons=("torch: not importable",))
    if not getattr(getattr(torch, "version", None), "hip", None):
        return Detection(reasons=("torch: not a ROCm build",))
    return torch_detection(
        torch, VENDOR, "ROCm", lambda props: {"gfx": normalize_gfx(getattr(props, "gcnArchName", None))},
        unavailable="torch: torch.cuda.is_available() is False (ROCm build)",
        note="read through torch: amdsmi and rocminfo unavailable",
    )


def rocm_version(probes: Probes) -> str | None:
    """The system ROCm release from ``/opt/rocm/.info/version`` (``$ROCM_PATH`` first)."""
    root = probes.env.get("ROCM_PATH") or "/opt/rocm"
    text = probes.read_text(f"{root}/.info/version")
    return text.strip().split("-")[0] if text and text.strip() else None


def probe(probes: Probes, torch: Any = None):
    """The first of amdsmi, rocminfo, torch that finds AMD GPUs; else none and every reason."""
    from portvlm.platform import Detection

    reasons: list[str] = []
    for step in (lambda: probe_amdsmi(probes), lambda: probe_rocminfo(probes), lambda: probe_torch(torch)):
        found = step()
        if found.gpus:
            return Detection(vendor=found.vendor, gpus=found.gpus, driver=found.driver, source=found.source,
                             runtime=rocm_version(probes), reasons=tuple(reasons) + found.reasons)
        reasons.extend(found.reasons)
    return Detection(reasons=tuple(reasons))
