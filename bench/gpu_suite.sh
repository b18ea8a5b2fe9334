#!/usr/bin/env bash
# The GPU suite in one call, from any directory: build mka with its CUDA kernels, run the CUDA
# tests (tests/cuda and the device-parametrized tests/ops), compute-sanitizer (memcheck,
# racecheck) on a small case of every kernel (tests/cuda/sanitize_cases.py), then
# `mka bench --preset gpu-suite` (its table is printed last), then an optional A/B of
# kernel options. Logs and JSON go to $OUT; curated tables belong in bench/results/.
#
# Usage: bash bench/gpu_suite.sh
# Environment (all optional):
#   OUT=DIR          where logs and results go (default /tmp/mka_gpu_suite_<UTC date>)
#   TESTS=0          skip the tests;  SANITIZE=0  skip compute-sanitizer;  BENCH=0  skip the benchmark
#   TEST_PATHS=...   the test folders or files to run (default "tests/cuda tests/ops tests/memory";
#                    e.g. "tests/cuda/test_cuda_attention.py tests/cuda/test_cuda_paged.py" when
#                    device time is short)
#   BENCH_ARGS=...   extra flags for the benchmark, e.g. "--seqs 2k,8k --rounds 3"
#   AB="SET SET..."  A/B kernel-option sets (mka bench --ab), e.g. AB="scan=1pass scan=3pass";
#                    AB_ARGS=... extra flags for it (default "--impls attention,fastmka,mka")
#   PREBUILT=FILE    skip the build: use this _C*.so (built elsewhere for this machine's Python)
#   DECODE=1         also the decode table (mka bench --preset decode); DECODE_ARGS=... its flags
#   GENERATE=1       also generation of the GPT variants, eager and with the decode step in a
#                    CUDA graph (mka generate-bench --cuda-graph); GENERATE_ARGS=... its flags
#   FWD_AB=1         also the opt-in persistent forward against the default one (the attention
#                    A/B of bench/tools/attention_vs_cudnn.py under MKA_CUDA_FWD_PERSISTENT=0 and
#                    1, two interleaved rounds, cuDNN once after them)
#   CLUSTER_AB=1     also paged decode with its key splits merged by the combine kernel against
#                    thread-block clusters (MKA_CUDA_DECODE_CLUSTER=0, 2, 8, 16, and 16 with 16
#                    forced splits by MKA_CUDA_DECODE_SPLITS), G 8 at B 1 and 16 over 4k and 32k
#                    keys and G 32 at B 1 over 4k, in CUDA graphs with cuDNN beside, two rounds
#   DRAM=1           also decode with the DRAM tier at 16k..1M tokens (bench/tools/dram_tier.py);
#                    DRAM_ARGS=... its flags (default: bf16, those contexts, resident up to 256k)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mka_gpu_suite_$(date -u +%Y%m%d_%H%M)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_suite.log"
step() { echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }

step "environment"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  nvcc --version | tail -1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  echo "cpu cores: $(nproc)"
} 2>&1 | tee -a "$LOG"

if [ -n "${PREBUILT:-}" ]; then
  step "prebuilt extension $PREBUILT"
  cp "$PREBUILT" python/mka/ && export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
else
  step "build (pip install --no-build-isolation)"
  start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1
  rc=$?
  echo "build rc=$rc in $(( $(date +%s) - start )) s with $(nproc) cores" | tee -a "$LOG"
  if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit 1; fi
fi
python3 -c "import mka._C as C; print('built_with_cuda:', C.built_with_cuda())" 2>&1 | tee -a "$LOG"

step "CUDA tests"
[ "${TESTS:-1}" = 0 ] && echo "skipped (TESTS=0)" | tee -a "$LOG"
# tests/memory: its CUDA cases only (-m cuda), the rest is the CPU suite's.
for t in $([ "${TESTS:-1}" = 0 ] || echo "${TEST_PATHS:-tests/cuda tests/ops tests/memory}"); do
  log="$OUT/tests_$(basename "$t").log"
  sel=$([ "$t" = tests/memory ] && echo "-m cuda")
  # Separate runs on xdist workers: a crashed worker is reported and the rest still run. Two
  # CPU threads per worker: the float64 references run on the CPU.
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 python3 -m pytest "$t" $sel -q -n 8 --timeout=600 -p no:cacheprovider -rf > "$log" 2>&1
  echo "pytest $t rc=$? : $(tail -1 "$log")" | tee -a "$LOG"
  grep -E "^FAILED|crashed" "$log" | head -20 | tee -a "$LOG"
done

step "compute-sanitizer"
[ "${SANITIZE:-1}" = 0 ] && echo "skipped (SANITIZE=0)" | tee -a "$LOG"
for tool in $([ "${SANITIZE:-1}" = 0 ] || echo memcheck racecheck); do
  timeout 300 compute-sanitizer --tool $tool --print-limit 20 python3 tests/cuda/sanitize_cases.py \
    > "$OUT/sanitize_$tool.log" 2>&1
  echo "$tool rc=$? : $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|HAZARD' "$OUT/sanitize_$tool.log" | tail -2 | tr '\n' ' ')" | tee -a "$LOG"
  # The opt-in persistent forward (MKA_CUDA_FWD_PERSISTENT=1) takes the tma cases' forwards.
  MKA_CUDA_FWD_PERSISTENT=1 timeout 300 compute-sanitizer --tool $tool --print-limit 20 \
    python3 tests/cuda/sanitize_cases.py > "$OUT/sanitize_${tool}_persistent.log" 2>&1
  echo "$tool (persistent forward) rc=$? : $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|HAZARD' "$OUT/sanitize_${tool}_persistent.log" | tail -2 | tr '\n' ' ')" | tee -a "$LOG"
done

step "benchmark (mka bench --preset gpu-suite ${BENCH_ARGS:-})"
if [ "${BENCH:-1}" = 0 ]; then
  echo "skipped (BENCH=0)" | tee -a "$LOG"
else
  # shellcheck disable=SC2086
  python3 -m mka.cli bench --preset gpu-suite ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tee -a "$LOG"
fi

if [ "${DECODE:-0}" = 1 ]; then
  step "decode table (mka bench --preset decode ${DECODE_ARGS:-})"
  # shellcheck disable=SC2086
  python3 -m mka.cli bench --preset decode ${DECODE_ARGS:-} --json "$OUT/decode.json" 2>&1 \
    | tee "$OUT/decode.log" | tee -a "$LOG"
fi

if [ "${GENERATE:-0}" = 1 ]; then
  step "generation (mka generate-bench --cuda-graph ${GENERATE_ARGS:-})"
  # shellcheck disable=SC2086
  python3 -m mka.cli generate-bench --cuda-graph ${GENERATE_ARGS:---attns none --batches 1,16 --prompts 1k --new-tokens 128} \
    --json "$OUT/generate.json" 2>&1 | tee "$OUT/generate.log" | tee -a "$LOG"
fi

if [ -n "${AB:-}" ]; then
  step "A/B of kernel options: $AB"
  # shellcheck disable=SC2086
  python3 -m mka.cli bench --preset gpu-suite ${AB_ARGS:---impls attention,fastmka,mka} --ab $AB --json "$OUT/ab.json" \
    2>&1 | tee "$OUT/ab.log" | tee -a "$LOG"
fi

if [ "${FWD_AB:-0}" = 1 ]; then
  step "persistent forward A/B (attention_vs_cudnn.py, MKA_CUDA_FWD_PERSISTENT=0/1)"
  for round in 1 2; do
    MKA_CUDA_FWD_PERSISTENT=0 python3 bench/tools/attention_vs_cudnn.py one-item 2>&1 | tee -a "$OUT/fwd_ab.log"
    MKA_CUDA_FWD_PERSISTENT=1 python3 bench/tools/attention_vs_cudnn.py persist 2>&1 | tee -a "$OUT/fwd_ab.log"
  done | tee -a "$LOG"
  python3 bench/tools/attention_vs_cudnn.py cudnn-run --sdpa 2>&1 | grep cudnn | tee -a "$OUT/fwd_ab.log" "$LOG"
fi

if [ "${CLUSTER_AB:-0}" = 1 ]; then
  step "paged decode A/B: combine kernel against thread-block clusters"
  dec="python3 -m mka.cli bench --cases decode --device cuda --dtype bfloat16 --heads 32 --head-dim 128 --cuda-graph --rounds 3 --reps 20 --impls paged,paged_mka,sdpa.cudnn"
  for round in 1 2; do
    for cfg in 0:0 2:0 8:0 16:0 16:16; do
      cluster=${cfg%:*} splits=${cfg#*:}
      echo "-- round $round, MKA_CUDA_DECODE_CLUSTER=$cluster MKA_CUDA_DECODE_SPLITS=$splits"
      # shellcheck disable=SC2086
      MKA_CUDA_DECODE_CLUSTER=$cluster MKA_CUDA_DECODE_SPLITS=$splits $dec --kv-heads 8 --batches 1,16 --seqs 4096,32768
      # shellcheck disable=SC2086
      MKA_CUDA_DECODE_CLUSTER=$cluster MKA_CUDA_DECODE_SPLITS=$splits $dec --kv-heads 32 --batches 1 --seqs 4096
    done
  done 2>&1 | tee "$OUT/cluster_ab.log" | tee -a "$LOG"
fi

if [ "${DRAM:-0}" = 1 ]; then
  step "DRAM tier decode (bench/tools/dram_tier.py ${DRAM_ARGS:-})"
  # shellcheck disable=SC2086
  python3 bench/tools/dram_tier.py ${DRAM_ARGS:---dtype bfloat16 --device cuda --contexts 16384,65536,262144,1048576 --resident-max 262144} \
    2>&1 | tee "$OUT/dram_tier.log" | tee -a "$LOG"
fi
