"""``diagnose(info, matrix) -> Report``: pure. Turns an :class:`EnvInfo` into checks, matched cells and a verdict
per model family (OK / WARN / FAIL), each with reasons and one fix line.

No torch, no I/O: every fact comes from the record, every rule from ``facts.py``, the matrix and the backend
declarations, so the tests describe a V100 or an MI300 with a handful of fake values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from portvlm.backends import TORCH_FEATURES, torch_feature_reason
from portvlm.doctor import facts
from portvlm.doctor.collect import SCHEMA, EnvInfo
from portvlm.platform import Platform, bf16_reasons, kernel_image_reasons
from portvlm.shims.versions import base_version, parse, parse_or_none
from portvlm.wheels import torch_index

OK, WARN, FAIL = "OK", "WARN", "FAIL"
_RANK = {"ok": 0, "info": 0, "warn": 1, "fail": 2}
_VERDICT = {0: OK, 1: WARN, 2: FAIL}


@dataclass(frozen=True)
class Check:
    """One environment-wide finding: ``status`` is ok | info | warn | fail; ``fix`` is a command or an action."""

    id: str
    status: str
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class BackendChoice:
    """The attention backend portvlm would choose for one role, and why every other candidate lost."""

    role: str  # "vision" | "text"
    priority: tuple[str, ...]
    dtype: str
    head_dim: int
    chosen: str | None = None
    lost: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None  # no backend usable, or portvlm.backends unavailable


@dataclass(frozen=True)
class Shim:
    name: str
    detail: str
    source: str  # "declared" (portvlm.shims listing) | "predicted" (from the transformers version)
    label: str = ""  # a few words for the one-screen view


@dataclass(frozen=True)
class FamilyReport:
    model: str  # matrix model id: "qwen2_5vl"
    family: str  # transformers model_type: "qwen2_5_vl"
    verdict: str  # OK | WARN | FAIL
    cell: str | None = None  # matched cell id
    match: str = "none"  # "exact" (a stack pins the installed transformers) | "nearest" | "none"
    stack: str | None = None
    expected: str | None = None  # the matched cell's declared outcome: pass | xfail | excluded
    differences: tuple[str, ...] = ()  # installed vs the matched stack
    reasons: tuple[str, ...] = ()
    fix: str | None = None
    dtype: str | None = None
    vision: BackendChoice | None = None
    text: BackendChoice | None = None
    shims: tuple[Shim, ...] = ()


@dataclass(frozen=True)
class Report:
    env: EnvInfo
    arch: str | None = None  # the matrix arch whose policy applies
    arch_match: str = "none"  # "exact" | "nearest" | "none"
    evidence: str = "hardware"  # what a cell run here would record: "hardware" | "emulated"
    evidence_note: str | None = None
    checks: tuple[Check, ...] = ()
    families: tuple[FamilyReport, ...] = ()
    matrix: str | None = None  # path of the matrix used
    matrix_error: str | None = None
    verdict: str = OK

    def to_json(self) -> dict[str, Any]:
        """The documented record (docs/doctor.md; portvlm/data/doctor.schema.json)."""
        return {
            "schema": SCHEMA,
            "verdict": self.verdict,
            "arch": {"id": self.arch, "match": self.arch_match, "evidence": self.evidence,
                     "evidence_note": self.evidence_note},
            "matrix": {"path": self.matrix, "error": self.matrix_error},
            "checks": [asdict(c) for c in self.checks],
            "families": [asdict(f) for f in self.families],
            "environment": self.env.to_json(),
        }

    def exit_code(self, strict: bool = False) -> int:
        """0, or 1 under ``--strict`` when anything FAILs."""
        return 1 if strict and self.verdict == FAIL else 0


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def _sm(capability: tuple[int, int] | None) -> str:
    return f"sm{capability[0]}{capability[1]}" if capability else "unknown"


def _device_arch(platform: Platform) -> str:
    if platform.vendor == "nvidia":
        return _sm(platform.capability)
    if platform.vendor == "amd":
        return platform.gfx or "unknown gfx"
    return "cpu"


def _gfx_key(gfx: str | None) -> int:
    try:
        return int((gfx or "gfx0")[3:], 16)
    except ValueError:
        return 0


def _variant(info: EnvInfo) -> str | None:
    t = info.torch
    if t.hip:
        parts = str(t.hip).split(".")
        return f"rocm{parts[0]}.{parts[1]}" if len(parts) > 1 else f"rocm{t.hip}"
    if t.cuda:
        major, _, minor = str(t.cuda).partition(".")
        return f"cu{major}{minor.split('.')[0]}"
    return "cpu" if t.installed and not t.error else None


def _torch_usable(info: EnvInfo) -> bool:
    return info.torch.installed and info.torch.error is None


def policy_arch(info: EnvInfo, matrix) -> tuple[Any, str, str | None]:
    """``(arch, match, note)``: the matrix arch whose policy applies here, and whether it is the device's own."""
    if matrix is None:
        return None, "none", None
    p = info.platform
    by_id = {a.id: a for a in matrix.archs}
    if p.vendor == "cpu" or p.device == "cpu":
        arch = by_id.get("cpu")
        return arch, ("exact" if arch else "none"), None
    if p.arch_id and p.arch_id in by_id:
        return by_id[p.arch_id], "exact", None
    same = [a for a in matrix.archs if a.vendor == p.vendor]
    if not same:
        return None, "none", f"the matrix has no {p.vendor} arch"
    if p.vendor == "nvidia" and p.capability:
        lower = [a for a in same if a.capability and tuple(a.capability) <= p.capability]
        arch = max(lower, key=lambda a: a.capability) if lower else min(same, key=lambda a: a.capability or (0, 0))
    elif p.vendor == "amd":
        key = _gfx_key(p.gfx)
        lower = [a for a in same if _gfx_key(a.gfx) <= key]
        arch = max(lower, key=lambda a: _gfx_key(a.gfx)) if lower else min(same, key=lambda a: _gfx_key(a.gfx))
    else:
        arch = same[0]
    note = f"{_device_arch(p)} ({p.name}) has no arch in the matrix; applying the nearest policy, {arch.id} (untested here)"
    return arch, "nearest", note


# --------------------------------------------------------------------------------------------------------------
# environment-wide checks
# --------------------------------------------------------------------------------------------------------------
def _check_torch(info: EnvInfo, arch) -> list[Check]:
    t, p = info.torch, info.platform
    want = _suggested_torch(info, arch)
    if not t.installed:
        return [Check("torch", "fail", "torch is not installed", want)]
    if t.error:
        return [Check("torch", "fail", f"torch {t.version or ''} does not import: {t.error}".replace("  ", " "),
                      want or "reinstall torch for this machine's CUDA/ROCm")]
    build = f"CUDA {t.cuda}" if t.cuda else f"ROCm/HIP {t.hip}" if t.hip else "CPU-only"
    checks = [Check("torch", "ok", f"torch {t.version} ({build} build)")]
    if p.vendor == "nvidia" and not t.cuda:
        checks.append(Check("torch_build", "fail", f"{p.name} found but torch {t.version} is a {build} build", want))
    elif p.vendor == "amd" and not t.hip:
        checks.append(Check("torch_build", "fail", f"{p.name} found but torch {t.version} is a {build} build",
                            want or f"install a ROCm torch build: pip install torch --index-url {torch_index('rocm7.2')}"))
    elif p.is_gpu and t.cuda_available is False:
        checks.append(Check("torch_build", "fail",
                            f"{p.name} found but torch.cuda.is_available() is False (driver {info.driver or '?'})",
                            "check the driver (nvidia-smi / rocm-smi) and CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES"))
    return checks


def _suggested_torch(info: EnvInfo, arch) -> str | None:
    """A pip line for a torch build that runs on this device."""
    p = info.platform
    if p.vendor == "nvidia" and p.capability:
        builds = facts.torch_builds_for(p.capability)
        if builds:
            return facts.pip_torch(*builds[0])
    if p.vendor == "amd":
        return "pip install torch --index-url " + torch_index("rocm7.2")
    if p.vendor == "cpu":
        return "pip install torch --index-url " + torch_index("cpu")
    return "pip install torch"


def _check_driver(info: EnvInfo) -> list[Check]:
    t = info.torch
    if info.platform.vendor != "nvidia" or not t.cuda:
        return []
    torch_major = int(str(t.cuda).split(".")[0])
    if not info.driver_cuda:
        return [Check("driver", "info", f"driver {info.driver or 'unknown'}; its CUDA version could not be read")]
    driver_major = int(str(info.driver_cuda).split(".")[0])
    if driver_major < torch_major:
        minimum = facts.DRIVER_FOR_CUDA_MAJOR.get(torch_major, "a newer driver")
        return [Check("driver", "fail",
                      f"driver {info.driver} supports CUDA {info.driver_cuda}; torch was built with CUDA {t.cuda}",
                      f"upgrade the NVIDIA driver to >= {minimum}, or install a cu{driver_major}x torch build")]
    return [Check("driver", "ok", f"driver {info.driver} (CUDA {info.driver_cuda}) runs torch's CUDA {t.cuda}")]


def _check_kernel_image(info: EnvInfo) -> list[Check]:
    p, t = info.platform, info.torch
    if not p.is_gpu or not _torch_usable(info):
        return []
    if not t.arch_list:
        return [Check("kernel_image", "info", "torch's compiled arch list could not be read; not judged")]
    why = kernel_image_reasons(t.arch_list, p.capability if p.vendor == "nvidia" else None,
                               p.gfx if p.vendor == "amd" else None)
    if not why:
        return [Check("kernel_image", "ok", f"torch has kernels for {_device_arch(p)}")]
    message = f"{why[0]} → 'no kernel image is available for execution on the device' at the first CUDA op"
    if p.vendor == "nvidia" and p.capability:
        builds = facts.torch_builds_for(p.capability)
        never = facts.variants_without(p.capability)
        newest_per_variant: dict[str, str] = {}
        for m, v in builds:
            newest_per_variant.setdefault(v, m)
        options = ", ".join(f"torch {m}+{v}" for v, m in list(newest_per_variant.items())[:4]) or "none known"
        fix = (f"{facts.pip_torch(*builds[0])}  (also: {options}"
               + (f"; {'/'.join(never)} never ship {_sm(p.capability).replace('sm', 'sm_')}" if never else "")
               + ")") if builds else f"no torch wheel portvlm knows of carries {_sm(p.capability)}"
        return [Check("kernel_image", "fail", message, fix)]
    return [Check("kernel_image", "fail", message,
                  f"a ROCm torch build whose PYTORCH_ROCM_ARCH includes {p.gfx} (rocm/pytorch images list theirs)")]


def _check_arch(info: EnvInfo, arch, match: str, note: str | None) -> list[Check]:
    p = info.platform
    checks = []
    if arch is None:
        checks.append(Check("arch", "warn", note or f"no matrix arch for {_device_arch(p)}"))
    elif match == "nearest":
        checks.append(Check("arch", "warn", note or "", f"expect untested behaviour; the tested archs are listed in "
                            f"matrix.yaml (policy applied: {arch.id})"))
    else:
        checks.append(Check("arch", "ok", f"{_device_arch(p)} ({p.name}) → matrix arch {arch.id}"))
    if p.vendor == "amd" and p.gfx:
        gfx = p.gfx
        if gfx in facts.AOTRITON_SUPPORTED:
            checks.append(Check("aotriton", "ok", f"AOTriton (torch SDPA flash/mem-efficient) fully supports {gfx}"))
        elif gfx in facts.AOTRITON_EXPERIMENTAL:
            if info.env.get(facts.AOTRITON_ENV) == "1":
                checks.append(Check("aotriton", "info", f"{gfx} is experimental in AOTriton; enabled by "
                                    f"{facts.AOTRITON_ENV}=1"))
            else:
                checks.append(Check("aotriton", "warn", f"{gfx} is experimental in AOTriton: torch refuses its SDPA "
                                    "flash/mem-efficient kernels and falls back to math", f"export {facts.AOTRITON_ENV}=1"))
        else:
            checks.append(Check("aotriton", "warn", f"AOTriton has no kernels for {gfx}: torch SDPA runs the math "
                                "fallback (O(S^2) memory, slow)", None))
    return checks


def native_bf16(platform: Platform) -> bool | None:
    """Hardware bf16 (not torch.cuda.is_bf16_supported(), which counts emulation): sm80+ / CDNA2+."""
    if platform.vendor == "nvidia":
        return None if platform.capability is None else not bf16_reasons(platform.vendor, platform.capability)
    if platform.vendor == "amd":
        return None if not platform.gfx else platform.gfx in facts.BF16_NATIVE_GFX
    return None


def _check_precision(info: EnvInfo, arch) -> list[Check]:
    p, t = info.platform, info.torch
    dtype = arch.policy_dtype if arch is not None else None
    if p.vendor == "nvidia" and p.capability:
        bf16 = native_bf16(p)
        bf16_text = (f"bf16 native ({_sm(p.capability)})" if bf16 else
                     f"bf16 emulated only ({_sm(p.capability)} < sm80; torch.cuda.is_bf16_supported() still says True)")
        fp16 = "fp16 native" if p.capability >= facts.FP16_MIN_CAPABILITY else "fp16 slow"
        if p.capability >= facts.TF32_MIN_CAPABILITY:
            state = {True: "on", False: "off (torch default)", None: "unknown"}[t.tf32_matmul]
            tf32 = f"TF32 available, matmul TF32 {state}"
        else:
            tf32 = "no TF32 (needs sm80+)"
        text = f"{bf16_text} · {fp16} · {tf32}"
    elif p.vendor == "amd":
        bf16 = native_bf16(p)
        text = ("bf16 native" if bf16 else f"bf16 not judged for {p.gfx or 'unknown gfx'} (native list: "
                f"{', '.join(facts.BF16_NATIVE_GFX)})") + " · fp16 native · TF32 n/a (ROCm)"
    else:
        bf16 = None
        text = "CPU: fp32 policy (bf16/fp16 run but are slow and unverified here) · TF32 n/a"
    status = "ok"
    fix = None
    if dtype == "bfloat16" and bf16 is False:
        status, fix = "warn", "run with torch_dtype=torch.float16 (or float32); bf16 is emulated here"
        text += f"; the applied policy ({arch.id}) prefers bfloat16"
    if dtype:
        text += f" → policy dtype {dtype}"
    return [Check("precision", status, text, fix)]


def _check_transformers(info: EnvInfo, matrix, arch=None) -> list[Check]:
    version = parse_or_none(info.transformers.version)
    if version is None:
        newest = _newest_stack_transformers(matrix)
        return [Check("transformers", "fail", info.transformers.error or "transformers not installed",
                      f"pip install 'transformers=={newest}'" if newest else "pip install transformers")]
    checks = []
    stacks = [parse_or_none(s.transformers) for s in (matrix.stacks if matrix is not None else ())]
    stacks = sorted(v for v in stacks if v is not None)
    if stacks and version < stacks[0]:
        checks.append(Check("transformers", "fail",
                            f"transformers {version} is older than every stack portvlm tests (oldest {stacks[0]})",
                            f"pip install 'transformers=={stacks[-1]}' (or any tested version >= {stacks[0]})"))
        return checks
    verified = _verified_range()
    if verified is not None and not verified[0].contains(version, prereleases=True):
        allowed = info.env.get("PORTVLM_ALLOW_UNVERIFIED") == "1"
        newest = stacks[-1] if stacks else None
        if arch is not None and matrix is not None and arch.stacks:  # the newest version tested on this arch
            newest = max(parse_or_none(matrix.stack(s).transformers) or parse("0") for s in arch.stacks)
        checks.append(Check(
            "transformers", "warn" if allowed else "fail",
            f"transformers {version} is outside the range portvlm's shims were verified on ({verified[1]})"
            + ("; allowed by PORTVLM_ALLOW_UNVERIFIED=1" if allowed else ": portvlm.patch refuses it"),
            None if allowed else (f"pip install 'transformers=={newest}'" if newest else None)
            + " (or export PORTVLM_ALLOW_UNVERIFIED=1 to try it unverified)"))
        return checks
    checks.append(Check("transformers", "ok", f"transformers {version}"))
    return checks


def _verified_range():
    try:
        from portvlm.shims import versions

        return versions.VERIFIED_TRANSFORMERS, versions.VERIFIED_RANGE_TEXT
    except Exception:
        return None


def _newest_stack_transformers(matrix) -> str | None:
    if matrix is None or not matrix.stacks:
        return None
    return str(max(parse_or_none(s.transformers) or parse("0") for s in matrix.stacks))


def _check_xformers(info: EnvInfo, arch) -> list[Check]:
    x, p = info.xformers, info.platform
    if x.version is None:
        return [Check("xformers", "info", "xformers not installed (portvlm does not need it)")]
    installed = base_version(info.torch.version)
    wanted = facts.xformers_for_torch(info.torch.version) if installed else None
    index = _variant(info)
    pip = (f"pip install 'xformers=={wanted}'" + (f" --index-url {torch_index(index)}"
           if index and index != "cpu" else "")) if wanted else "pip uninstall -y xformers"
    uses_xformers = arch is not None and "xformers_blockdiag" in arch.vision_backends
    mismatch = None
    built_for = base_version(x.built_for_torch)
    if x.requires_torch and x.requires_torch.startswith("==") and installed:
        pinned = base_version(x.requires_torch[2:])
        if pinned and pinned != installed:
            mismatch = pinned
    if built_for and installed and built_for != installed:
        stable_abi = (parse_or_none(x.version) or parse("0")) >= parse(facts.XFORMERS_STABLE_ABI)
        if not (stable_abi and parse(installed) >= parse(built_for)):
            mismatch = built_for
    checks = []
    if mismatch or x.extension_loaded is False:
        what = (f"xformers {x.version} was built for torch {mismatch}, installed torch is {info.torch.version}"
                if mismatch else f"xformers {x.version}: C++/CUDA extension did not load")
        if x.extension_loaded is False:
            what += f"; extension not loaded ({x.extension_error or 'unknown error'}): every xformers op fails"
        status = "fail" if uses_xformers and x.extension_loaded is not True else "warn"
        checks.append(Check("xformers", status, what, pip))
    elif x.error:
        checks.append(Check("xformers", "warn", f"xformers {x.version} installed but unusable: {x.error}", pip))
    if p.vendor == "nvidia" and p.capability and p.capability < (7, 5):
        v = parse_or_none(x.version)
        if v is not None and v > parse(facts.XFORMERS_LAST_SM70):
            checks.append(Check("xformers", "warn", f"xformers {x.version} wheels carry no {_sm(p.capability)} "
                                f"kernels (0.0.31 dropped V100; last with sm70: {facts.XFORMERS_LAST_SM70} for torch 2.7.0)",
                                f"pip install 'xformers=={facts.XFORMERS_LAST_SM70}' with torch 2.7.0 (cu118/cu126)"))
    if not checks:
        usable = [o.name for o in x.ops if not xformers_op_reasons(o, p, None)]
        checks.append(Check("xformers", "ok", f"xformers {x.version} (built for torch {x.built_for_torch or '?'}); "
                            f"usable fmha ops here: {', '.join(usable) or 'none'}"))
    return checks


def xformers_op_reasons(op, platform: Platform, dtype: str | None) -> list[str]:
    """Why one xformers fmha operator cannot run here (from its own class declarations)."""
    reasons = []
    if not op.built:
        reasons.append("not built into this wheel")
    if platform.device not in op.devices:
        reasons.append(f"needs device {'/'.join(op.devices) or '?'}, found {platform.device}")
    if platform.vendor == "nvidia" and op.min_capability and platform.capability and platform.capability < op.min_capability:
        reasons.append(f"needs {_sm(op.min_capability)}+, found {_sm(platform.capability)}")
    if dtype and op.dtypes and dtype not in op.dtypes:
        reasons.append(f"needs dtype {'/'.join(op.dtypes)}, found {dtype}")
    if dtype == "bfloat16" and bf16_reasons(platform.vendor, platform.capability):
        reasons.append("bf16 needs sm80+ (torch's mem-efficient kernel: fp16/fp32 only below sm80)")
    return reasons


def _check_flash_attn(info: EnvInfo) -> list[Check]:
    f, p = info.flash_attn, info.platform
    if f.version is None:
        return [Check("flash_attn", "info", "flash-attn not installed (portvlm does not need it)")]
    unusable = None
    if p.vendor == "nvidia" and p.capability and p.capability < facts.FLASH_ATTN_MIN_CAPABILITY:
        unusable = f"flash-attn needs sm80+ (Ampere), found {_sm(p.capability)} ({p.name})"
    elif p.vendor == "amd" and p.gfx not in facts.FLASH_ATTN_CK_GFX and info.env.get(
            facts.FLASH_ATTN_TRITON_AMD_ENV) != "TRUE":
        unusable = f"flash-attn's CK backend supports {', '.join(facts.FLASH_ATTN_CK_GFX)}, found {p.gfx}"
    elif p.vendor == "cpu":
        unusable = "flash-attn has no CPU kernels"
    if unusable and p.vendor != "cpu":
        return [Check("flash_attn", "warn",
                      f"flash-attn {f.version} is installed but cannot run here: {unusable}. Libraries that find the "
                      "package route to it anyway and fail with 'FlashAttention only supports Ampere GPUs or newer', "
                      f"even with eager attention requested ({facts.FLASH_ATTN_SM70_ISSUES})",
                      "pip uninstall -y flash-attn")]
    if f.importable is False:
        return [Check("flash_attn", "warn", f"flash-attn {f.version} is installed but does not import: {f.error}",
                      "pip uninstall -y flash-attn (or reinstall it built for this torch)")]
    if unusable:
        return [Check("flash_attn", "info", f"flash-attn {f.version} installed; {unusable}")]
    return [Check("flash_attn", "ok", f"flash-attn {f.version} installed and usable on {_device_arch(p)} "
                  "(portvlm itself never calls it)")]


def _check_gpu(info: EnvInfo) -> list[Check]:
    p = info.platform
    if not p.is_gpu:
        why = "; ".join(info.gpu_reasons[:6]) or "no GPU probe found a device"
        return [Check("gpu", "info", f"no GPU ({why})")]
    memory = f", {p.memory_mib / 1024:.0f} GiB" if p.memory_mib else ""
    more = f" (+{p.count - 1} more)" if p.count > 1 else ""
    via = f"via {p.source}" + ("; a CUDA context was created" if p.source == "torch" else "")
    return [Check("gpu", "ok", f"{p.name} ({_device_arch(p)}{memory}){more}, {via}")]


# --------------------------------------------------------------------------------------------------------------
# per family
# --------------------------------------------------------------------------------------------------------------
def _feature_probe(info: EnvInfo) -> Callable[[str, Platform, str, int], str | None]:
    """Answer portvlm.backends' feature probes from the record instead of importing torch (keeps this pure)."""
    t, real = info.torch, info.platform

    def probe(need: str, platform: Platform, dtype: str, head_dim: int) -> str | None:
        if not _torch_usable(info):
            return f"needs torch, found none ({t.error or 'not installed'})"
        if need == "torch":
            return None
        if need in TORCH_FEATURES:  # the same declaration the live probe reads, judged on the record
            return torch_feature_reason(need, t.features.get(TORCH_FEATURES[need].record), t.version)
        if need == "triton":
            return None if t.triton else "needs triton (flex_attention compiles Triton kernels), found none"
        if need == "device_kernels":
            if not real.is_gpu:
                return f"needs a CUDA/ROCm device to run kernels on, found none (torch {t.version})"
            if not (t.cuda or t.hip):
                return f"needs a CUDA/ROCm torch build, found torch {t.version}"
            if t.cuda_available is False:
                return "needs torch.cuda.is_available(), which is False"
            why = kernel_image_reasons(t.arch_list, real.capability if real.vendor == "nvidia" else None,
                                       real.gfx if real.vendor == "amd" else None)
            return f"needs device kernels: {why[0]}" if why else None
        if need == "xformers_op":
            x = info.xformers
            if x.version is None:
                return "needs xformers, not installed"
            if x.error or x.extension_loaded is False:
                return f"needs a loadable xformers: {x.extension_error or x.error}"
            if not real.is_gpu:
                return "needs a CUDA/ROCm device for xformers fmha (no CPU operator since xformers 0.0.22)"
            if real.vendor == "nvidia" and real.capability and real.capability < (7, 5):
                v = parse_or_none(x.version)
                if v is not None and v > parse(facts.XFORMERS_LAST_SM70):
                    return (f"needs xformers <= {facts.XFORMERS_LAST_SM70} on {_sm(real.capability)}: "
                            f"{x.version} wheels carry no sm70 kernels")
            if not x.ops:
                return "needs xformers fmha operators, none listed"
            per_op = {o.name: xformers_op_reasons(o, real, dtype) for o in x.ops}
            if any(not r for r in per_op.values()):
                return None
            return "needs an xformers fmha op for this input: " + "; ".join(
                f"{n}: {', '.join(r)}" for n, r in list(per_op.items())[:4])
        return f"needs {need!r}: the doctor has no probe for it (not judged)"

    return probe


def choose_backend(info: EnvInfo, role: str, priority: tuple[str, ...], dtype: str, head_dim: int,
                   platform: Platform) -> BackendChoice:
    """portvlm.backends.select with the record's feature facts; a reason, never an exception, when it cannot."""
    base = BackendChoice(role=role, priority=tuple(priority), dtype=dtype, head_dim=head_dim)
    try:
        from portvlm import backends
    except Exception as exc:
        return replace(base, error=f"portvlm.backends not importable: {type(exc).__name__}: {exc}")
    try:
        selection = backends.select(priority, platform, dtype, head_dim, probe=_feature_probe(info))
    except Exception as exc:
        lost = {}
        for name in priority:
            try:
                lost[name] = list(backends.backend_reasons(name, platform, dtype, head_dim, probe=_feature_probe(info)))
            except Exception as inner:
                lost[name] = [f"{type(inner).__name__}: {inner}"]
        return replace(base, lost=lost, error=f"no usable {role} backend among {', '.join(priority)} ({type(exc).__name__})")
    return replace(base, chosen=selection.name, lost={k: list(v) for k, v in selection.lost.items()})


def _shims_for(info: EnvInfo, family: str) -> tuple[Shim, ...]:
    """The declared shims (``portvlm.shims.patch.SHIMS``) that would apply to ``family`` on the installed version.

    Predicted from each declaration's range, ``present`` range and ``families`` (its probe needs a built model).
    """
    v = parse_or_none(info.transformers.version)
    if v is None:
        return ()
    from portvlm.shims.patch import SHIMS

    return tuple(Shim(s.name, str(s.answers), "declared", s.label_for(v))
                 for s in SHIMS if not s.prediction_reasons(family, v))


def _match_stack(info: EnvInfo, arch, matrix):
    """(stack, match, differences) of the arch's stack closest to what is installed."""
    stacks = [matrix.stack(s) for s in arch.stacks]
    if not stacks:
        return None, "none", ()
    tf = parse_or_none(info.transformers.version)
    torch_v = base_version(info.torch.version)
    variant = _variant(info)

    def torch_score(s):
        return (s.torch == torch_v, s.torch_variant == variant)

    exact = [s for s in stacks if tf is not None and parse_or_none(s.transformers) == tf]
    if exact:
        stack, match = max(exact, key=torch_score), "exact"
    elif tf is None:
        stack, match = stacks[-1], "nearest"
    else:
        below = [s for s in stacks if (parse_or_none(s.transformers) or parse("0")) <= tf]
        pool = below or stacks
        pick = max if below else min
        best = pick(parse_or_none(s.transformers) or parse("0") for s in pool)
        stack = max((s for s in pool if parse_or_none(s.transformers) == best), key=torch_score)
        match = "nearest"
    diffs = []
    if tf is None or parse_or_none(stack.transformers) != tf:
        diffs.append(f"transformers {info.transformers.version or 'missing'} vs {stack.transformers}")
    if torch_v and (stack.torch != torch_v or (variant and stack.torch_variant != variant)):
        diffs.append(f"torch {torch_v}+{variant} vs {stack.torch}+{stack.torch_variant}")
    elif not torch_v:
        diffs.append(f"torch missing vs {stack.torch}+{stack.torch_variant}")
    if (info.xformers.version or None) != (stack.xformers or None):
        diffs.append(f"xformers {info.xformers.version or 'none'} vs {stack.xformers or 'none'}")
    if (info.flash_attn.version or None) != (stack.flash_attn or None):
        diffs.append(f"flash-attn {info.flash_attn.version or 'none'} vs {stack.flash_attn or 'none'}")
    return stack, match, tuple(diffs)


def _expected(matrix, arch, model, stack):
    try:
        from portvlm.matrix.expand import first_expectation

        e = first_expectation(matrix.expectations, arch, model, stack)
        return (e.outcome, e.reason) if e else ("pass", None)
    except Exception:
        return "pass", None


def _family_reasons(model_type: str, version: str | None) -> list[str]:
    v = parse_or_none(version)
    if v is None:
        return []
    try:
        from portvlm.shims.versions import family_reasons

        return list(family_reasons(model_type, v))
    except Exception:
        return []


def _family(info: EnvInfo, matrix, arch, model, checks: list[Check]) -> FamilyReport:
    p = info.platform
    vision_dim, text_dim = facts.HEAD_DIMS.get(model.family, facts.DEFAULT_HEAD_DIMS)
    global_rank = max((_RANK[c.status] for c in checks), default=0)
    ranked = sorted((c for c in checks if _RANK[c.status]), key=lambda c: -_RANK[c.status])
    global_fix = next((c.fix for c in ranked if c.fix), None)
    reasons: list[str] = [f"environment {c.status.upper()}: {c.id}" for c in ranked]
    fixes: list[str] = []
    own_rank = 0
    stack = None
    match, diffs, expected, cell = "none", (), None, None
    if arch is not None:
        stack, match, diffs = _match_stack(info, arch, matrix)
    if stack is not None:
        from portvlm.matrix.schema import cell_id

        cell = cell_id(arch.id, model.id, stack.id)
        expected, why = _expected(matrix, arch, model, stack)
        if expected == "excluded":
            own_rank = max(own_rank, 2)
            reasons.append(f"cell {cell} is excluded: {why}")
        elif expected == "xfail":
            own_rank = max(own_rank, 1)
            reasons.append(f"cell {cell} is expected to fail: {why}")
        if match == "nearest" and info.transformers.version:
            own_rank = max(own_rank, 1)
            reasons.append(f"no {arch.id} stack pins transformers {info.transformers.version}; nearest tested: "
                           f"{stack.id}")
            fixes.append(f"pip install 'transformers=={stack.transformers}' (the tested {arch.id} stack)")
    for why in _family_reasons(model.family, info.transformers.version):
        own_rank = 2
        reasons.append(why)
        fixes.insert(0, f"pip install 'transformers>={model.min_transformers}'")
    # dtype: the arch policy's first dtype this hardware runs natively (bf16 never on emulation).
    dtype = "float32"
    if arch is not None:
        dtypes = [d for d in arch.dtypes if not (d == "bfloat16" and native_bf16(p) is False)]
        dtype = (dtypes or ["float32"])[0]
    vision = text = None
    if arch is not None:
        vision = choose_backend(info, "vision", tuple(arch.vision_backends), dtype, vision_dim, p)
        text = choose_backend(info, "text", tuple(arch.text_backends), dtype, text_dim, p)
        for choice in (vision, text):
            if choice.chosen is None and choice.error and "not importable" not in choice.error and _torch_usable(info):
                own_rank = 2
                reasons.append(choice.error)
    rank = max(global_rank, own_rank)
    fix = fixes[0] if fixes and own_rank >= global_rank else (global_fix or (fixes[0] if fixes else None))
    return FamilyReport(
        model=model.id, family=model.family, verdict=_VERDICT[rank], cell=cell, match=match,
        stack=stack.id if stack else None, expected=expected, differences=diffs, reasons=tuple(reasons),
        fix=fix if rank else None, dtype=dtype, vision=vision, text=text,
        shims=_shims_for(info, model.family),
    )


def diagnose(info: EnvInfo, matrix=None, *, matrix_error: str | None = None) -> Report:
    """Checks, matched cells, chosen backends and a verdict per model family; pure, never raises."""
    try:
        return _diagnose(info, matrix, matrix_error)
    except Exception as exc:  # a bug here must still produce a report
        check = Check("doctor", "fail", f"diagnosis failed: {type(exc).__name__}: {exc}",
                      "report this as a portvlm bug, with `portvlm doctor --json`")
        return Report(env=info, checks=(check,), verdict=FAIL, matrix_error=matrix_error)


def _diagnose(info: EnvInfo, matrix, matrix_error: str | None) -> Report:
    arch, match, note = policy_arch(info, matrix)
    checks: list[Check] = []
    checks += _check_gpu(info)
    checks += _check_torch(info, arch)
    checks += _check_kernel_image(info)  # before the driver: the right torch build often fixes both
    checks += _check_driver(info)
    if matrix is not None:
        checks += _check_arch(info, arch, match, note)
    elif matrix_error:
        checks.append(Check("matrix", "warn", f"matrix unavailable: {matrix_error}", "portvlm matrix --file PATH"))
    checks += _check_precision(info, arch)
    checks += _check_transformers(info, matrix, arch)
    checks += _check_xformers(info, arch)
    checks += _check_flash_attn(info)
    if info.probe_errors:
        checks.append(Check("probes", "warn", "probes failed (values unknown): " + "; ".join(info.probe_errors)))
    global_rank = max((_RANK[c.status] for c in checks), default=0)
    families = []
    if matrix is not None:
        families = [_family(info, matrix, arch, m, checks) for m in matrix.models]
    p = info.platform
    evidence, evidence_note = "hardware", None
    if not p.is_gpu:
        evidence_note = ("CPU host: cpu cells run here as `hardware` evidence; GPU arch policies can only be "
                         "`emulated` (dtype/backend rules of the arch, CPU kernels)")
    elif match == "nearest":
        evidence, evidence_note = "emulated", note
    verdict_rank = max([global_rank] + [_RANK[f.verdict.lower()] for f in families])
    return Report(
        env=info, arch=arch.id if arch is not None else None, arch_match=match, evidence=evidence,
        evidence_note=evidence_note, checks=tuple(checks), families=tuple(families),
        matrix=getattr(matrix, "path", None), matrix_error=matrix_error, verdict=_VERDICT[verdict_rank],
    )
