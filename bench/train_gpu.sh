#!/usr/bin/env bash
# The GPU training comparison of the attention variants (`mka train`), in one call per
# stage group, from the repository root. DATA holds tinyshakespeare/input.txt and
# wikitext-2/{valid,test}.txt (or train.txt); SRC is the source tree the package is built
# from (a clean `git archive HEAD cpp cuda python CMakeLists.txt pyproject.toml README.md`
# keeps uncommitted edits out):
#   COMMIT=$(git rev-parse --short HEAD) DATA=/path/to/data SRC=. bash bench/train_gpu.sh
# Stages, in this order, each under its own time cap and cut off (with a checkpoint and
# partial results, marked "stopped") when the cap or the whole budget runs out:
#   full   nanoGPT's shakespeare_char recipe (FULL_STEPS iterations) for FULL_VARIANTS
#   short  every variant, the same recipe cut to SHORT_STEPS iterations (a smoke comparison)
#   wt2    every variant, configs/wikitext2_bpe.yaml (WT2_STEPS iterations, the same token budget each)
# SKIP="short wt2" leaves stages out, so the full recipe can be split over several calls of
# at most BUDGET_S seconds each, e.g. FULL_VARIANTS=mha,mqa,gqa SKIP="short wt2", then
# FULL_VARIANTS=mla,mka SKIP="short wt2" BUILD=auto, then FULL_VARIANTS=fastmka SKIP=short BUILD=auto.
# The results (mka train's results.{json,csv,md}, plots, logs; no checkpoints) are packed
# into $OUT/train_gpu_results.tar.gz; curated tables belong in bench/results/.
set -uo pipefail
START=$(date +%s)
BUDGET_S=${BUDGET_S:-575}        # the whole script, build included (a device call may run 600 s)
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
FULL_VARIANTS=${FULL_VARIANTS:-mha}
FULL_STEPS=${FULL_STEPS:-5000}
FULL_CAP_S=${FULL_CAP_S:-540}
SHORT_STEPS=${SHORT_STEPS:-500}
SHORT_CAP_S=${SHORT_CAP_S:-150}
WT2_STEPS=${WT2_STEPS:-400}      # configs/wikitext2_bpe.yaml's own budget: 400 x 32 x 256 tokens
WT2_EVAL_INTERVAL=${WT2_EVAL_INTERVAL:-25}
WT2_CAP_S=${WT2_CAP_S:-240}
SKIP=${SKIP:-}                   # stages to leave out: any of full short wt2
DATA=${DATA:-.carry/data}
SRC=${SRC:-.}                    # source tree the package is built from
RUNS=${RUNS:-/tmp/mka_train_runs}
DEST=${OUT:-/tmp/mka_train_results}
MKA_CUDA=${MKA_CUDA:-AUTO}       # OFF: skip building the CUDA kernels (then attention runs on SDPA)
FULL_BACKEND=${FULL_BACKEND:-auto}  # --attn-backend of stage full (auto: mka kernels if their probe passes)
BACKEND=${BACKEND:-auto}            # --attn-backend of stages short and wt2
BUILD=${BUILD:-1}                # 1: build; auto: only if the installed build is not of this tree; 0: never
EXTRA=${EXTRA:-}                 # flags appended to every stage (a dry run shrinks the models with it)
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$DEST"
LOG="$RUNS/log_$(date -u +%H%M%S).txt"
exec > >(tee "$LOG") 2>&1

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
wanted() { [[ " $SKIP " != *" $1 "* ]]; }

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

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, SRC=$SRC, SKIP='$SKIP', FULL_VARIANTS=$FULL_VARIANTS"
echo "$COMMIT" > "$RUNS/COMMIT"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

# What the installed package was built from: a hash of every source file that goes into it
tree_hash() { (cd "$SRC" && find cpp cuda python CMakeLists.txt pyproject.toml -type f ! -name '*.pyc' -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16); }
STAMP=/tmp/mka_build_stamp
build() {  # build MKA_CUDA LIMIT_SECONDS: install the package, native kernels included
    echo "== building with MKA_CUDA=$1 (limit ${2}s)"
    CMAKE_BUILD_PARALLEL_LEVEL=16 timeout "$2" python3 -m pip install --no-build-isolation --no-deps -q "$SRC" \
        -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90a -Ccmake.define.MKA_CUDA="$1" && echo "$(tree_hash) $1" > "$STAMP"
}
built_cuda() { (cd /tmp && python3 -c "import mka, sys; sys.exit(0 if mka._C.built_with_cuda() else 1)") 2>/dev/null; }
if [[ $BUILD == auto ]]; then  # a warm machine keeps the last install: reuse it only if it is of this tree
    if [[ -f $STAMP && "$(cat "$STAMP")" == "$(tree_hash) $MKA_CUDA" ]] && built_cuda; then
        echo "== build reused: installed package is of this tree ($(cat "$STAMP")) and reports CUDA"
        BUILD=0
    else
        echo "== no installed build of this tree (stamp: $(cat "$STAMP" 2>/dev/null || echo none)): building"
        BUILD=1
    fi
fi
# CUDA kernels that fail to build in time are left out: training then runs on SDPA ("torch")
if [[ $BUILD == 1 ]]; then build "$MKA_CUDA" "${BUILD_LIMIT_S:-150}" || build OFF 120 || exit 1; fi
echo "== built after $(( $(date +%s) - START ))s"
(cd /tmp && python3 -c "import mka; print('mka', mka.__file__, 'built with CUDA:', mka._C.built_with_cuda())")

SHAKE=(--config configs/shakespeare_char.yaml --data "$DATA/tinyshakespeare/input.txt")
# Checkpoints only at the end (and on SIGTERM): saving one every eval costs time, not results
if wanted full && (( FULL_STEPS > 0 )); then
    stage "shakespeare_full_${FULL_VARIANTS//,/_}" "$FULL_CAP_S" "${SHAKE[@]}" --attention "$FULL_VARIANTS" \
        --max-steps "$FULL_STEPS" --lr-decay-steps "$FULL_STEPS" --checkpoint-interval "$FULL_STEPS" \
        --attn-backend "$FULL_BACKEND"
fi
if wanted short; then
    stage shakespeare_all_short "$SHORT_CAP_S" "${SHAKE[@]}" --attention all --max-steps "$SHORT_STEPS" \
        --attn-backend "$BACKEND" --lr-decay-steps "$SHORT_STEPS" --eval-interval $(( SHORT_STEPS / 4 ))
fi
if wanted wt2; then
    stage wikitext2_all "$WT2_CAP_S" --config configs/wikitext2_bpe.yaml --data "$DATA/wikitext-2" --attention all \
        --attn-backend "$BACKEND" --max-steps "$WT2_STEPS" --lr-decay-steps "$WT2_STEPS" \
        --eval-interval "$WT2_EVAL_INTERVAL" --checkpoint-interval "$WT2_STEPS"
fi

echo "== done after $(( $(date +%s) - START ))s; packing"
cp "$LOG" "$DEST/" 2>/dev/null
tar czf "$DEST/train_gpu_results.tar.gz" -C "$RUNS" --exclude='*.pt' --exclude=cache .
