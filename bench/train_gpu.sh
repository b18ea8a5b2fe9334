#!/usr/bin/env bash
# The GPU comparison of attention variants (issue 5, part 7) in one call, from the repo root:
#   mkdir -p .carry/data/wikitext-2 .carry/data/tinyshakespeare
#   cp ../shared/data/tinyshakespeare/input.txt .carry/data/tinyshakespeare/
#   cp ../shared/data/wikitext-2/{valid,test}.txt .carry/data/wikitext-2/
#   device run: command "bash bench/train_gpu.sh", carry [".carry/data"]
# Stages, in priority order, each cut off (with a checkpoint and partial results) when the
# time budget runs out:
#   1. shakespeare_mha_full   nanoGPT's shakespeare_char recipe for MHA, FULL_STEPS iterations (0: skip)
#   2. shakespeare_all_short  every variant, the same recipe cut to SHORT_STEPS iterations
#   3. wikitext2_all_short    every variant, WikiText-2 bpe:8192, WT2_STEPS iterations
# Everything except checkpoints is packed into $OUT/train_gpu_results.tar.gz with the log.
set -uo pipefail
START=$(date +%s)
BUDGET_S=${BUDGET_S:-400}        # the whole script, build included
FULL_STEPS=${FULL_STEPS:-5000}
SHORT_STEPS=${SHORT_STEPS:-500}
WT2_STEPS=${WT2_STEPS:-150}
DATA=${DATA:-.carry/data}
RUNS=${RUNS:-/tmp/mka_train_runs}
DEST=${OUT:-bench/results}
MKA_CUDA=${MKA_CUDA:-AUTO}       # OFF: skip building the CUDA kernels (then attention runs on SDPA)
FULL_BACKEND=${FULL_BACKEND:-auto}  # --attn-backend of stage 1 (auto: mka kernels if their probe passes)
BACKEND=${BACKEND:-auto}            # --attn-backend of stages 2 and 3
BUILD=${BUILD:-1}                # 0: use the mka already installed (a dry run of the stages)
EXTRA=${EXTRA:-}                 # flags appended to every stage (a dry run shrinks the models with it)
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$DEST"
LOG="$RUNS/log.txt"
exec > >(tee "$LOG") 2>&1

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

stage() {  # stage NAME CAP_SECONDS ARGS...: train under a timeout; SIGTERM makes it checkpoint and stop
    local name=$1 cap=$2 t
    shift 2
    t=$(( $(left) - 30 ))            # room for the checkpoint after SIGTERM (--kill-after)
    (( t > cap )) && t=$cap
    if (( t < 30 )); then echo "== $name: SKIPPED, ${t}s left"; return; fi
    echo "== $name (limit ${t}s, $(date -u +%H:%M:%S)): mka train $*"
    # shellcheck disable=SC2086
    timeout -s TERM --kill-after=30 "$t" python3 -m mka.train "$@" --out "$RUNS/$name" --cache-dir "$RUNS/cache" $EXTRA
    echo "== $name: exit $? after $(( $(date +%s) - START ))s"
}

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${COMMIT:-unknown}"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
build() {  # build MKA_CUDA LIMIT_SECONDS: install the package, native kernels included
    echo "== building with MKA_CUDA=$1 (limit ${2}s)"
    CMAKE_BUILD_PARALLEL_LEVEL=16 timeout "$2" python3 -m pip install --no-build-isolation --no-deps -q . \
        -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90a -Ccmake.define.MKA_CUDA="$1"
}
# CUDA kernels that fail to build in time are left out: training then runs on SDPA ("torch")
if [[ $BUILD == 1 ]]; then build "$MKA_CUDA" "${BUILD_LIMIT_S:-150}" || build OFF 120 || exit 1; fi
echo "== built after $(( $(date +%s) - START ))s"
python3 -c "import mka; print('mka built with CUDA:', mka._C.built_with_cuda())"

SHAKE=(--config configs/shakespeare_char.yaml --data "$DATA/tinyshakespeare/input.txt")
(( FULL_STEPS > 0 )) && stage shakespeare_mha_full 200 "${SHAKE[@]}" --attention mha --max-steps "$FULL_STEPS" --lr-decay-steps "$FULL_STEPS" \
    --attn-backend "$FULL_BACKEND"
stage shakespeare_all_short "${SHORT_CAP_S:-150}" "${SHAKE[@]}" --attention all --max-steps "$SHORT_STEPS" --attn-backend "$BACKEND" \
    --lr-decay-steps "$SHORT_STEPS" --eval-interval $(( SHORT_STEPS / 4 ))
stage wikitext2_all_short "${WT2_CAP_S:-150}" --config configs/wikitext2_bpe.yaml --data "$DATA/wikitext-2" --attention all --attn-backend "$BACKEND" \
    --max-steps "$WT2_STEPS" --eval-interval $(( WT2_STEPS / 3 )) --eval-tokens 65536

tar czf "$DEST/train_gpu_results.tar.gz" -C "$RUNS" --exclude='*.pt' --exclude=cache .
echo "== done after $(( $(date +%s) - START ))s"
