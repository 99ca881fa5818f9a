#!/usr/bin/env bash
# Make this (Debian/Ubuntu, root) machine able to build and run portvlm's images with podman.
# Idempotent: every step checks first and is skipped when already done.
#
#   1. apt: podman, debootstrap, runc
#   2. /etc/containers/containers.conf: runtime runc + ulimits inside the host's hard limits
#      (crun 1.8 refuses cgroup-v1 hybrid hosts; podman's rootful default nofile=1048576 cannot be set
#      without CAP_SYS_RESOURCE when the hard limit is lower: "setrlimit RLIMIT_NOFILE: Operation not permitted")
#   3. the CPU image's base, localhost/debian-base:bookworm, from `debootstrap --variant=minbase`
#      (no registry is needed; pinned by suite, not by digest: see containers/cpu/Dockerfile)
#
# Environment: DEBIAN_MIRROR (default: the mirror apt's own sources use for $SUITE; none there is an error),
#              BASE_IMAGE (default localhost/debian-base:bookworm), SUITE (default bookworm).
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-localhost/debian-base:bookworm}"
SUITE="${SUITE:-bookworm}"

log() { printf 'bootstrap-podman: %s\n' "$*" >&2; }

# The first enabled `deb` mirror apt's own sources use for suite $1 (one-line .list and deb822 .sources files):
# this machine's mirror, a company one included. Prints nothing when apt has none.
apt_mirror() {
  local suite="$1" f
  {
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      awk -v s="$suite" '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                                      if ($(i + 1) == s) print $i }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
        { uri = ""; deb = 0; hit = 0; off = 0
          for (k = 1; k <= NF; k++) {
            line = $k
            if (line ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", line); split(line, u, /[ \t]+/); uri = u[1] }
            else if (line ~ /^Suites:/) { n = split(line, w, /[ \t]+/); for (j = 2; j <= n; j++) if (w[j] == s) hit = 1 }
            else if (line ~ /^Types:/ && line ~ /[ \t]deb([ \t]|$)/) deb = 1
            else if (line ~ /^Enabled:[ \t]*no/) off = 1
          }
          if (deb && hit && !off && uri != "") print uri }' "$f"
    done
  } | head -n1 || true
}

if [ "$(id -u)" -ne 0 ]; then
  log "needs root (apt-get, /etc/containers, podman import)"; exit 2
fi

# 1. packages
missing=()
for bin in podman debootstrap runc; do command -v "$bin" >/dev/null 2>&1 || missing+=("$bin"); done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -q
  # with recommends: podman's network stack (netavark/CNI plugins) comes in as recommends
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman debootstrap runc >/dev/null
else
  log "podman, debootstrap, runc present"
fi

# 2. containers.conf: keep an existing file that already selects runc; never overwrite a foreign one.
conf=/etc/containers/containers.conf
hard_nofile="$(ulimit -Hn)"; hard_nproc="$(ulimit -Hu)"; pid_max="$(cat /proc/sys/kernel/pid_max)"
nofile="$hard_nofile"; [ "$nofile" = unlimited ] && nofile=1048576
nproc="$hard_nproc"; { [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; } && nproc="$pid_max"
if [ -f "$conf" ] && grep -q 'runtime *= *"runc"' "$conf"; then
  log "$conf already selects runc"
elif [ -f "$conf" ]; then
  log "$conf exists and does not select runc: left alone (portvlm passes --runtime runc and --ulimit itself)"
else
  mkdir -p /etc/containers
  cat > "$conf" <<CONF
# written by portvlm scripts/bootstrap-podman.sh
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "runc"
CONF
  log "wrote $conf (nofile=$nofile nproc=$nproc runtime=runc)"
fi

# 3. base image
if podman image exists "$BASE_IMAGE"; then
  log "$BASE_IMAGE present"
else
  mirror="${DEBIAN_MIRROR:-$(apt_mirror "$SUITE")}"
  if [ -z "$mirror" ]; then
    log "no Debian mirror for '$SUITE' in apt's sources (/etc/apt/sources.list, /etc/apt/sources.list.d/*.list|*.sources)"
    log "fix: export DEBIAN_MIRROR=<your Debian mirror URL> (the one apt uses on a $SUITE machine), then rerun"
    exit 2
  fi
  rootfs="$(mktemp -d /tmp/portvlm-rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs"' EXIT
  log "debootstrap --variant=minbase $SUITE from $mirror (about 30 s)"
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >/dev/null
  tar -C "$rootfs" -c . | podman import --message "debootstrap --variant=minbase $SUITE $mirror" - "$BASE_IMAGE" >/dev/null
  log "imported $BASE_IMAGE"
fi
podman --version >&2
