"""The container engine (docker with a reachable daemon, or podman) and the flags this host needs."""

from __future__ import annotations

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

from portvlm.containers.spec import ImageSpec

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


def find_engine(prefer: str | None = None, *, which=shutil.which, run=subprocess.run) -> Engine | None:
    """docker with a reachable daemon, else podman; ``prefer`` (or $PORTVLM_ENGINE) picks one. None if neither.

    ``which`` / ``run``: how the host is asked (``shutil.which``, ``subprocess.run``); tests pass fakes.
    """
    prefer = prefer or os.environ.get("PORTVLM_ENGINE") or None
    order = [prefer] if prefer else ["docker", "podman"]
    for name in order:
        exe = which(name)
        if exe is None:
            continue
        if name == "docker":
            try:
                ok = run([exe, "info"], capture_output=True, timeout=15).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                return Engine("docker", exe)
        elif name == "podman":
            return Engine("podman", exe, _host_podman_flags())
    return None


def gpu_run_flags(engine: Engine, vendor: str) -> tuple[str, ...]:
    return GPU_RUN_FLAGS.get(vendor, {}).get(engine.name, ())


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
