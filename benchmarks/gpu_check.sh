#!/usr/bin/env bash
# Everything a GPU machine should check, in one go (< 8 minutes on an H100/H200; each step has a
# timeout, and a step that fails or times out is reported in the summary, not fatal):
#   build with CUDA kernels, CUDA tests, compute-sanitizer (memcheck + racecheck) over a small
#   CUDA program, the benchmarks on the GPU, and a summary table (OUTDIR/summary.md, printed last).
#
#   bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.md"
t0=$(date +%s)
status() { echo "| $1 | $2 | $3 |" >>"$SUMMARY.rows"; }
elapsed() { echo $(( $(date +%s) - $1 ))s; }
: >"$SUMMARY.rows"

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: ${gpu:-none}"

# 1. Build (CUDA kernels for the GPU present; fail loudly if nvcc or a CUDA torch is missing).
s=$(date +%s)
arch=$($PY -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')" 2>/dev/null || echo 90)
if PYSSL_WITH_CUDA=ON PYSSL_CUDA_ARCHS="$arch" $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  status build ok "sm_$arch, $(elapsed $s)"
else
  status build FAILED "see build.log"
  tail -40 "$OUT/build.log"
fi
$PY -m pyssl info 2>&1 | tee -a "$OUT/build.log"

# 2. The CUDA tests (the CPU tests run in CI).
s=$(date +%s)
timeout 180 $PY -m pytest tests/ops tests/losses -m cuda -q -p no:cacheprovider --no-header -rfE \
  >"$OUT/tests.log" 2>&1
rc=$?
line=$(grep -E "passed|failed|error" "$OUT/tests.log" | tail -1)
status "CUDA tests (-m cuda)" "$([ $rc = 0 ] && echo ok || echo FAILED)" "${line:-rc=$rc}, $(elapsed $s)"

# 3. compute-sanitizer over a small program that runs every CUDA kernel.
# racecheck only looks at shared memory: the kernels that use it are in these two families.
for tool in memcheck racecheck; do
  s=$(date +%s)
  fams=""
  [ $tool = racecheck ] && fams="masking,dino_loss"
  if command -v compute-sanitizer >/dev/null; then
    timeout 120 compute-sanitizer --tool $tool --error-exitcode 3 $PY benchmarks/cuda_smoke.py $fams \
      >>"$OUT/sanitizer.log" 2>&1
    rc=$?
    errs=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$OUT/sanitizer.log" | tail -1)
    status "compute-sanitizer $tool" "$([ $rc = 0 ] && echo ok || echo FAILED)" "${errs:-rc=$rc}, $(elapsed $s)"
  else
    status "compute-sanitizer $tool" skipped "not installed"
  fi
done

# 4. Benchmarks on the GPU.
s=$(date +%s)
timeout 270 $PY -m benchmarks.run --device cuda --json "$OUT/bench.json" --max-time 0.1 \
  >"$OUT/bench.txt" 2>&1
rc=$?
status benchmarks "$([ $rc = 0 ] && echo ok || echo FAILED)" "bench.txt, $(elapsed $s)"

# 5. Summary.
{
  echo "# pyssl GPU check, $(date -u +%Y-%m-%d)"
  echo
  echo "GPU: ${gpu:-none}; torch $($PY -c 'import torch; print(torch.__version__)' 2>/dev/null); total $(elapsed $t0)"
  echo
  echo "| step | result | detail |"
  echo "|---|---|---|"
  cat "$SUMMARY.rows"
  echo
  sed -n '/^machine:/,$p' "$OUT/bench.txt"
} >"$SUMMARY"
rm -f "$SUMMARY.rows"
cat "$SUMMARY"
