#!/usr/bin/env bash
# The figures of issue 12 (README, "Does it get better as it reads?") on the shipped default model.
# Settings are chosen on the held-out stdlib package asyncio, which is never a reported stream;
# json, email and xml are reported. Run from the repository root after `pip install -e .`.
set -euo pipefail
O=${OUT:-runs/issue12}
T="--threads 1"
# 1. tuning on asyncio (30 KB): commit settings of the adapting row, and dynamic evaluation's step
for lam in 0.5 1.0; do for eta in 0.01 0.03 0.1 0.3; do
  cl-arch eval codebase --package asyncio --max-bytes 30000 --no-dynamic-eval --lam $lam --eta-s $eta \
    --out $O/tune --report-name commit-lam$lam-eta$eta $T
done; done
for lr in 3e-5 1e-4 3e-4 1e-3; do
  cl-arch eval codebase --package asyncio --max-bytes 30000 --methods frozen --dyn-lr $lr --out $O/tune --report-name dyn-$lr $T
done
# 2. commits trained on text (plasticity settings through differentiable commits, 12 minutes)
cl-arch finetune --config configs/default_model_commits.yaml
# 3. reported streams (the best asyncio settings: lam 0.5, eta_s 0.03, dynamic evaluation lr 1e-4)
for pkg in json email xml; do
  cl-arch eval codebase --package $pkg --max-bytes 100000 --methods static,frozen,adapt,no_persist --lam 0.5 \
    --eta-s 0.03 --dyn-lr 1e-4 --second-session --out $O --report-name codebase-$pkg $T
  cl-arch eval codebase --package $pkg --max-bytes 100000 --model runs/default_model_commits/final --eta-s model \
    --methods frozen,adapt,no_persist --no-dynamic-eval --second-session --out $O --report-name codebase-$pkg-commits $T
  cl-arch eval codebase --package $pkg --max-bytes 100000 --no-readout --methods static,frozen,adapt,no_persist \
    --lam 0.5 --eta-s 0.03 --no-dynamic-eval --out $O --report-name codebase-$pkg-no-readout $T
done
# 4. loss by offset within held-out files, fast state reset every attention window vs not
cl-arch eval offset --package json,email,xml --out $O --report-name offset $T
cl-arch eval offset --package json,email,xml --no-readout --out $O --report-name offset-no-readout $T
