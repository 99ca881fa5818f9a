"""Dockerfile + requirements.in of each image, rendered from its stack (pure: same inputs, same bytes).

The one Dockerfile template is ``Dockerfile.j2`` beside this file. One stage: the wheelhouse, portvlm's wheel and
proxy CAs are bind-mounted into the steps that need them (RUN --mount: BuildKit or podman/buildah), so none of them
lands in a layer, and a cached rebuild does not re-copy a multi-GB venv between stages.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from importlib import resources

from portvlm.containers.spec import (
    DISTRO_PYTHON,
    PYTHON_PLATFORM,
    TORCH_CONSTRAINTS,
    UID,
    USER,
    UV_IMAGE,
    ImageSpec,
    image_specs,
)
from portvlm.matrix.schema import Matrix, Stack
from portvlm.wheels import CELL_REQUIREMENTS
from portvlm.wheels import torch_index as _torch_index


def base_distro(base_image: str) -> str:
    """'ubuntu22.04' / 'ubuntu24.04' / 'debian12' from a base image reference (tags name their distro)."""
    m = re.search(r"ubuntu-?(\d\d\.\d\d)", base_image)
    if m:
        return f"ubuntu{m.group(1)}"
    if "bookworm" in base_image:
        return "debian12"
    raise ValueError(f"cannot tell the distro of base image {base_image!r}: name ubuntuXX.YY or bookworm in its tag")


def base_image_reasons(base_image: str) -> list[str]:
    """Why ``base_image`` is not a pinned reference (empty = pinned by tag or digest)."""
    if "@sha256:" in base_image:
        return []
    name, _, tag = base_image.rpartition(":")
    if not name or "/" in tag:
        return [f"{base_image}: no tag; pin an exact version tag or a digest"]
    if tag in ("latest", "stable", "edge", "devel", "runtime"):
        return [f"{base_image}: floating tag {tag!r}; pin an exact version tag or a digest"]
    return []


def python_source(stack: Stack) -> str:
    """'system' when the base's distro Python is the stack's, else 'uv' (a standalone build)."""
    return "system" if DISTRO_PYTHON.get(base_distro(stack.base_image)) == stack.python else "uv"


def torch_index(stack: Stack) -> str:
    """PyTorch's published index for the stack's variant (committed files never carry a local mirror)."""
    return _torch_index(stack.torch_variant, environ={})


def index_pins(stack: Stack) -> tuple[str, ...]:
    """Requirements installed from the torch index by version (GPU stacks: the lock cannot hash them here)."""
    if stack.torch_variant == "cpu":
        return ()
    pins = [f"torch=={stack.torch}+{stack.torch_variant}"]
    if stack.xformers:
        # xformers' PyPI wheels are built for PyPI torch's default CUDA; the per-variant builds live on
        # the torch index next to torch (xformers README: `pip install xformers --index-url .../cu118`).
        pins.append(f"xformers=={stack.xformers}")
    return tuple(pins)


def requirements_in(spec: ImageSpec) -> str:
    """The resolver's input for ``spec``'s lock: deterministic, rendered from the stack."""
    from portvlm.shims.versions import specifier

    stack = spec.stack
    lines = [
        f"# Inputs of requirements.lock for {spec.tag} (stack {stack.id}); rendered from matrix.yaml by",
        "# `portvlm containers render`: do not edit.",
    ]
    if not spec.is_gpu:
        lines.append(f"torch=={stack.torch}+cpu")
    else:
        lines.append(f"# from {torch_index(stack)} (not resolved with the rest): {', '.join(index_pins(stack))}")
    lines.append(f"transformers=={stack.transformers}")
    for spec_text, extra in TORCH_CONSTRAINTS:
        if specifier(spec_text).contains(stack.torch):
            lines.extend(f"{req}  # torch {spec_text}" for req in extra)
    lines.extend(CELL_REQUIREMENTS)
    return "\n".join(lines) + "\n"


def inputs_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def labels(spec: ImageSpec) -> dict[str, str]:
    from portvlm import __version__

    stack = spec.stack
    desc = f"portvlm on torch {stack.torch}+{stack.torch_variant}, transformers {stack.transformers}"
    if stack.xformers:
        desc += f", xformers {stack.xformers}"
    return {
        "org.opencontainers.image.title": stack.image,
        "org.opencontainers.image.description": f"{desc} (archs: {', '.join(spec.arch_ids)})",
        "org.opencontainers.image.version": __version__,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.base.name": stack.base_image,
        "io.portvlm.stack": stack.id,
        "io.portvlm.archs": ",".join(spec.arch_ids),
        "io.portvlm.cells": ",".join(spec.cells),
    }


def render(stack: Stack, arch_ids: Sequence[str], *, cells: Sequence[str] = (), slug: str | None = None) -> str:
    """The Dockerfile text for ``stack`` (pure: same inputs, same bytes)."""
    import jinja2

    if not (stack.image and stack.base_image):
        raise ValueError(f"stack {stack.id} has no image/base_image: not containerised")
    reasons = base_image_reasons(stack.base_image)
    if reasons:
        raise ValueError("; ".join(reasons))
    spec = ImageSpec(slug or stack.image.rsplit("/", 1)[-1], stack, tuple(arch_ids), tuple(cells))
    distro = base_distro(stack.base_image)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    template = resources.files("portvlm.containers").joinpath("Dockerfile.j2").read_text()
    text = env.from_string(template).render(
        spec=spec,
        stack=stack,
        distro=distro,
        python_source=python_source(stack),
        py_abi="cp" + stack.python.replace(".", ""),
        labels=labels(spec),
        index_pins=index_pins(stack),
        torch_index=torch_index(stack),
        uv_image=UV_IMAGE,
        user=USER,
        uid=UID,
        platform=PYTHON_PLATFORM,
    )
    return re.sub(r"\n{3,}", "\n\n", text)


def render_spec(spec: ImageSpec) -> str:
    return render(spec.stack, spec.arch_ids, cells=spec.cells, slug=spec.slug)


def rendered_files(matrix: Matrix) -> dict[str, str]:
    """``{relative path: text}`` of every file `render` owns (the lock is resolved separately)."""
    files = {}
    for spec in image_specs(matrix):
        files[f"{spec.slug}/Dockerfile"] = render_spec(spec)
        files[f"{spec.slug}/requirements.in"] = requirements_in(spec)
    return files
