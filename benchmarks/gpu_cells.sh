#!/usr/bin/env bash
# GPU evidence in one command, on a CUDA host whose python3 already has torch (the lent H100: torch 2.11+cu130,
# transformers 5.17, no flash-attn, no xformers). Other transformers versions come from wheels in .whl/<tag>/
# (carried; see docs/gpu.md), installed into per-version target dirs — nothing is downloaded.
#
#   bash benchmarks/gpu_cells.sh            # doctor, then sm90 cells (hardware) and sm70-policy cells (emulated)
#   bash benchmarks/gpu_cells.sh STACK...   # only these stacks (ids from matrix.yaml)
#
# Results land in $OUT/results.tgz (unpack into results/); logs and doctor output beside it.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RES=$(mktemp -d)
export PYTHONUNBUFFERED=1 PORTVLM_LOGS="$RES/logs"

site() {  # site TAG: install .whl/TAG/*.whl into /tmp/site-TAG (offline), print the dir
  local dir=/tmp/site-$1
  [ -d "$dir" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$dir" .whl/"$1"/*.whl >&2
  echo "$dir"
}
ONLY="$*"
BASE=$(site base)  # jsonschema & co: the matrix loader needs them, the GPU image lacks them

run() {  # run TF_TAG ARCH STACK: one arch × stack for every model, with that transformers on the path
  local tf=$1 arch=$2 stack=$3 path="$BASE:$ROOT"
  [ -n "$ONLY" ] && [[ " $ONLY " != *" $stack "* ]] && return 0
  [ "$tf" != "installed" ] && path="$(site "$tf"):$path"
  PYTHONPATH="$path" timeout 900 python3 -m portvlm.cli run --arch "$arch" --stack "$stack" \
    --python python3 --results "$RES/results" --timeout 300 2>&1 | tee -a "$OUT/cells.log"
}

{
  nvidia-smi -L
  PYTHONPATH="$BASE:$ROOT" python3 -m portvlm.cli doctor --no-color
} > "$OUT/doctor.txt" 2>&1
PYTHONPATH="$BASE:$ROOT" python3 -m portvlm.cli doctor --json > "$OUT/doctor.json" 2>/dev/null

run installed sm90 cu130-torch2.11.0-tf5.17.0
run tf4.57.6 sm90 cu130-torch2.11.0-tf4.57.6
run tf4.50.3 sm70 volta-cu118-torch2.3.1-tf4.50.3
run tf4.57.6 sm70 volta-cu118-torch2.7.0-tf4.57.6
run tf5.24.0 sm70 volta-cu126-torch2.14.1-tf5.24.0

tar -C "$RES" -czf "$OUT/results.tgz" results logs
grep -E "^\[|→" "$OUT/cells.log" | tail -40
