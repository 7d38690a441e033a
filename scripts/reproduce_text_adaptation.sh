#!/usr/bin/env bash
# The figures of issue 12 (docs/results/reading.md, "Does it get better as it reads?") on the shipped default model.
# Settings are chosen on the held-out stdlib package asyncio, which is never a reported stream;
# json, email and xml are reported. Run from the repository root after `pip install -e .`.
set -euo pipefail
O=${OUT:-runs/issue12}
T="--threads 1"
# 1. tuning on asyncio (30 KB): the readout state commit against carrying S (committing both heads instead of the
#    slow one: load the model, set model.config.readout_commit_span = 0, and run codebase.run from Python) and
#    dynamic evaluation's step size x decay for all weights and for W0 only (cached per model)
cl-arch eval codebase --package asyncio --max-bytes 30000 --methods frozen,adapt,no_persist --no-dynamic-eval \
  --second-session --out $O/tune --report-name state-commit $T
for params in all fast_W0; do
  cl-arch eval tune-dynamic --package asyncio --max-bytes 30000 --dyn-params $params --out $O/tune $T
done
# 2. commits trained on text (plasticity settings through differentiable commits, 12 minutes)
cl-arch finetune --config configs/default_model_commits.yaml
# 3. reported streams: every row, dynamic evaluation with the asyncio sweep's settings, a second session
for pkg in json email xml; do
  cl-arch eval codebase --package $pkg --max-bytes 100000 \
    --methods static,frozen,adapt,adapt+reward,no_persist,full_context,sparse_dynamic_eval,dynamic_eval \
    --dyn-tuned --second-session --out $O --report-name codebase-$pkg $T
  cl-arch eval codebase --package $pkg --max-bytes 100000 --model runs/default_model_commits/final --eta-s model \
    --methods frozen,adapt,no_persist --no-dynamic-eval --second-session --out $O --report-name codebase-$pkg-commits $T
  cl-arch eval codebase --package $pkg --max-bytes 100000 --no-readout --methods static,frozen,adapt,no_persist \
    --no-dynamic-eval --out $O --report-name codebase-$pkg-no-readout $T
done
# 4. loss by offset within held-out files, fast state reset every attention window vs not
cl-arch eval offset --package json,email,xml --out $O --report-name offset $T
cl-arch eval offset --package json,email,xml --no-readout --out $O --report-name offset-no-readout $T
