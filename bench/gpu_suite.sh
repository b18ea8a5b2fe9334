#!/usr/bin/env bash
# The GPU suite, in one device call: build mka with its CUDA kernels, run the CUDA tests
# (tests/cuda and the device-parametrized tests/ops), compute-sanitizer (memcheck, racecheck)
# on a small case of every kernel, then the side-by-side benchmark. Results (device, date,
# commit, numbers, logs) go to $OUT (device runs) or bench/results/gpu_<date>/ otherwise.
# Usage: bash bench/gpu_suite.sh [quick]   (quick: benchmark T in {2k, 8k} only)
# SANITIZE=0 skips compute-sanitizer (slow under Python), TESTS=0 the tests, AB=0 the
# interleaved forward A/B, SCAN_AB=0 the EMA scans' A/B, BENCH=0 the benchmark; PACK=1 packs the logs into logs.tgz at the end; BENCH_SEQS
# overrides the benchmark's sequence lengths (comma-separated), BENCH_IMPLS its implementations
# (comma-separated names, default all), BENCH_ROUNDS its rounds (5); TEST_DIRS the test folders;
# TEST_TIMEOUT (per test) and BENCH_TIMEOUT bound a hang.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_$(date -u +%Y%m%d_%H%M)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_suite.log"
step() { echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }

step "environment"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  nvcc --version | tail -1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  echo "cpu cores: $(nproc)"
} 2>&1 | tee -a "$LOG"

step "build (pip install --no-build-isolation)"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/gpu_build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s with $(nproc) cores" | tee -a "$LOG"
if [ $rc -ne 0 ]; then tail -40 "$OUT/gpu_build.log"; exit 1; fi
python3 -c "import mka._C as C; print(\"built_with_cuda:\", C.built_with_cuda())" 2>&1 | tee -a "$LOG"

step "CUDA tests"
# Separate runs, xdist workers: a crash (a worker dies) is reported and the rest still run.
for t in $([ "${TESTS:-1}" = 0 ] || echo ${TEST_DIRS:-tests/cuda tests/ops}); do
  [ -d "$t" ] || continue
  log="$OUT/gpu_tests_$(basename $t).log"
  # Two CPU threads per worker: the float64 references run on the CPU, and 8 workers with
  # torch's default of one thread per core oversubscribed the 16 cores (tests crawled).
  OMP_NUM_THREADS=2 python3 -m pytest "$t" -q -n 8 --timeout=${TEST_TIMEOUT:-600} -p no:cacheprovider -rf > "$log" 2>&1
  echo "pytest $t rc=$? : $(tail -1 "$log")" | tee -a "$LOG"
  grep -E "^FAILED|crashed" "$log" | head -20 | tee -a "$LOG"
done

step "native error path (bench/diagnose_native_errors.py)"
timeout 120 python3 bench/diagnose_native_errors.py > "$OUT/gpu_native_errors.log" 2>&1
grep -E "^python|^---|^raised" "$OUT/gpu_native_errors.log" | tee -a "$LOG"

step "compute-sanitizer"
[ "${SANITIZE:-1}" = 0 ] && echo "skipped (SANITIZE=0)" | tee -a "$LOG"
for tool in $([ "${SANITIZE:-1}" = 0 ] || echo memcheck racecheck); do
  timeout 300 compute-sanitizer --tool $tool --print-limit 20 python3 tests/cuda/sanitize_cases.py \
    > "$OUT/gpu_sanitize_$tool.log" 2>&1
  echo "$tool rc=$? : $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|HAZARD' "$OUT/gpu_sanitize_$tool.log" | tail -2 | tr '\n' ' ')" | tee -a "$LOG"
done

step "kernel tables (bench/gpu_profile.py: which kernels run, and where fastmka's time goes)"
for op in attention fastmka; do
  timeout 120 python3 bench/gpu_profile.py --op $op --mode $([ $op = attention ] && echo all || echo auto) \
    > "$OUT/gpu_profile_$op.txt" 2>&1
  grep -E "^---|Self CUDA time total" "$OUT/gpu_profile_$op.txt" | tee -a "$LOG"
done

step "forward A/B, interleaved rounds (bench/gpu_ab.py)"
[ "${AB:-1}" = 0 ] && echo "skipped (AB=0)" | tee -a "$LOG"
[ "${AB:-1}" = 0 ] || timeout 300 python3 bench/gpu_ab.py 2>&1 | tee "$OUT/gpu_ab.log" | tee -a "$LOG"

step "EMA scan A/B: single pass vs 3-pass, interleaved rounds (bench/gpu_scan_ab.py)"
[ "${SCAN_AB:-1}" = 0 ] && echo "skipped (SCAN_AB=0)" | tee -a "$LOG"
[ "${SCAN_AB:-1}" = 0 ] || timeout 400 python3 bench/gpu_scan_ab.py --seqs "${SCAN_AB_SEQS:-1024,2048,8192,16384}" \
  2>&1 | tee "$OUT/gpu_scan_ab.log" | tee -a "$LOG"

step "benchmark"
seqs="1024,2048,4096,8192,16384"
[ "${1:-}" = quick ] && seqs="2048,8192"
seqs="${BENCH_SEQS:-$seqs}"
if [ "${BENCH:-1}" = 0 ]; then
  echo "skipped (BENCH=0)" | tee -a "$LOG"
else
  timeout ${BENCH_TIMEOUT:-900} python3 bench/gpu_bench.py --out "$OUT/gpu_bench.json" --seqs "$seqs" \
    --impls "${BENCH_IMPLS:-}" --rounds "${BENCH_ROUNDS:-5}" > "$OUT/gpu_bench.log" 2>&1
  echo "bench rc=$?" | tee -a "$LOG"
  sed -n '/^NVIDIA\|^H100\|TFLOP/,$p' "$OUT/gpu_bench.log" | tee -a "$LOG"
  tail -30 "$OUT/gpu_bench.log"
fi

# The device tool returns a handful of files: pack every log into one archive there.
if [ "${PACK:-0}" = 1 ]; then
  tar czf /tmp/logs.tgz -C "$OUT" . &&
    find "$OUT" -type f ! -name gpu_suite.log ! -name gpu_bench.json -delete &&
    mv /tmp/logs.tgz "$OUT/logs.tgz"
fi
