"""The frozen records matrix.yaml turns into. Pure data: no torch, no I/O.

matrix.yaml → Matrix(archs, stacks, models, expectations) → expand() → tuple[Cell, ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field

VENDORS = ("cpu", "nvidia", "amd")
RUNTIMES = ("host", "container")
DTYPES = ("float32", "float16", "bfloat16")
OUTCOMES = ("pass", "xfail", "excluded")
# Vision/text attention backends portvlm knows (portvlm.backends declares their limits).
# None of them contains "flash": transformers 5.x routes such names to its flash path.
BACKENDS = ("eager", "sdpa_masked", "efficient_varlen", "xformers_blockdiag", "torch_varlen", "flex_document")


@dataclass(frozen=True)
class Arch:
    """A GPU (or CPU) architecture and the policy portvlm applies on it."""

    id: str  # "cpu", "sm70", "sm80", "sm90", "gfx90a", "gfx942"
    vendor: str  # one of VENDORS
    description: str
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (7, 0)
    gfx: str | None = None  # ROCm gfx target, e.g. "gfx942"
    dtypes: tuple[str, ...] = ("float32",)  # compute dtypes in order of preference; first = the policy's dtype
    vision_backends: tuple[str, ...] = ("sdpa_masked",)  # priority order
    text_backends: tuple[str, ...] = ("sdpa_masked",)
    runtime: str = "host"  # "host": a local venv; "container": the stack's image
    stacks: tuple[str, ...] = ()  # stack ids this arch is tested with
    notes: tuple[str, ...] = ()  # hardware facts written beside the policy ("Volta: no bf16")
    no_hub_kernels: str | None = None  # why this policy keeps layers off Hub kernels (kernelize); None: allowed

    @property
    def policy_dtype(self) -> str:
        return self.dtypes[0]


@dataclass(frozen=True)
class Override:
    """A dependency pin of the stack's packages that this stack's index cannot satisfy, and what is installed instead.

    Declared in matrix.yaml with its reason, applied by the env build (uv ``--excludes`` / ``--overrides``) and
    recorded in every result of the stack: never a silent substitution.
    """

    package: str  # distribution name: "kernels"
    pin: str  # the requirement upstream declares: "kernels>=0.19.1,<0.20"
    install: str  # "none" (left out of the env) or the requirement installed instead: "kernels==0.17.2"
    reason: str

    @property
    def excluded(self) -> bool:
        return self.install == "none"

    def describe(self) -> str:
        """One line for reports: ``kernels>=0.19.1,<0.20 overridden: not installed (reason)``."""
        instead = "not installed" if self.excluded else f"{self.install} installed instead"
        return f"{self.pin} overridden: {instead} ({self.reason})"


@dataclass(frozen=True)
class Stack:
    """A pinned software stack: python, torch build, transformers, optional kernels."""

    id: str
    python: str  # "3.11"
    torch: str  # "2.13.0"
    torch_variant: str  # "cpu", "cu118", "cu126", "cu130", "rocm6.4", "rocm7.2"
    transformers: str  # exact version "4.57.6"
    xformers: str | None = None
    flash_attn: str | None = None
    image: str | None = None  # container image name carrying this stack, if containerised
    base_image: str | None = None  # pinned base image the container is built FROM
    ci: bool = True  # part of the CI default selection (the CPU cells CI runs)
    notes: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()  # unsatisfiable pins this stack installs around, each with its reason


@dataclass(frozen=True)
class Model:
    """A VLM family portvlm ports, tested through a tiny random-init config."""

    id: str  # "qwen2_5vl", "qwen3vl", "llava"
    family: str  # transformers model_type: "qwen2_5_vl", "qwen3_vl", "llava"
    description: str
    min_transformers: str  # first transformers version that has the family


@dataclass(frozen=True)
class Expectation:
    """An expected outcome for the cells its selectors match, with the reason as data."""

    outcome: str  # one of OUTCOMES
    reason: str
    archs: tuple[str, ...] = ()  # empty = any
    models: tuple[str, ...] = ()
    stacks: tuple[str, ...] = ()
    transformers: str | None = None  # a PEP 440 specifier, e.g. "<4.57.1"
    line: int | None = None  # where it was declared in matrix.yaml


@dataclass(frozen=True)
class Cell:
    """One arch × stack × model combination: what a nox test session runs."""

    arch: Arch
    stack: Stack
    model: Model
    expected: str = "pass"  # one of OUTCOMES
    reason: str | None = None  # why, when expected != "pass"

    @property
    def id(self) -> str:
        return cell_id(self.arch.id, self.model.id, self.stack.id)


def cell_id(arch: str, model: str, stack: str) -> str:
    """The one spelling of a cell id; also the results file name (results/<id>.json)."""
    return f"{arch}--{model}--{stack}"


@dataclass(frozen=True)
class Matrix:
    """The whole declared matrix."""

    archs: tuple[Arch, ...]
    stacks: tuple[Stack, ...]
    models: tuple[Model, ...]
    expectations: tuple[Expectation, ...] = ()
    path: str = "matrix.yaml"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def arch(self, arch_id: str) -> Arch:
        return _by_id(self.archs, arch_id, "arch")

    def stack(self, stack_id: str) -> Stack:
        return _by_id(self.stacks, stack_id, "stack")

    def model(self, model_id: str) -> Model:
        return _by_id(self.models, model_id, "model")

    def ci_cpu_stacks(self) -> tuple[Stack, ...]:
        """The CPU stacks CI tests (``ci: true``): the torch tests' venvs and the drift lane's baselines."""
        return tuple(s for s in self.stacks if s.ci and s.torch_variant == "cpu")

    def families(self) -> tuple[str, ...]:
        """The transformers model_types of the declared models, in declaration order, once each."""
        return tuple(dict.fromkeys(m.family for m in self.models))


def _by_id(items, wanted: str, kind: str):
    for item in items:
        if item.id == wanted:
            return item
    known = ", ".join(i.id for i in items)
    raise KeyError(f"unknown {kind} {wanted!r}; known: {known}")
