"""Which images exist: one ``ImageSpec`` per containerised stack of matrix.yaml, plus the CPU image (pure)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from portvlm.matrix.schema import Matrix, Stack

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = "containers"
# The platform every image runs on; manylinux_2_28 = glibc 2.28+ (bookworm 2.36, jammy 2.35, noble 2.39).
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
# Images whose base lacks the stack's Python get one from uv (python-build-standalone), copied from uv's image.
UV_IMAGE = "ghcr.io/astral-sh/uv:0.13.9"
USER, UID = "portvlm", 10001

# The CPU image: not in matrix.yaml (the cpu arch runs on the host); one image carries ONE transformers,
# so it takes the newest CPU stack it can install as pinned (``cpu_stack``) and labels the cells it serves. Its
# base is made locally with `debootstrap --variant=minbase bookworm` + `podman import`
# (scripts/bootstrap-podman.sh): no registry needed.
CPU_SLUG = "cpu"
CPU_IMAGE = "portvlm/cpu-torch2.13.0"
CPU_BASE = "localhost/debian-base:bookworm"

# Default Python of each base distro, i.e. what `apt-get install python3` gives. Other Pythons come from uv.
DISTRO_PYTHON = {"debian12": "3.11", "ubuntu22.04": "3.10", "ubuntu24.04": "3.12"}
# Extra constraints a torch range needs that its wheel metadata does not declare.
# torch < 2.4 was built against NumPy 1.x and fails to import its C extension under NumPy 2
# ("A module that was compiled using NumPy 1.x cannot be run in NumPy 2.0"; pytorch issue #107302 line).
TORCH_CONSTRAINTS = (("<2.4", ("numpy<2",)),)


def cpu_stack(matrix: Matrix) -> Stack:
    """The CPU image's stack: the newest CI CPU stack of ``matrix`` (by transformers) with no declared override, as
    an image installs the stack's pins as they are (an override, e.g. cpu-tf5.25.0 leaving out ``kernels``, is
    the host venv's ``uv --excludes``, which the image's lock does not carry)."""
    from portvlm.versions import parse

    stacks = [s for s in matrix.ci_cpu_stacks() if not s.overrides]
    if not stacks:
        raise ValueError("matrix.yaml has no CI CPU stack without overrides for the CPU image to carry")
    return max(stacks, key=lambda s: parse(s.transformers))


@dataclass(frozen=True)
class ImageSpec:
    """One image: the stack it carries, the archs it serves and the matrix cells it runs."""

    slug: str  # directory under containers/, e.g. "sm70-cu118-torch2.3.1"
    stack: Stack
    arch_ids: tuple[str, ...]
    cells: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        return f"{self.stack.image}:tf{self.stack.transformers}"

    @property
    def is_gpu(self) -> bool:
        return self.stack.torch_variant != "cpu"


def image_specs(matrix: Matrix) -> tuple[ImageSpec, ...]:
    """Every containerised stack of ``matrix`` (those with ``image`` and ``base_image``), then the CPU image."""
    from portvlm.matrix import expand

    cells = expand(matrix)

    def spec(stack: Stack, slug: str, runtime: str) -> ImageSpec:
        archs = tuple(a.id for a in matrix.archs if stack.id in a.stacks and a.runtime == runtime)
        ids = tuple(c.id for c in cells if c.stack.id == stack.id and c.arch.id in archs and c.expected != "excluded")
        return ImageSpec(slug=slug, stack=stack, arch_ids=archs, cells=ids)

    specs = [spec(s, s.image.rsplit("/", 1)[-1], "container") for s in matrix.stacks if s.image and s.base_image]
    cpu = dataclasses.replace(cpu_stack(matrix), image=CPU_IMAGE, base_image=CPU_BASE)
    specs.append(spec(cpu, CPU_SLUG, "host"))
    return tuple(specs)


def find_spec(matrix: Matrix, name: str) -> ImageSpec:
    """An image by slug, stack id or image name (with or without tag)."""
    for spec in image_specs(matrix):
        if name in (spec.slug, spec.stack.id, spec.stack.image, spec.tag):
            return spec
    known = ", ".join(s.slug for s in image_specs(matrix))
    raise KeyError(f"unknown image {name!r}; known: {known}")
