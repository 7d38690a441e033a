#!/usr/bin/env bash
# Reproduces the shipped default model (cl_arch/assets/default_model): about 55 minutes on one CPU thread.
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 cl-arch pretrain --config configs/default_model.yaml --no-progress
mkdir -p cl_arch/assets/default_model
cp runs/default_model/final/model.safetensors runs/default_model/final/config.json cl_arch/assets/default_model/
python - <<'PY'
import json
res = json.load(open("runs/default_model/results.json"))
keep = {k: res[k] for k in ("steps", "final_val_bpb", "seconds", "tokens", "tokens_per_s", "stopped") if k in res}
keep["command"] = "cl-arch pretrain --config configs/default_model.yaml"
json.dump(keep, open("cl_arch/assets/default_model/pretrain.json", "w"), indent=1)
print(keep)
PY
