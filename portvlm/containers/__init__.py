# ruff: noqa: F401 - the package's public names, re-exported from its modules
"""Stack images: Dockerfiles rendered from matrix.yaml (pure), their locks, and a thin container-engine layer.

matrix.yaml → ImageSpec (one per stack with ``image`` + ``base_image``, plus the CPU image) → render() →
``containers/<slug>/{Dockerfile,requirements.in,requirements.lock}`` (committed; a golden test keeps them in
step with matrix.yaml) → build() with the engine found (docker with a reachable daemon, or podman).

Build context (assembled by ``portvlm containers build``, or by hand from a Dockerfile's header):
``Dockerfile``, ``requirements.lock``, ``wheelhouse/`` (the lock's wheels, downloaded on the host so the
build installs them offline), ``dist/`` (portvlm's wheel), ``extra-ca/`` (optional proxy CA certificates).
"""

from __future__ import annotations

from portvlm.containers.cli import main
from portvlm.containers.context import (
    BuildRecord,
    build,
    lock_hashes,
    pip_platforms,
    stage_context,
    state_dir,
    wheelhouse,
    wheelhouse_reasons,
)
from portvlm.containers.engine import (
    GPU_RUN_FLAGS,
    NO_ENGINE,
    Engine,
    EngineMissing,
    container_reasons,
    find_engine,
    gpu_run_flags,
    image_present,
    podman_flags,
    pull,
    run_in,
)
from portvlm.containers.lint import hadolint_bin, lint
from portvlm.containers.lock import index_reachable, lock_header, lock_inputs_digest, write_lock
from portvlm.containers.render import (
    base_distro,
    base_image_reasons,
    index_pins,
    inputs_digest,
    labels,
    python_source,
    render,
    render_spec,
    rendered_files,
    requirements_in,
    torch_index,
)
from portvlm.containers.spec import (
    CPU_BASE,
    CPU_IMAGE,
    CPU_SLUG,
    DISTRO_PYTHON,
    OUT_DIR,
    PYTHON_PLATFORM,
    REPO_ROOT,
    TORCH_CONSTRAINTS,
    UID,
    USER,
    UV_IMAGE,
    ImageSpec,
    cpu_stack,
    find_spec,
    image_specs,
)
from portvlm.containers.tree import drift, render_all

__all__ = [name for name in dir() if not name.startswith("_") and name != "annotations"]
