#!/usr/bin/env bash
# Reproduces the shipped default model (cl_arch/assets/default_model): about 55 minutes of pretraining on one CPU
# thread, then about 5 minutes learning the episodic memory's settings (step 2).
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
# Step 2: add the episodic memory and learn its four settings on training spans, every other weight frozen.
# --carry fresh: the shipped memory learned from first sessions only; adding the carried-P situations (the
# command's default) measured the same on asyncio (second session +0.018 vs +0.015 at 10 KB, drift 0.027 vs 0.024).
OMP_NUM_THREADS=1 cl-arch train-episodic --init-from runs/default_model/final --output-dir runs/default_model/episodic \
    --steps 80 --features 2048 --heads 1 --seed 0 --carry fresh --no-progress
cp runs/default_model/episodic/model.safetensors runs/default_model/episodic/config.json cl_arch/assets/default_model/
python - <<'PY'
import json
r = json.load(open("runs/default_model/episodic/episodic.json"))
keep = {k: r[k] for k in ("config", "base_bpb_on_spans", "final_gain_last10", "learned", "seconds")}
keep["history_every_10"] = r["history"][::10] + [r["history"][-1]]
keep["command"] = ("OMP_NUM_THREADS=1 cl-arch train-episodic --init-from runs/default_model/final --steps 80 "
                   "--features 2048 --heads 1 --seed 0 --carry fresh")
keep["threads"] = 1
json.dump(keep, open("cl_arch/assets/default_model/episodic.json", "w"), indent=1)
print(keep["learned"])
PY
