"""The build context of an image (Dockerfile, lock, wheelhouse/, dist/, extra-ca/) and the build itself."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from portvlm.containers.engine import NO_ENGINE, Engine, EngineMissing, _inspect, _stream
from portvlm.containers.spec import OUT_DIR, REPO_ROOT, ImageSpec
from portvlm.wheels import find_links_dirs, uv_bin


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
    # No --index-url: pip reads the user's own configuration (pip.conf, PIP_INDEX_URL) like any `pip download`.
    cmd += ["--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none", "-r", str(lock), "-d", str(dest), "-q"]
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
    proc = subprocess.run([uv_bin(), "build", "--wheel", "-q", "--out-dir", str(dist), str(REPO_ROOT)], capture_output=True, text=True)
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


def _git_revision() -> str:
    from portvlm.versions import source_revision

    return source_revision() or "unknown"
