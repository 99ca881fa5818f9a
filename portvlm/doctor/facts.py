"""Hardware and wheel facts the doctor encodes, each beside its source (../shared/research/hardware-matrix.md).

Data, not logic: which torch CUDA wheels carry which SM cubins, which xformers wheel pins which torch, where
flash-attn and bf16 run, AOTriton's gfx support. Change a row here when upstream changes; the doctor's checks
read only these tables.
"""

from __future__ import annotations

from portvlm.shims.versions import base_version, parse, parse_or_none

# ---------------------------------------------------------------------------------------------------------------
# torch CUDA wheels: (torch minor, variant) → SM cubins (major, minor) in the wheel.
# Sources: pytorch/builder manywheel/build_cuda.sh (release/2.1..2.5), pytorch .ci/manywheel/build_cuda.sh,
# RELEASE.md compatibility table, PRs #147607 (sm70 dropped from cu128 in 2.7), #175253 (2.11), RFC #172352.
# CUDA 13 removes Volta support entirely (NVIDIA deprecation note in pytorch#157517): no cu130+ wheel has sm_70.
# ---------------------------------------------------------------------------------------------------------------
_VOLTA_ERA = ((5, 0), (6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (9, 0))
_CU118 = ((3, 7),) + _VOLTA_ERA
_TURING_PLUS = ((7, 5), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0))
_CU128_SM70 = ((7, 0),) + _TURING_PLUS

TORCH_CUDA_WHEELS: dict[tuple[str, str], tuple[tuple[int, int], ...]] = {}
for _minor in ("2.1", "2.2", "2.3"):
    TORCH_CUDA_WHEELS[(_minor, "cu118")] = _CU118
    TORCH_CUDA_WHEELS[(_minor, "cu121")] = _VOLTA_ERA
for _minor in ("2.4", "2.5"):
    TORCH_CUDA_WHEELS[(_minor, "cu118")] = _CU118
    TORCH_CUDA_WHEELS[(_minor, "cu121")] = _VOLTA_ERA
    TORCH_CUDA_WHEELS[(_minor, "cu124")] = _VOLTA_ERA
TORCH_CUDA_WHEELS[("2.6", "cu118")] = _CU118
TORCH_CUDA_WHEELS[("2.6", "cu124")] = _VOLTA_ERA
TORCH_CUDA_WHEELS[("2.6", "cu126")] = _VOLTA_ERA
TORCH_CUDA_WHEELS[("2.7", "cu118")] = _CU118
TORCH_CUDA_WHEELS[("2.7", "cu126")] = _VOLTA_ERA
TORCH_CUDA_WHEELS[("2.7", "cu128")] = _TURING_PLUS  # PR #147607: "Deprecate sm70 for cuda 12.8 binary"
TORCH_CUDA_WHEELS[("2.8", "cu126")] = _VOLTA_ERA
TORCH_CUDA_WHEELS[("2.8", "cu128")] = _CU128_SM70  # sm70 added back (build_cuda.sh, "see #157517")
TORCH_CUDA_WHEELS[("2.8", "cu129")] = _CU128_SM70
for _minor in ("2.9", "2.10"):
    TORCH_CUDA_WHEELS[(_minor, "cu126")] = _VOLTA_ERA
    TORCH_CUDA_WHEELS[(_minor, "cu128")] = _CU128_SM70
    TORCH_CUDA_WHEELS[(_minor, "cu130")] = _TURING_PLUS
TORCH_CUDA_WHEELS[("2.11", "cu126")] = _VOLTA_ERA
TORCH_CUDA_WHEELS[("2.11", "cu128")] = _TURING_PLUS  # RFC #172352: Volta dropped from cu128 for 2.11
TORCH_CUDA_WHEELS[("2.11", "cu130")] = _TURING_PLUS
for _minor in ("2.12", "2.13", "2.14"):
    TORCH_CUDA_WHEELS[(_minor, "cu126")] = _VOLTA_ERA  # the only 2.12-2.14 build with sm_70 (RELEASE.md)
    TORCH_CUDA_WHEELS[(_minor, "cu130")] = _TURING_PLUS
    TORCH_CUDA_WHEELS[(_minor, "cu132")] = _TURING_PLUS  # exact list not read; CUDA 13 has no Volta in any case
# 2.15: PyPI's wheel is cu132 with sm_75 sm_80 sm_86 sm_90 sm_100 sm_120 (read from libtorch_python.so), plus cu130;
# CUDA 12.6 builds were dropped ("[CD] Remove CUDA 12.6 nightly binary builds", pytorch/pytorch#196249; RFC #190385),
# so no torch 2.15 build runs on Volta (../shared/research/upstream-5.25.md §3).
TORCH_CUDA_WHEELS[("2.15", "cu130")] = _TURING_PLUS
TORCH_CUDA_WHEELS[("2.15", "cu132")] = _TURING_PLUS

# The newest patch release of each minor portvlm knows of (for the suggested pip line).
TORCH_LATEST_PATCH = {"2.3": "2.3.1", "2.6": "2.6.0", "2.7": "2.7.1", "2.8": "2.8.0", "2.9": "2.9.1",
                      "2.10": "2.10.0", "2.11": "2.11.0", "2.12": "2.12.0", "2.13": "2.13.0", "2.14": "2.14.1",
                      "2.15": "2.15.0"}
# The newest released torch in the research snapshot (2.15.0, 2026-12); advice never goes past it.
NEWEST_STABLE_TORCH = "2.15"


def minors_without(capability: tuple[int, int]) -> list[str]:
    """torch minors none of whose CUDA builds carries a cubin for ``capability`` (``["2.15"]`` for sm70)."""
    by_minor: dict[str, bool] = {}
    for (minor, _), cubins in TORCH_CUDA_WHEELS.items():
        by_minor[minor] = by_minor.get(minor, False) or any(cubin_runs(c, capability) for c in cubins)
    return sorted((m for m, ok in by_minor.items() if not ok), key=_minor_key)


def _minor_key(minor: str) -> tuple[int, int]:
    a, b = minor.split(".")
    return int(a), int(b)


def cubin_runs(cubin: tuple[int, int], capability: tuple[int, int]) -> bool:
    """An sm_XY cubin runs on the same major with an equal or higher minor."""
    return cubin[0] == capability[0] and cubin[1] <= capability[1]


def torch_builds_for(capability: tuple[int, int]) -> list[tuple[str, str]]:
    """``[(torch minor, variant), …]`` whose wheel carries a cubin for ``capability``, newest torch first."""
    builds = [
        key for key, cubins in TORCH_CUDA_WHEELS.items()
        if any(cubin_runs(c, capability) for c in cubins) and _minor_key(key[0]) <= _minor_key(NEWEST_STABLE_TORCH)
    ]
    return sorted(builds, key=lambda k: (_minor_key(k[0]), k[1]), reverse=True)


def variants_without(capability: tuple[int, int]) -> list[str]:
    """CUDA variants whose wheels never carry a cubin for ``capability`` ("cu130", "cu132" for sm70)."""
    by_variant: dict[str, bool] = {}
    for (_, variant), cubins in TORCH_CUDA_WHEELS.items():
        by_variant[variant] = by_variant.get(variant, False) or any(cubin_runs(c, capability) for c in cubins)
    return sorted(v for v, ok in by_variant.items() if not ok)


def pip_torch(minor: str, variant: str) -> str:
    """``pip install 'torch==2.13.0' --index-url <PyTorch's cu126 index>``."""
    from portvlm.wheels import torch_index

    version = TORCH_LATEST_PATCH.get(minor, f"{minor}.*")
    return f"pip install 'torch=={version}' --index-url {torch_index(variant)}"


# The NVIDIA driver must support the CUDA major of the torch build (minor-version compatibility covers the
# rest of a major). Linux minimum drivers from NVIDIA's CUDA release notes.
DRIVER_FOR_CUDA_MAJOR = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

# ---------------------------------------------------------------------------------------------------------------
# bf16 / TF32 truth. torch.cuda.is_bf16_supported() counts emulation (True on sm70/sm75, always True on ROCm):
# gate on the hardware instead (NVIDIA: portvlm.platform.bf16_reasons). Research §5.
# ---------------------------------------------------------------------------------------------------------------
TF32_MIN_CAPABILITY = (8, 0)
FP16_MIN_CAPABILITY = (5, 3)
BF16_NATIVE_GFX = ("gfx90a", "gfx940", "gfx941", "gfx942", "gfx950")  # CDNA2+ (MI200, MI300, MI350)

# ---------------------------------------------------------------------------------------------------------------
# AOTriton (torch's flash / mem-efficient SDPA on ROCm). ROCm/aotriton include/aotriton/util.h +
# isArchExperimentallySupported: gfx90a and gfx942 are never experimental; the experimental set moved between
# AOTriton tags (0.10b-0.12b: gfx950, gfx1151, gfx1201; 0.13b: gfx1101-1103, gfx1150, gfx1152, gfx1153, gfx1200;
# gfx1100 experimental at 0.11b). Which AOTriton each torch wheel bundles was NOT verified: union of the lists.
# ---------------------------------------------------------------------------------------------------------------
AOTRITON_SUPPORTED = ("gfx90a", "gfx942")
AOTRITON_EXPERIMENTAL = ("gfx950", "gfx1100", "gfx1101", "gfx1102", "gfx1103", "gfx1150", "gfx1151", "gfx1152",
                         "gfx1153", "gfx1200", "gfx1201")
AOTRITON_ENV = "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"

# ---------------------------------------------------------------------------------------------------------------
# flash-attn (Dao-AILab): FA2 CUDA needs Ampere+ ("No V100 isn't supported", #524); ROCm CK backend (v2.6.2+)
# on gfx90a/gfx942/gfx950; the Triton AMD backend when FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE.
# Installed on sm70 it still breaks runs: libraries that see the package route to it and fail with
# "FlashAttention only supports Ampere GPUs or newer" even with eager attention requested
# (modelscope/ms-swift#5002, hiyouga/EasyR1#160).
# ---------------------------------------------------------------------------------------------------------------
FLASH_ATTN_MIN_CAPABILITY = (8, 0)
FLASH_ATTN_CK_GFX = ("gfx90a", "gfx942", "gfx950")
FLASH_ATTN_TRITON_AMD_ENV = "FLASH_ATTENTION_TRITON_AMD_ENABLE"
FLASH_ATTN_SM70_ISSUES = "modelscope/ms-swift#5002, hiyouga/EasyR1#160"

# ---------------------------------------------------------------------------------------------------------------
# xformers wheels pin torch exactly (wheels_build.yml appends `torch == X`); research §3a.
# 0.0.34+ uses the torch stable ABI: a wheel built for 2.10 loads on any later torch.
# ---------------------------------------------------------------------------------------------------------------
XFORMERS_FOR_TORCH = {
    "2.1.0": "0.0.22.post7", "2.1.1": "0.0.23", "2.1.2": "0.0.23.post1", "2.2.0": "0.0.24", "2.2.1": "0.0.25",
    "2.2.2": "0.0.25.post1", "2.3.0": "0.0.26.post1", "2.3.1": "0.0.27", "2.4.0": "0.0.27.post2",
    "2.4.1": "0.0.28.post1", "2.5.0": "0.0.28.post2", "2.5.1": "0.0.29.post1", "2.6.0": "0.0.29.post3",
    "2.7.0": "0.0.30", "2.7.1": "0.0.31.post1", "2.8.0": "0.0.32.post2", "2.9.0": "0.0.33", "2.9.1": "0.0.33.post2",
}
XFORMERS_STABLE_ABI = "0.0.34"  # first release loadable on any torch >= the one it was built for (2.10)
XFORMERS_FOR_NEWER_TORCH = "0.0.35"
XFORMERS_LAST_SM70 = "0.0.30"  # 0.0.31 CHANGELOG: "We will no longer support V100 or older GPUs"


def xformers_for_torch(torch_version: str) -> str | None:
    """The xformers release whose wheel was built for ``torch_version`` (base version, no local tag)."""
    base = base_version(torch_version)
    if base is None:
        return None
    if base in XFORMERS_FOR_TORCH:
        return XFORMERS_FOR_TORCH[base]
    parsed = parse_or_none(base)
    return XFORMERS_FOR_NEWER_TORCH if parsed is not None and parsed >= parse("2.10") else None

