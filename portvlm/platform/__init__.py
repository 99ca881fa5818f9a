"""What hardware a run is on, as a comparable record. Detection lives in the vendor modules.

Probes return a value or ``None``; nothing here raises on a machine without a GPU, and nothing runs at import.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Platform:
    vendor: str  # "cpu" | "nvidia" | "amd"
    device: str  # torch device type: "cpu" | "cuda" (ROCm is "cuda" in torch too)
    name: str  # "Tesla V100-SXM2-32GB", "AMD Instinct MI300X", "x86_64 CPU"
    capability: tuple[int, int] | None = None  # CUDA compute capability
    gfx: str | None = None  # ROCm gfx arch, e.g. "gfx942"
    arch_id: str | None = None  # the matrix arch id it matches ("sm90", "gfx942", "cpu"), None if unknown
    torch_archs: tuple[str, ...] = ()  # torch.cuda.get_arch_list() of the installed build
    emulating: str | None = None  # set when an arch's policy runs on other hardware: the emulated arch id

    @property
    def is_gpu(self) -> bool:
        return self.device == "cuda"


CPU = Platform(vendor="cpu", device="cpu", name="CPU", arch_id="cpu")


def arch_id_for(capability: tuple[int, int] | None = None, gfx: str | None = None) -> str | None:
    """Map a capability / gfx target to the matrix arch id portvlm tests ("sm86" → the sm80 policy)."""
    if gfx:
        return gfx.split(":")[0]
    if capability is None:
        return "cpu"
    major, minor = capability
    if major == 7:
        return "sm70" if minor == 0 else f"sm7{minor}"
    if major == 8:
        return "sm80"
    if major >= 9:
        return "sm90"
    return f"sm{major}{minor}"
