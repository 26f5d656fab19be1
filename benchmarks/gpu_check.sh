#!/usr/bin/env bash
# Everything a GPU machine should check, in one go, within a time budget (GPU_CHECK_BUDGET,
# default 480 s, the 8 minutes of ../shared/DESIGN.md): build with CUDA kernels, the CUDA
# tests, compute-sanitizer (memcheck + racecheck) over a small program that runs every CUDA
# kernel, the benchmarks on the GPU (one run per family or part of one, so a slow or failing
# part keeps the others' figures), and a summary table. Each step gets at most what is left of
# the budget; a step that fails, times out or finds no time left is reported in the summary,
# never fatal.
# OUTDIR/summary.md is rewritten after every step, so even a run killed from outside leaves the
# steps that finished.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# OUTDIR gets at most 8 files: summary.md, build.log, tests.log, sanitizer.log (memcheck, then
# racecheck), bench.txt, bench.json, ratios.png (the chart of the table) and profile.txt (the
# per-kernel CUDA times of benchmarks/gpu_profile.py); the device tool brings back at most 8.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-480}
SUMMARY="$OUT/summary.md"
WORK=$(mktemp -d)
ROWS="$WORK/rows"
: >"$ROWS"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - $1 ))s; }
# Seconds a step may take: its own maximum, or what is left of the budget less 10 s for the
# summary, whichever is smaller (0 or less: no time left).
allow() {
  local left=$(( BUDGET - ($(date +%s) - t0) - 10 ))
  echo $(( left < $1 ? left : $1 ))
}
verdict() {  # exit status -> ok / FAILED / TIMED OUT
  case $1 in 0) echo ok ;; 124 | 137) echo "TIMED OUT" ;; *) echo FAILED ;; esac
}

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: ${gpu:-none}"

torch_version=$($PY -c 'import torch; print(torch.__version__)' 2>/dev/null)
write_summary() {
  {
    echo "# pyssl GPU check, $(date -u +%Y-%m-%d)"
    echo
    echo "GPU: ${gpu:-none}; torch ${torch_version:-unknown};" \
      "commit $(git describe --always --dirty 2>/dev/null || echo unknown); total $(elapsed $t0)"
    echo
    echo "| step | result | detail |"
    echo "|---|---|---|"
    cat "$ROWS"
    if [ -s "$WORK/table.md" ]; then
      echo
      cat "$WORK/table.md"
    fi
  } >"$SUMMARY"
}
status() { echo "| $1 | $2 | $3 |" >>"$ROWS"; write_summary; }
no_time() { status "$1" skipped "no time left in the ${BUDGET} s budget"; }

# 1. Build (CUDA kernels for the GPU present; fails loudly if nvcc or a CUDA torch is missing).
s=$(date +%s)
arch=$($PY -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')" 2>/dev/null || echo 90)
t=$(allow 240)
if [ "$t" -le 0 ]; then
  no_time build
else
  PYSSL_WITH_CUDA=ON PYSSL_CUDA_ARCHS="$arch" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    timeout -k 10 "$t" $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
  rc=$?
  status build "$(verdict $rc)" "sm_$arch, $(elapsed $s)$([ $rc = 0 ] || echo ', see build.log')"
  [ $rc = 0 ] || tail -40 "$OUT/build.log"
fi
$PY -m pyssl info 2>&1 | tee -a "$OUT/build.log"

# 2. The CUDA tests (the CPU tests run in CI), and the build test that every op has a CUDA kernel.
# Without a visible GPU or without CUDA kernels every test would be skipped and pytest would
# pass: that is a failure here.
s=$(date +%s)
t=$(allow 150)
if [ "$t" -le 0 ]; then
  no_time "CUDA tests"
elif ! $PY -c "import torch, pyssl, sys; sys.exit(0 if torch.cuda.is_available() and pyssl.has_cuda_kernels() else 1)" \
    >"$OUT/tests.log" 2>&1; then
  status "CUDA tests" FAILED "no CUDA device visible to torch, or pyssl built without CUDA kernels"
else
  cuda_tests() {  # cuda_tests SECONDS [pytest args]: appends to tests.log
    local secs=$1
    shift
    timeout -k 10 "$secs" $PY -m pytest tests/ops tests/losses tests/test_build.py \
      -m "cuda or gpu_check" -q -p no:cacheprovider --no-header -rfE "$@" >>"$OUT/tests.log" 2>&1
  }
  cuda_tests "$t"
  rc=$?
  # A crash (a signal: rc > 128 other than timeout's 137) ends pytest at the crashing test. Run
  # the tests again under pytest-xdist where it is installed: a crashed worker fails only its
  # test, and the log then holds every test's result.
  t=$(allow 150)
  if [ $rc -gt 128 ] && [ $rc != 137 ] && [ "$t" -gt 0 ] && $PY -c "import xdist" 2>/dev/null; then
    echo "=== pytest crashed (rc=$rc); again with pytest-xdist (-n 4) ===" >>"$OUT/tests.log"
    cuda_tests "$t" -n 4
    rc2=$?
  fi
  line=$(grep -E "passed|failed|error" "$OUT/tests.log" | tail -1)
  [ -n "${rc2:-}" ] && line="crashed (rc=$rc); under xdist (rc=$rc2): ${line:-no summary}"
  status "CUDA tests (-m 'cuda or gpu_check')" "$(verdict $rc)" "${line:-rc=$rc}, $(elapsed $s)"
fi

# 3. compute-sanitizer over a small program that runs every CUDA kernel. Without torch's caching
# allocator each tensor is its own allocation, so memcheck sees reads past a tensor's end.
san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
: >"$OUT/sanitizer.log"
for tool in memcheck racecheck; do
  s=$(date +%s)
  t=$(allow 90)
  if [ -z "$san" ]; then
    status "compute-sanitizer $tool" skipped "not installed"
  elif [ "$t" -le 0 ]; then
    no_time "compute-sanitizer $tool"
  else
    small=""
    [ $tool = racecheck ] && small=1
    PYSSL_SMOKE_SMALL=$small PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$t" "$san" \
      --tool $tool --error-exitcode 3 --print-limit 50 \
      $PY benchmarks/cuda_smoke.py >"$WORK/$tool.log" 2>&1
    rc=$?
    { echo "=== compute-sanitizer --tool $tool (rc=$rc) ==="; cat "$WORK/$tool.log"; } >>"$OUT/sanitizer.log"
    errs=$(grep -Eo "ERROR SUMMARY: [0-9]+[^)]*" "$WORK/$tool.log" | tail -1)
    if grep -q "Device not supported" "$WORK/$tool.log"; then
      status "compute-sanitizer $tool" skipped "the sanitizer refuses this device (a gVisor machine?)"
    else
      status "compute-sanitizer $tool" "$(verdict $rc)" "${errs:-rc=$rc}, $(elapsed $s)"
    fi
  fi
done

# 4. Benchmarks on the GPU, one run per part: a family, or a pytest -k selection of one. A run
# killed midway keeps no figures (pytest-benchmark writes its JSON at the end), so the flow
# family (over half of the benchmarks) runs in three parts. Each part gets a share of the time
# left in proportion to its weight, its number of benchmarks on a GPU (the `pytest
# --collect-only` counts, checked by tests/test_benchmark_report.py) plus 10 for the start of a
# process (torch, CUDA); unused time passes on to the parts after it.
s=$(date +%s)
parts=(
  "masking||24"
  "dino_loss||48"
  "projection||13"
  "flow|test_warp and not bwd and not channels_last|36"
  "flow|test_warp and bwd and not channels_last|36"
  "flow|channels_last or dense_loss|36"
)
: >"$OUT/bench.txt"
done_fams=()
for i in "${!parts[@]}"; do
  IFS='|' read -r f sel w <<<"${parts[$i]}"
  left_w=0
  for e in "${parts[@]:$i}"; do left_w=$(( left_w + ${e##*|} + 10 )); done
  name="$f${sel:+ ($sel)}"
  t=$(allow 600)
  t=$(( t * (w + 10) / left_w ))
  if [ "$t" -lt 20 ]; then  # a part killed midway keeps no figures
    no_time "benchmarks $name"
    continue
  fi
  fs=$(date +%s)
  timeout -k 10 "$t" $PY -m benchmarks.run "$f" ${sel:+-k "$sel"} --device cuda \
    --json "$WORK/bench_$i.json" --max-time 0.1 >>"$OUT/bench.txt" 2>&1
  rc=$?
  [ -s "$WORK/bench_$i.json" ] && done_fams+=("$WORK/bench_$i.json")
  status "benchmarks $name" "$(verdict $rc)" "bench.txt, $(elapsed $fs)"
done
if [ ${#done_fams[@]} -gt 0 ]; then
  $PY -m benchmarks.report "${done_fams[@]}" --merged "$OUT/bench.json" --plot "$OUT/ratios.png" >"$WORK/table.md" 2>>"$OUT/bench.txt"
  # the open issues' goals, read off the same figures (benchmarks/goals.py)
  { echo; echo "## Goals"; echo; $PY -m benchmarks.goals "$OUT/bench.json"; } >>"$WORK/table.md" 2>>"$OUT/bench.txt"
fi

# 5. Where the time goes: per-kernel CUDA times of the configurations whose goals are not met
# (benchmarks/gpu_profile.py), for the next optimisation; last, so it never costs the figures.
s=$(date +%s)
t=$(allow 90)
if [ "$t" -lt 20 ]; then
  no_time "kernel profile"
else
  timeout -k 10 "$t" $PY -m benchmarks.gpu_profile >"$OUT/profile.txt" 2>&1
  rc=$?
  status "kernel profile" "$(verdict $rc)" "profile.txt, $(elapsed $s)"
fi

# 6. Summary.
write_summary
rm -rf "$WORK"
cat "$SUMMARY"
