"""CPU fallback: always wins when no GPU vendor does."""

from __future__ import annotations

from portvlm.platform.probes import Probes


def cpu_name(probes: Probes) -> str:
    """``"AMD EPYC 7B13 (x86_64)"`` from /proc/cpuinfo, else the platform module's guess."""
    facts = {}
    try:
        facts = probes.host() or {}
    except Exception:
        facts = {}
    machine = facts.get("machine") or "cpu"
    text = probes.read_text("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return f"{line.split(':', 1)[1].strip()} ({machine})"
    return f"{facts.get('processor') or machine} CPU"
