#!/usr/bin/env bash
# Everything a lent GPU should run for issue 3, in one device call (see benchmarks/RESULTS.md).
#
# On the build machine first (the device reaches no registry; fla-core needs only torch, triton, einops):
#     pip download fla-core==0.6.0 --no-deps -d benchmarks/wheels
# then, through the device tool:
#     run(command="bash benchmarks/gpu_session.sh", carry=["benchmarks/wheels"], timeout_s=540)
# Writes logs and JSON under $OUT (benchmarks/out/gpu without one); prints a short summary last.
set -u
OUT=${OUT:-benchmarks/out/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/steps.txt"; }

step env
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1

step install  # cl_arch without its deps (the image has torch, triton, einops, safetensors); FLA from the wheel
$PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || echo "cl_arch install failed"
if ls benchmarks/wheels/fla_core-*.whl > /dev/null 2>&1; then
  $PY -m pip install --no-deps benchmarks/wheels/fla_core-*.whl >> "$OUT/install.log" 2>&1 || echo "fla-core install failed"
fi

step ceilings
timeout 120 $PY benchmarks/ceilings.py --out "$OUT/ceilings.json" > "$OUT/ceilings.txt" 2>&1

step tests  # compiled kernels against the naive reference, incl. the GPU-only shapes; one config per kernel
CL_ARCH_TRITON_AUTOTUNE=0 timeout 240 $PY -m pytest -q -x tests/test_triton_kernels.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/tests.txt"

CEIL=""
[ -s "$OUT/ceilings.json" ] && CEIL="--ceilings $OUT/ceilings.json"
step bench-trace
TRITON_PRINT_AUTOTUNING=1 timeout 240 $PY benchmarks/bench_kernels.py $CEIL --out "$OUT/bench_trace.json" \
  > "$OUT/bench_trace.txt" 2>&1
step bench-notrace
timeout 150 $PY benchmarks/bench_kernels.py --no-trace $CEIL --out "$OUT/bench_notrace.json" \
  > "$OUT/bench_notrace.txt" 2>&1
step done

echo; cat "$OUT/env.txt"; cat "$OUT/ceilings.txt"
tail -n 4 "$OUT/tests.txt"
grep -v -e "^Triton autotuning" -e "^best config" "$OUT/bench_trace.txt" | tail -n 20
grep -e "x FLA" -e "triton_chunk" "$OUT/bench_notrace.txt" | tail -n 10
