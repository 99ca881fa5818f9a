"""Attention backends declared as data, and the one function that turns declarations into reasons.

Importable without torch: declarations and selection are pure; feature probes import torch (and xformers,
triton) lazily, only when a reason is asked for. The kernels live in ``portvlm.backends.kernels``.

Every backend computes block-diagonal attention over packed ``[S, H, D]`` segments in ONE call
(``varlen_attention``). Names never contain "flash": portvlm never calls the flash-attn package for a
backend that is not flash, and ``torch_varlen`` reaches FlashAttention-2 only through torch's own op.

Platform emulation
------------------
``Platform.emulating`` marks a record that carries an arch's *policy* while the process runs on other
hardware (``portvlm.platform.emulated(arch, host)``: an sm70 policy run on an H100). Two questions, two answers:

* dtype and capability rules (``min_capability``, ``dtypes_below_sm80``, ``gfx``, vendors) are judged against
  the record, i.e. the emulated arch: bf16 is refused for an sm70 policy even on an H100;
* kernel availability (the ``needs`` probes: does this torch build have the op, does it carry kernels for the
  device, does xformers have an operator for this input, can Triton compile for it) is judged against the
  real device the kernels will run on, never the emulated record.

``rules_view`` / ``kernel_capability`` are the two helpers that make that split explicit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from portvlm.errors import UnsupportedError
from portvlm.platform import Platform, bf16_reasons, sm_name

__all__ = [
    "Backend",
    "Selection",
    "BACKENDS",
    "PROBES",
    "backend_reasons",
    "select",
    "default_priority",
    "register_backend",
    "get_backend",
    "rules_view",
    "kernel_capability",
    "normalize_dtype",
    "varlen_attention",
    "block_diagonal_mask",
    "max_seqlen",
]

ALL_DTYPES = ("float32", "float16", "bfloat16")
# Volta/Turing have no bf16 units (torch.cuda.is_bf16_supported() says True there through emulation: gate on
# capability >= 8.0 instead). torch's mem-efficient kernel accepts only fp16/fp32 below sm80 (sdp_utils.cpp).
BELOW_SM80_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class Backend:
    """One attention implementation and the limits it declares (judged by ``backend_reasons``)."""

    name: str
    devices: tuple[str, ...]  # torch device types: "cpu", "cuda" (ROCm is "cuda")
    vendors: tuple[str, ...] = ("cpu", "nvidia", "amd")
    min_capability: tuple[int, int] | None = None  # NVIDIA compute capability
    gfx: tuple[str, ...] | None = None  # AMD targets the kernels support; None = any
    dtypes: tuple[str, ...] = ALL_DTYPES
    dtypes_below_sm80: tuple[str, ...] = BELOW_SM80_DTYPES  # NVIDIA capability < 8.0
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    has_backward: bool = True
    needs: tuple[str, ...] = ()  # feature probes, names in PROBES
    is_flash: bool = False  # reaches FlashAttention kernels (through torch); never the flash-attn package
    note: str = ""
    impl: Callable | None = field(default=None, compare=False, repr=False)  # registered (test) backends only

    def __post_init__(self):
        if "flash" in self.name.lower():
            raise ValueError(f"backend names must not contain 'flash' (got {self.name!r}): portvlm never names a non-flash path after flash")


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            name="eager",
            devices=("cpu", "cuda"),
            needs=("torch",),
            note="matmul + float block mask + fp32 softmax; the oracle-grade path, O(S^2) memory",
        ),
        Backend(
            name="sdpa_masked",
            devices=("cpu", "cuda"),
            needs=("torch", "sdpa"),
            note="one F.scaled_dot_product_attention over [1,H,S,D] with a bool block-diagonal mask, O(S^2) mask",
        ),
        Backend(
            name="efficient_varlen",
            devices=("cuda",),
            vendors=("nvidia", "amd"),
            # sdp_utils.cpp: mem-efficient runs on [sm50, sm121]; ROCm through AOTriton on gfx90a/gfx942 (never
            # in AOTriton's experimental list), gfx950 experimental.
            min_capability=(5, 0),
            gfx=("gfx90a", "gfx942"),
            max_head_dim=512,
            head_dim_multiple=8,
            needs=("torch", "efficient_attention_op", "device_kernels"),
            note="aten._efficient_attention_forward/backward with cu_seqlens: the sm70 / ROCm varlen path",
        ),
        Backend(
            name="xformers_blockdiag",
            devices=("cuda",),
            vendors=("nvidia", "amd"),
            min_capability=(5, 0),
            needs=("torch", "device_kernels", "xformers_op"),
            note="xformers.ops.memory_efficient_attention with BlockDiagonalMask on [1,S,H,D]",
        ),
        Backend(
            name="torch_varlen",
            devices=("cuda",),
            vendors=("nvidia",),  # RFC pytorch#171814: FA2 only, "A100 GPU or newer"; ROCm not stated
            min_capability=(8, 0),
            dtypes=("float16", "bfloat16"),
            max_head_dim=256,
            needs=("torch", "device_kernels", "torch_varlen_attn"),
            is_flash=True,
            note="torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside torch)",
        ),
        Backend(
            name="flex_document",
            devices=("cuda",),
            vendors=("nvidia", "amd"),
            # Triton's README: "Compute Capability 8.0+" officially (torch accepts 7.0, V100 flex measured ~10x
            # slower than SDPA; xformers disables its Triton kernels below 8.0).
            min_capability=(8, 0),
            gfx=("gfx90a", "gfx942"),
            max_head_dim=256,
            needs=("torch", "device_kernels", "flex_attention", "triton"),
            note="flex_attention with a document block mask built from segment ids (Triton)",
        ),
    )
}


@dataclass(frozen=True)
class Selection:
    """The chosen backend and, for every other candidate, why it was not chosen."""

    name: str
    lost: dict[str, list[str]] = field(default_factory=dict)


def normalize_dtype(dtype) -> str:
    """``torch.float16`` / ``"fp16"`` / ``"half"`` -> ``"float16"``."""
    text = str(dtype).removeprefix("torch.")
    return {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}.get(text, text)


def _describe(platform: Platform) -> str:
    if platform.vendor == "nvidia" and platform.capability is not None:
        arch = sm_name(platform.capability)
    elif platform.gfx:
        arch = platform.gfx
    else:
        arch = platform.arch_id or platform.device
    base = f"{arch} ({platform.name})"
    return f"{base}, emulating {platform.emulating}" if platform.emulating else base


def rules_view(platform: Platform) -> Platform:
    """The record dtype/capability rules are judged against: the platform as given (the emulated arch's policy)."""
    return platform


def kernel_capability(platform: Platform) -> tuple[tuple[int, int] | None, str | None]:
    """``(capability, gfx)`` kernel probes are judged against: the real device when emulating, else the record's."""
    if not platform.emulating:
        return platform.capability, platform.gfx
    import torch  # the real device: emulation only changes policy, kernels still run here

    if not torch.cuda.is_available():
        return None, None
    props = torch.cuda.get_device_properties(0)
    gfx = getattr(props, "gcnArchName", None) if getattr(torch.version, "hip", None) else None
    return torch.cuda.get_device_capability(0), (gfx.split(":")[0] if gfx else None)


# --------------------------------------------------------------------------------------------------------------
# Feature probes: (platform, dtype, head_dim) -> reason or None. Lazy imports; cached per argument tuple.
# --------------------------------------------------------------------------------------------------------------


def _probe_torch(platform, dtype, head_dim):
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"needs torch, found none ({exc})"
    return None


@dataclass(frozen=True)
class TorchFeature:
    """An attention op a torch build may lack: what it is, how to tell from the torch module, its doctor record key."""

    what: str
    check: Callable  # (torch, import_module) -> bool: present
    record: str  # key in the doctor's TorchInfo.features (portvlm/data/doctor.schema.json)


# The one declaration of each torch feature: the live probes here and the doctor (which records them with
# ``check`` and judges the record with ``torch_feature_reason``) read it.
TORCH_FEATURES: dict[str, TorchFeature] = {
    "sdpa": TorchFeature(
        "F.scaled_dot_product_attention (torch >= 2.0)",
        lambda torch, imp: hasattr(torch.nn.functional, "scaled_dot_product_attention"), "sdpa"),
    "efficient_attention_op": TorchFeature(
        "torch.ops.aten._efficient_attention_forward/backward",
        lambda torch, imp: all(hasattr(torch.ops.aten, n)
                               for n in ("_efficient_attention_forward", "_efficient_attention_backward")),
        "efficient_attention_op"),
    "torch_varlen_attn": TorchFeature(
        "torch.nn.attention.varlen.varlen_attn (torch >= 2.10)",
        lambda torch, imp: hasattr(imp("torch.nn.attention.varlen"), "varlen_attn"), "varlen_attn"),
    "flex_attention": TorchFeature(
        "torch.nn.attention.flex_attention (torch >= 2.5)",
        lambda torch, imp: hasattr(imp("torch.nn.attention.flex_attention"), "flex_attention")
        and hasattr(imp("torch.nn.attention.flex_attention"), "create_block_mask"), "flex_attention"),
}


def torch_feature_present(name: str, torch, import_module=None) -> bool:
    """Whether the torch module has feature ``name`` (a missing submodule or a failing import is "absent")."""
    import importlib

    try:
        return bool(TORCH_FEATURES[name].check(torch, import_module or importlib.import_module))
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - ImportError, AttributeError, a broken extension: all "absent"
        return False


def torch_feature_reason(name: str, present: bool | None, torch_version: str | None) -> str | None:
    """The reason for a missing feature, the same words wherever it is judged (live here, or from the doctor's record)."""
    return None if present else f"needs {TORCH_FEATURES[name].what}, not in torch {torch_version}"


def _probe_feature(name: str, platform, dtype, head_dim):
    import torch

    return torch_feature_reason(name, torch_feature_present(name, torch), torch.__version__)


def _probe_device_kernels(platform, dtype, head_dim):
    """The installed torch build carries kernels for the device they will run on (judged on the real device)."""
    import torch

    from portvlm.platform import kernel_image_reasons, torch_arch_list

    capability, gfx = kernel_capability(platform)
    if capability is None and gfx is None:
        return f"needs a CUDA/ROCm device to run kernels on, found none (torch {torch.__version__})"
    archs = tuple(platform.torch_archs) or torch_arch_list(torch)
    if not archs:
        return f"needs a CUDA/ROCm torch build, found torch {torch.__version__} without device kernels"
    why = kernel_image_reasons(archs, capability, gfx)
    return f"needs device kernels: {'; '.join(why)}" if why else None


def _probe_triton(platform, dtype, head_dim):
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs triton (flex_attention compiles Triton kernels), found none"
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return None
    return None if has_triton() else "needs a device Triton supports (torch.utils._triton.has_triton() is False here)"


def _probe_xformers(platform, dtype, head_dim):
    """xformers imports AND its dispatcher finds a forward (and backward) operator for this input."""
    try:
        import xformers.ops as xops
        from xformers.ops.fmha import BlockDiagonalMask
        from xformers.ops.fmha.dispatch import _dispatch_bw, _dispatch_fw
    except Exception as exc:  # ImportError, or a C-extension/ABI error: both mean "not usable here"
        return f"needs xformers with fmha, import failed ({type(exc).__name__}: {str(exc)[:120]})"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA/ROCm device for xformers fmha (no CPU operator since xformers 0.0.22)"
    try:
        t = torch.zeros(1, 4, 2, head_dim, device="cuda", dtype=getattr(torch, dtype))
        inp = xops.fmha.Inputs(query=t, key=t, value=t, attn_bias=BlockDiagonalMask.from_seqlens([2, 2]))
        _dispatch_fw(inp, False)
        _dispatch_bw(inp)
    except NotImplementedError as exc:
        return "needs an xformers operator for this input: " + " ".join(str(exc).split())[:300]
    except Exception as exc:
        return f"needs a working xformers operator, probe failed ({type(exc).__name__}: {str(exc)[:160]})"
    return None


PROBES: dict[str, Callable[[Platform, str, int], str | None]] = {
    "torch": _probe_torch,
    **{name: functools.partial(_probe_feature, name) for name in TORCH_FEATURES},
    "device_kernels": _probe_device_kernels,
    "triton": _probe_triton,
    "xformers_op": _probe_xformers,
}


@functools.lru_cache(maxsize=256)
def run_probe(need: str, platform: Platform, dtype: str, head_dim: int) -> str | None:
    """Run one feature probe; a probe that raises becomes a reason, never an exception."""
    probe = PROBES.get(need)
    if probe is None:
        return f"needs {need!r}, an unknown feature probe"
    if need != "torch" and _probe_torch(platform, dtype, head_dim):
        return _probe_torch(platform, dtype, head_dim)
    try:
        return probe(platform, dtype, head_dim)
    except Exception as exc:
        return f"needs {need}, probe raised {type(exc).__name__}: {str(exc)[:160]}"


ProbeFn = Callable[[str, Platform, str, int], "str | None"]


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

_REGISTERED: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The declaration of ``name`` (registered test backends first)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BACKENDS:
        return BACKENDS[name]
    raise KeyError(f"unknown attention backend {name!r}; known: {', '.join(all_backends())}")


def all_backends() -> tuple[str, ...]:
    """Names of every declared and registered backend."""
    return tuple(BACKENDS) + tuple(n for n in _REGISTERED if n not in BACKENDS)


@contextlib.contextmanager
def register_backend(backend: Backend, impl: Callable | None = None) -> Iterator[Backend]:
    """Add ``backend`` (with ``impl(q, k, v, cu_seqlens, max_seqlen, scale, causal)``) for the block; removed after.

    Used by the suites' negative controls (deliberately broken backends: mask dropped, layout swapped, wrong
    scale) to prove the checks catch them. A registered name shadows a built-in one until the block ends.
    """
    if impl is not None:
        backend = Backend(**{**{f: getattr(backend, f) for f in backend.__dataclass_fields__}, "impl": impl})
    previous = _REGISTERED.get(backend.name)
    _REGISTERED[backend.name] = backend
    try:
        yield backend
    finally:
        if previous is None:
            _REGISTERED.pop(backend.name, None)
        else:
            _REGISTERED[backend.name] = previous


# --------------------------------------------------------------------------------------------------------------
# Reasons and selection
# --------------------------------------------------------------------------------------------------------------


def backend_reasons(
    name: str,
    platform: Platform,
    dtype,
    head_dim: int,
    need_backward: bool = False,
    *,
    probe: ProbeFn | None = None,
) -> list[str]:
    """Why ``name`` cannot run here (empty = usable). ``probe`` replaces the feature probes (tests fake machines)."""
    try:
        b = get_backend(name)
    except KeyError as exc:
        return [str(exc.args[0])]
    dtype = normalize_dtype(dtype)
    rules = rules_view(platform)
    where = _describe(rules)
    reasons: list[str] = []
    if rules.device not in b.devices:
        reasons.append(f"needs device {' or '.join(b.devices)}, found {rules.device} ({rules.name})")
    elif rules.device != "cpu":
        if rules.vendor not in b.vendors:
            reasons.append(f"needs vendor {' or '.join(b.vendors)}, found {rules.vendor} ({rules.name})")
        elif rules.vendor == "nvidia" and b.min_capability is not None:
            if rules.capability is None:
                reasons.append(f"needs sm{b.min_capability[0]}{b.min_capability[1]}+, found unknown capability ({rules.name})")
            elif tuple(rules.capability) < b.min_capability:
                reasons.append(f"needs sm{b.min_capability[0]}{b.min_capability[1]}+, found {where}")
        elif rules.vendor == "amd" and b.gfx is not None and (rules.gfx or "").split(":")[0] not in b.gfx:
            reasons.append(f"needs gfx {' or '.join(b.gfx)}, found {rules.gfx or 'unknown gfx'} ({rules.name})")
    if dtype not in b.dtypes:
        reasons.append(f"needs dtype {' or '.join(b.dtypes)}, found {dtype}")
    elif (
        bf16_reasons(rules.vendor, rules.capability)  # also on a CPU host emulating sm70: the policy is the arch's
        and dtype not in b.dtypes_below_sm80
    ):
        reasons.append(f"{dtype} needs sm80+ (below sm80: {' or '.join(b.dtypes_below_sm80)}), found {where}")
    if b.max_head_dim is not None and head_dim > b.max_head_dim:
        reasons.append(f"needs head_dim <= {b.max_head_dim}, found {head_dim}")
    if head_dim % b.head_dim_multiple:
        reasons.append(f"needs head_dim divisible by {b.head_dim_multiple}, found {head_dim}")
    if need_backward and not b.has_backward:
        reasons.append("needs a backward pass, this backend is forward-only")
    if reasons or not b.needs:
        return reasons  # probes (imports, device allocations) only when the declarations allow the backend
    run = probe or run_probe
    for need in b.needs:
        why = run(need, platform, dtype, head_dim)
        if why:
            reasons.append(why)
    return reasons


def default_priority(platform: Platform) -> tuple[str, ...]:
    """Preferred order per arch: flash varlen on sm80+, mem-efficient varlen on sm70 / ROCm, masked SDPA on CPU."""
    if platform.device == "cpu":
        return ("sdpa_masked", "eager")
    if platform.vendor == "amd":  # AOTriton / CK through torch's mem-efficient op first; xformers' CK next
        return ("efficient_varlen", "xformers_blockdiag", "flex_document", "sdpa_masked", "eager")
    return ("torch_varlen", "efficient_varlen", "xformers_blockdiag", "flex_document", "sdpa_masked", "eager")


def select(
    priority: Iterable[str] | None,
    platform: Platform,
    dtype,
    head_dim: int,
    need_backward: bool = False,
    *,
    probe: ProbeFn | None = None,
) -> Selection:
    """First usable backend of ``priority`` (``None``: ``default_priority``); every other candidate says why it lost."""
    names = tuple(priority) if priority is not None else default_priority(platform)
    lost: dict[str, list[str]] = {}
    winner = None
    for name in names:
        if winner is not None:
            why = backend_reasons(name, platform, dtype, head_dim, need_backward, probe=probe)
            lost[name] = why or [f"usable, ranked below {winner}"]
            continue
        why = backend_reasons(name, platform, dtype, head_dim, need_backward, probe=probe)
        if why:
            lost[name] = why
        else:
            winner = name
    if winner is None:
        lines = "\n".join(f"     {n}: {'; '.join(r)}" for n, r in lost.items()) or "     (no candidates given)"
        direction = "forward+backward" if need_backward else "forward"
        raise UnsupportedError(
            f"No attention backend found for dtype={normalize_dtype(dtype)}, head_dim={head_dim}, {direction} "
            f"on {_describe(platform)}; supported backends: {', '.join(all_backends())}. Candidates and why each lost:\n{lines}"
        )
    return Selection(winner, lost)


def __getattr__(name: str):
    # Lazy: the kernels import torch only when attention actually runs.
    if name in ("varlen_attention", "block_diagonal_mask", "max_seqlen", "sync_count", "reset_sync_count"):
        from portvlm.backends import kernels

        return getattr(kernels, name)
    raise AttributeError(f"module 'portvlm.backends' has no attribute {name!r}")
