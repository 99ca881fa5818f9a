"""Environment-wide checks (pure): GPU, torch build, kernel image, driver, arch, precision, transformers,
xformers, flash-attn; each a :class:`Check` with a reason and a fix."""

from __future__ import annotations

from portvlm.doctor import facts
from portvlm.doctor.collect import EnvInfo
from portvlm.doctor.report import Check
from portvlm.platform import Platform, bf16_reasons, kernel_image_reasons
from portvlm.platform import sm_name as platform_sm_name
from portvlm.records import CheckStatus
from portvlm.shims.versions import ALLOW_UNVERIFIED_ENV, base_version, newest_verified, parse, parse_or_none
from portvlm.wheels import torch_index


def sm_name(capability: tuple[int, int] | None) -> str:
    """``platform.sm_name``, with ``"unknown"`` for a capability that could not be read (the doctor's wording)."""
    return platform_sm_name(capability) or "unknown"


def device_arch(platform: Platform) -> str:
    if platform.vendor == "nvidia":
        return sm_name(platform.capability)
    if platform.vendor == "amd":
        return platform.gfx or "unknown gfx"
    return "cpu"


def torch_variant_of(info: EnvInfo) -> str | None:
    t = info.torch
    if t.hip:
        parts = str(t.hip).split(".")
        return f"rocm{parts[0]}.{parts[1]}" if len(parts) > 1 else f"rocm{t.hip}"
    if t.cuda:
        major, _, minor = str(t.cuda).partition(".")
        return f"cu{major}{minor.split('.')[0]}"
    return "cpu" if t.installed and not t.error else None


def torch_usable(info: EnvInfo) -> bool:
    return info.torch.installed and info.torch.error is None


def check_torch(info: EnvInfo, arch) -> list[Check]:
    t, p = info.torch, info.platform
    want = _suggested_torch(info, arch)
    if not t.installed:
        return [Check("torch", CheckStatus.FAIL, "torch is not installed", want)]
    if t.error:
        return [Check("torch", CheckStatus.FAIL, f"torch {t.version or ''} does not import: {t.error}".replace("  ", " "),
                      want or "reinstall torch for this machine's CUDA/ROCm")]
    build = f"CUDA {t.cuda}" if t.cuda else f"ROCm/HIP {t.hip}" if t.hip else "CPU-only"
    checks = [Check("torch", CheckStatus.OK, f"torch {t.version} ({build} build)")]
    if p.vendor == "nvidia" and not t.cuda:
        checks.append(Check("torch_build", CheckStatus.FAIL, f"{p.name} found but torch {t.version} is a {build} build", want))
    elif p.vendor == "amd" and not t.hip:
        checks.append(Check("torch_build", CheckStatus.FAIL, f"{p.name} found but torch {t.version} is a {build} build",
                            want or f"install a ROCm torch build: pip install torch --index-url {torch_index('rocm7.2')}"))
    elif p.is_gpu and t.cuda_available is False:
        checks.append(Check("torch_build", CheckStatus.FAIL,
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


def check_driver(info: EnvInfo) -> list[Check]:
    t = info.torch
    if info.platform.vendor != "nvidia" or not t.cuda:
        return []
    torch_major = int(str(t.cuda).split(".")[0])
    if not info.driver_cuda:
        return [Check("driver", CheckStatus.INFO, f"driver {info.driver or 'unknown'}; its CUDA version could not be read")]
    driver_major = int(str(info.driver_cuda).split(".")[0])
    if driver_major < torch_major:
        minimum = facts.DRIVER_FOR_CUDA_MAJOR.get(torch_major, "a newer driver")
        return [Check("driver", CheckStatus.FAIL,
                      f"driver {info.driver} supports CUDA {info.driver_cuda}; torch was built with CUDA {t.cuda}",
                      f"upgrade the NVIDIA driver to >= {minimum}, or install a cu{driver_major}x torch build")]
    return [Check("driver", CheckStatus.OK, f"driver {info.driver} (CUDA {info.driver_cuda}) runs torch's CUDA {t.cuda}")]


def check_kernel_image(info: EnvInfo) -> list[Check]:
    p, t = info.platform, info.torch
    if not p.is_gpu or not torch_usable(info):
        return []
    if not t.arch_list:
        return [Check("kernel_image", CheckStatus.INFO, "torch's compiled arch list could not be read; not judged")]
    why = kernel_image_reasons(t.arch_list, p.capability if p.vendor == "nvidia" else None,
                               p.gfx if p.vendor == "amd" else None)
    if not why:
        return [Check("kernel_image", CheckStatus.OK, f"torch has kernels for {device_arch(p)}")]
    message = f"{why[0]} → 'no kernel image is available for execution on the device' at the first CUDA op"
    if p.vendor == "nvidia" and p.capability:
        builds = facts.torch_builds_for(p.capability)
        never = facts.variants_without(p.capability)
        newest_per_variant: dict[str, str] = {}
        for m, v in builds:
            newest_per_variant.setdefault(v, m)
        options = ", ".join(f"torch {m}+{v}" for v, m in list(newest_per_variant.items())[:4]) or "none known"
        fix = (f"{facts.pip_torch(*builds[0])}  (also: {options}"
               + (f"; {'/'.join(never)} never ship {sm_name(p.capability).replace('sm', 'sm_')}" if never else "")
               + ")") if builds else f"no torch wheel portvlm knows of carries {sm_name(p.capability)}"
        installed = base_version(t.version)
        minor = ".".join(installed.split(".")[:2]) if installed else None
        if minor in facts.minors_without(p.capability) and builds:
            # Said from the table, after the verdict above came from the arch list: the whole minor is out.
            last = f"{facts.TORCH_LATEST_PATCH.get(builds[0][0], builds[0][0])}+{builds[0][1]}"
            message += (f"; no torch {minor} build ships {sm_name(p.capability).replace('sm', 'sm_')}: "
                        f"the last torch for {sm_name(p.capability)} is {last}")
        return [Check("kernel_image", CheckStatus.FAIL, message, fix)]
    return [Check("kernel_image", CheckStatus.FAIL, message,
                  f"a ROCm torch build whose PYTORCH_ROCM_ARCH includes {p.gfx} (rocm/pytorch images list theirs)")]


def check_arch(info: EnvInfo, match, entry: str | None = None) -> list[Check]:
    """The device against the matrix (a :class:`portvlm.policy.ArchMatch`); ``entry``: what to add to matrix.yaml."""
    p = info.platform
    checks = []
    if match.exact:
        checks.append(Check("arch", CheckStatus.OK, f"{device_arch(p)} ({p.name}) → matrix arch {match.arch.id}"))
    else:
        fix = None
        if entry:
            fix = f"add {match.device} to portvlm/data/matrix.yaml under archs:, then run its cells here\n{entry}"
        checks.append(Check("arch", CheckStatus.WARN, f"{p.name} {'is' if match.device else '→'} {match.reason}", fix))
    if p.vendor == "amd" and p.gfx:
        gfx = p.gfx
        if gfx in facts.AOTRITON_SUPPORTED:
            checks.append(Check("aotriton", CheckStatus.OK, f"AOTriton (torch SDPA flash/mem-efficient) fully supports {gfx}"))
        elif gfx in facts.AOTRITON_EXPERIMENTAL:
            if info.env.get(facts.AOTRITON_ENV) == "1":
                checks.append(Check("aotriton", CheckStatus.INFO, f"{gfx} is experimental in AOTriton; enabled by "
                                    f"{facts.AOTRITON_ENV}=1"))
            else:
                checks.append(Check("aotriton", CheckStatus.WARN, f"{gfx} is experimental in AOTriton: torch refuses its SDPA "
                                    "flash/mem-efficient kernels and falls back to math", f"export {facts.AOTRITON_ENV}=1"))
        else:
            checks.append(Check("aotriton", CheckStatus.WARN, f"AOTriton has no kernels for {gfx}: torch SDPA runs the math "
                                "fallback (O(S^2) memory, slow)", None))
    return checks


def native_bf16(platform: Platform) -> bool | None:
    """Hardware bf16 (not torch.cuda.is_bf16_supported(), which counts emulation): sm80+ / CDNA2+."""
    if platform.vendor == "nvidia":
        return None if platform.capability is None else not bf16_reasons(platform.vendor, platform.capability)
    if platform.vendor == "amd":
        return None if not platform.gfx else platform.gfx in facts.BF16_NATIVE_GFX
    return None


def check_precision(info: EnvInfo, policy) -> list[Check]:
    """Native dtypes here, against the dtype ``policy`` (:func:`portvlm.policy.resolve_policy`) runs in."""
    p, t = info.platform, info.torch
    dtype = policy.dtype if policy is not None else None
    if p.vendor == "nvidia" and p.capability:
        bf16 = native_bf16(p)
        bf16_text = (f"bf16 native ({sm_name(p.capability)})" if bf16 else
                     f"bf16 emulated only ({sm_name(p.capability)} < sm80; torch.cuda.is_bf16_supported() still says True)")
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
    status = CheckStatus.OK
    fix = None
    if dtype == "bfloat16" and bf16 is False:
        status, fix = CheckStatus.WARN, "run with torch_dtype=torch.float16 (or float32); bf16 is emulated here"
        text += f"; the applied policy ({policy.arch.id}) prefers bfloat16"
    if dtype:
        text += f" → policy dtype {dtype}"
    return [Check("precision", status, text, fix)]


def check_transformers(info: EnvInfo, matrix, arch=None) -> list[Check]:
    version = parse_or_none(info.transformers.version)
    if version is None:
        newest = _newest_stack_transformers(matrix)
        return [Check("transformers", CheckStatus.FAIL, info.transformers.error or "transformers not installed",
                      f"pip install 'transformers=={newest}'" if newest else "pip install transformers")]
    checks = []
    stacks = [parse_or_none(s.transformers) for s in (matrix.stacks if matrix is not None else ())]
    stacks = sorted(v for v in stacks if v is not None)
    if stacks and version < stacks[0]:
        checks.append(Check("transformers", CheckStatus.FAIL,
                            f"transformers {version} is older than every stack portvlm tests (oldest {stacks[0]})",
                            f"pip install 'transformers=={stacks[-1]}' (or any tested version >= {stacks[0]})"))
        return checks
    verified = _verified_range()
    if verified is not None and not verified[0].contains(version, prereleases=True):
        allowed = info.env.get(ALLOW_UNVERIFIED_ENV) == "1"
        newest = newest_verified([s.transformers for s in (matrix.stacks if matrix is not None else ())])
        if arch is not None and matrix is not None and arch.stacks:  # the newest verified version tested on this arch
            newest = newest_verified([matrix.stack(s).transformers for s in arch.stacks]) or newest
        checks.append(Check(
            "transformers", CheckStatus.WARN if allowed else CheckStatus.FAIL,
            f"transformers {version} is outside the range portvlm's shims were verified on ({verified[1]})"
            + ("; allowed by PORTVLM_ALLOW_UNVERIFIED=1" if allowed else ": portvlm.patch refuses it"),
            None if allowed else (f"pip install 'transformers=={newest}'" if newest else None)
            + " (or export PORTVLM_ALLOW_UNVERIFIED=1 to try it unverified)"))
        return checks
    checks.append(Check("transformers", CheckStatus.OK, f"transformers {version}"))
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


def check_xformers(info: EnvInfo, policy) -> list[Check]:
    x, p = info.xformers, info.platform
    if x.version is None:
        return [Check("xformers", CheckStatus.INFO, "xformers not installed (portvlm does not need it)")]
    installed = base_version(info.torch.version)
    wanted = facts.xformers_for_torch(info.torch.version) if installed else None
    index = torch_variant_of(info)
    pip = (f"pip install 'xformers=={wanted}'" + (f" --index-url {torch_index(index)}"
           if index and index != "cpu" else "")) if wanted else "pip uninstall -y xformers"
    uses_xformers = policy is not None and "xformers_blockdiag" in policy.vision_backends
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
        status = CheckStatus.FAIL if uses_xformers and x.extension_loaded is not True else CheckStatus.WARN
        checks.append(Check("xformers", status, what, pip))
    elif x.error:
        checks.append(Check("xformers", CheckStatus.WARN, f"xformers {x.version} installed but unusable: {x.error}", pip))
    if p.vendor == "nvidia" and p.capability and p.capability < (7, 5):
        v = parse_or_none(x.version)
        if v is not None and v > parse(facts.XFORMERS_LAST_SM70):
            checks.append(Check("xformers", CheckStatus.WARN, f"xformers {x.version} wheels carry no {sm_name(p.capability)} "
                                f"kernels (0.0.31 dropped V100; last with sm70: {facts.XFORMERS_LAST_SM70} for torch 2.7.0)",
                                f"pip install 'xformers=={facts.XFORMERS_LAST_SM70}' with torch 2.7.0 (cu118/cu126)"))
    if not checks:
        usable = [o.name for o in x.ops if not xformers_op_reasons(o, p, None)]
        checks.append(Check("xformers", CheckStatus.OK, f"xformers {x.version} (built for torch {x.built_for_torch or '?'}); "
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
        reasons.append(f"needs {sm_name(op.min_capability)}+, found {sm_name(platform.capability)}")
    if dtype and op.dtypes and dtype not in op.dtypes:
        reasons.append(f"needs dtype {'/'.join(op.dtypes)}, found {dtype}")
    if dtype == "bfloat16" and bf16_reasons(platform.vendor, platform.capability):
        reasons.append("bf16 needs sm80+ (torch's mem-efficient kernel: fp16/fp32 only below sm80)")
    return reasons


def check_flash_attn(info: EnvInfo) -> list[Check]:
    f, p = info.flash_attn, info.platform
    if f.version is None:
        return [Check("flash_attn", CheckStatus.INFO, "flash-attn not installed (portvlm does not need it)")]
    unusable = None
    if p.vendor == "nvidia" and p.capability and p.capability < facts.FLASH_ATTN_MIN_CAPABILITY:
        unusable = f"flash-attn needs sm80+ (Ampere), found {sm_name(p.capability)} ({p.name})"
    elif p.vendor == "amd" and p.gfx not in facts.FLASH_ATTN_CK_GFX and info.env.get(
            facts.FLASH_ATTN_TRITON_AMD_ENV) != "TRUE":
        unusable = f"flash-attn's CK backend supports {', '.join(facts.FLASH_ATTN_CK_GFX)}, found {p.gfx}"
    elif p.vendor == "cpu":
        unusable = "flash-attn has no CPU kernels"
    if unusable and p.vendor != "cpu":
        return [Check("flash_attn", CheckStatus.WARN,
                      f"flash-attn {f.version} is installed but cannot run here: {unusable}. Libraries that find the "
                      "package route to it anyway and fail with 'FlashAttention only supports Ampere GPUs or newer', "
                      f"even with eager attention requested ({facts.FLASH_ATTN_SM70_ISSUES})",
                      "pip uninstall -y flash-attn")]
    if f.importable is False:
        return [Check("flash_attn", CheckStatus.WARN, f"flash-attn {f.version} is installed but does not import: {f.error}",
                      "pip uninstall -y flash-attn (or reinstall it built for this torch)")]
    if unusable:
        return [Check("flash_attn", CheckStatus.INFO, f"flash-attn {f.version} installed; {unusable}")]
    return [Check("flash_attn", CheckStatus.OK, f"flash-attn {f.version} installed and usable on {device_arch(p)} "
                  "(portvlm itself never calls it)")]


def check_gpu(info: EnvInfo) -> list[Check]:
    p = info.platform
    if not p.is_gpu:
        why = "; ".join(info.gpu_reasons[:6]) or "no GPU probe found a device"
        return [Check("gpu", CheckStatus.INFO, f"no GPU ({why})")]
    memory = f", {p.memory_mib / 1024:.0f} GiB" if p.memory_mib else ""
    more = f" (+{p.count - 1} more)" if p.count > 1 else ""
    via = f"via {p.source}" + ("; a CUDA context was created" if p.source == "torch" else "")
    return [Check("gpu", CheckStatus.OK, f"{p.name} ({device_arch(p)}{memory}){more}, {via}")]


def check_hub_kernels(info: EnvInfo, policy) -> list[Check]:
    """Whether ``from_pretrained`` will load Hub kernels here (transformers 5.25+ does by default), whether it will
    raise for want of the ``kernels`` package, and whether the arch policy lets kernelized layers run."""
    from portvlm.shims.hub_kernels import ENV, default_load

    h, tf = info.hub_kernels, info.transformers.version
    if tf is None or h.required is None:
        return []  # this transformers loads no Hub kernels unless asked (use_kernels=True): nothing to say
    load = default_load(h.required, h.kernels, info.env)
    if not load.kernelizes:
        return [Check("hub_kernels", CheckStatus.OK, f"{ENV}={info.env.get(ENV)}: from_pretrained loads no Hub "
                      f"kernels (transformers {tf} would by default)")]
    if load.raises:
        return [Check("hub_kernels", CheckStatus.FAIL,
                      f"from_pretrained will raise 'Kernels are not available': transformers {tf} {load.raises}",
                      f"export {ENV}=0 (portvlm needs no Hub kernels), or pip install '{load.pin}'")]
    arch = policy.arch if policy is not None else None
    reason = getattr(arch, "no_hub_kernels", None)
    loads = (f"from_pretrained kernelizes layers with code fetched from the Hub (transformers {tf}, kernels "
             f"{h.kernels}; offline it needs the Hub cache)")
    if reason:
        return [Check("hub_kernels", CheckStatus.WARN,
                      f"{loads}; the {arch.id} policy keeps them off: portvlm.patch puts transformers' own forward "
                      f"back and its report lists the layers ({reason})",
                      f"export {ENV}=0 to not fetch them at all")]
    where = f"the {arch.id} policy allows them" if arch is not None else "no arch policy applies"
    return [Check("hub_kernels", CheckStatus.INFO,
                  f"{loads}; {where}; portvlm.patch's report lists the kernelized layers")]
