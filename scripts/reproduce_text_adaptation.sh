#!/usr/bin/env bash
# The figures of issue 12 (README, "Does it get better as it reads?"), on the shipped default model.
# Settings are chosen on the held-out stdlib package asyncio, which is never a reported stream;
# json, email and xml are reported. Run from the repository root after `pip install -e .`.
set -euo pipefail
OUT=${OUT:-runs/issue12}
T="--threads 1"
# 1. commit settings (lam, eta_s) and dynamic evaluation's step size, tuned on asyncio (30 KB)
for lam in 0.5 1.0; do for eta in 0.3 1.0 3.0; do
  cl-arch eval codebase --package asyncio --max-bytes 30000 --no-dynamic-eval --lam $lam --eta-s $eta \
    --out $OUT/tune --report-name commit-lam$lam-eta$eta $T
done; done
for lr in 3e-5 1e-4 3e-4 1e-3; do
  cl-arch eval codebase --package asyncio --max-bytes 30000 --dyn-lr $lr --out $OUT/tune --report-name dyn-$lr $T
done
# 2. reported streams with the chosen settings (LAM, ETA, DYN set from step 1)
LAM=${LAM:-1.0}; ETA=${ETA:-1.0}; DYN=${DYN:-1e-4}
for pkg in json email xml; do
  cl-arch eval codebase --package $pkg --max-bytes 100000 --lam $LAM --eta-s $ETA --dyn-lr $DYN --second-session \
    --out $OUT --report-name codebase-$pkg $T
  cl-arch eval codebase --package $pkg --max-bytes 100000 --lam $LAM --eta-s $ETA --no-dynamic-eval --no-readout \
    --out $OUT --report-name codebase-$pkg-no-readout $T
done
# 3. loss by offset within held-out files, fast state reset every attention window vs not
cl-arch eval offset --package json,email,xml --out $OUT --report-name offset $T
