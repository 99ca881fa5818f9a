#!/usr/bin/env bash
# portvlm doctor on a GPU host (the lent H100: torch 2.11+cu130, transformers 5.17, no xformers/flash-attn).
# Run from the repository root:   bash benchmarks/doctor_gpu.sh            (PYTHON=... to pick an interpreter)
# Prints the one-screen report, the --json record (validated against portvlm/data/doctor.schema.json when
# jsonschema is installed), and the --strict exit code. Writes doctor-<host>.json under ${OUT:-.}.
# The matrix loader needs jsonschema (a pyproject dependency). If the GPU venv lacks it and cannot reach PyPI,
# unpack the cp312 wheels of jsonschema + deps into .portvlm/gpu-site and run with
#   PYTHONPATH=$(pwd)/.portvlm/gpu-site bash benchmarks/doctor_gpu.sh
# (without it the report still prints, with a `matrix` WARN and no families).
set -u
PY="${PYTHON:-python}"
OUTDIR="${OUT:-.}"
mkdir -p "$OUTDIR"
JSON="$OUTDIR/doctor-$(hostname -s 2>/dev/null || echo host).json"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"

echo "== nvidia-smi -L"; nvidia-smi -L 2>&1 || echo "(nvidia-smi unavailable)"
echo "== python -m portvlm.cli doctor --no-color"
"$PY" -m portvlm.cli doctor --no-color
echo "== python -m portvlm.cli doctor --json > $JSON"
"$PY" -m portvlm.cli doctor --json > "$JSON"; echo "rc=$?"
"$PY" - "$JSON" <<'PYEOF'
import json, sys
data = json.load(open(sys.argv[1]))
try:
    import jsonschema
    jsonschema.validate(data, json.load(open("portvlm/data/doctor.schema.json")))
    print("schema: valid", data["schema"])
except ImportError:
    print("schema: jsonschema not installed; not validated", data["schema"])
p = data["environment"]["platform"]
print("platform:", p["name"], p["capability"] or p["gfx"], "arch", data["arch"], "source", p["source"])
print("torch archs:", " ".join(data["environment"]["torch"]["arch_list"]))
for f in data["families"]:
    print(f"{f['verdict']:<5} {f['model']:<10} {f['cell']} ({f['match']}) vision={f['vision']['chosen']} text={f['text']['chosen']} dtype={f['dtype']}")
PYEOF
echo "== python -m portvlm.cli doctor --strict (exit code)"
"$PY" -m portvlm.cli doctor --strict > /dev/null; echo "strict rc=$?"
