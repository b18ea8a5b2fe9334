#!/usr/bin/env bash
# Recall beyond a window: five models trained at equal budget on MQAR (mka train --task mqar:
# the same steps, examples, lengths, learning rate, seed and model shape for each), then the
# held-out accuracy of each against sequence length (mka eval recall), in one table and one
# accuracy_vs_length.{json,png} under $OUT. From the repository root:
#   bash bench/train_recall.sh                  # PRESET=cpu: a plumbing run, minutes on 2 cores
#   PRESET=gpu OUT=runs/recall_gpu bash bench/train_recall.sh
# Models (the window W is the same for all that have one):
#   full          mha                               the ceiling: sees the whole sequence
#   window        mha, mha.window=W                 the floor: sees W tokens back
#   mka           mka (levels 2: no L3), mka.window=W
#   mka-hash      mka, levels=3, recall_chunk=CHUNK, recall_top=TOP, same window   (SPEC §7.2)
#   fastmka-hash  fastmka, likewise
# MKA_HASH_ARGS / FASTMKA_HASH_ARGS replace their mka train flags (--attention NAME,
# --attn-option NAME.KEY=VALUE ...); a variant the registry rejects is skipped with the reason.
# The models have learned absolute positions: --seq-len (the block size) is the longest length,
# and by default every length is trained on (one length per step, in turn), so no length is
# extrapolated. TRAIN_LENGTHS=LONGEST trains at the longest alone (every position still seen;
# shorter lengths then test the same skill earlier in the sequence): in the CPU probes of
# bench/results/cpu_recall_task.md mixing lengths slowed learning.
# Presets (any variable below can be set instead):
#   cpu  W 16, lengths 16,64,256 (1x, 4x, 16x W), tiny model (one 64-dim head, lr 1e-3: what
#        learnt fastest in bench/results/cpu_recall_task.md), 300 steps: plumbing, not a result
#   gpu-quick  W 256, lengths 256,1k,4k (1x, 4x, 16x W), a 4-layer 256-wide model (head size
#              64: the CUDA kernels' smallest), 3000 steps at lr 1e-3, 8 pairs of a 256-token
#              vocabulary: ~6 minutes of an H100 for the five; too few steps to answer the
#              question (bench/results/h100_recall_task.md), a starting point
#   gpu  W 1024, lengths 1k,4k,16k, the same model, bf16 (not tuned: a starting point)
set -uo pipefail
PRESET=${PRESET:-cpu}
case $PRESET in
    cpu) D_WINDOW=16; D_LENGTHS=16,64,256; D_STEPS=300; D_BATCH=16; D_EXAMPLES=128
         D_CHUNK=8; D_TOP=4; D_LR=1e-3
         D_MODEL="--n-layer 2 --n-head 1 --n-embd 64 --precision fp32"
         D_TASK="--task-vocab 64 --num-kv-pairs 4 --num-queries 4" ;;
    gpu-quick) D_WINDOW=256; D_LENGTHS=256,1k,4k; D_STEPS=3000; D_BATCH=16; D_EXAMPLES=256
         D_CHUNK=64; D_TOP=8; D_LR=1e-3
         D_MODEL="--n-layer 4 --n-head 4 --n-embd 256 --precision bf16"
         D_TASK="--task-vocab 256 --num-kv-pairs 8 --num-queries 8" ;;
    gpu) D_WINDOW=1024; D_LENGTHS=1k,4k,16k; D_STEPS=3000; D_BATCH=8; D_EXAMPLES=256
         D_CHUNK=64; D_TOP=8; D_LR=1e-3
         D_MODEL="--n-layer 4 --n-head 4 --n-embd 256 --precision bf16"
         D_TASK="--task-vocab 8192 --num-kv-pairs 64 --num-queries 64" ;;
    *) echo "PRESET: expected cpu, gpu-quick or gpu, got '$PRESET'" >&2; exit 2 ;;
esac
WINDOW=${WINDOW:-$D_WINDOW}
CHUNK=${CHUNK:-$D_CHUNK}                 # recall: tokens per chunk, chunks recalled per query
TOP=${TOP:-$D_TOP}
LENGTHS=${LENGTHS:-$D_LENGTHS}           # evaluated, and trained on in turn ...
TRAIN_LENGTHS=${TRAIN_LENGTHS:-$LENGTHS} # ... unless these are given (e.g. the longest alone)
STEPS=${STEPS:-$D_STEPS}
BATCH=${BATCH:-$D_BATCH}                 # examples per step, every length
EXAMPLES=${EXAMPLES:-$D_EXAMPLES}        # held-out examples per length
MODEL=${MODEL:-$D_MODEL}
TASK=${TASK:-$D_TASK}
LR=${LR:-$D_LR}
EXTRA=${EXTRA:-}                         # flags added to every mka train call
OUT=${OUT:-runs/recall_$PRESET}
recall() { echo "--attention $1 --attn-option $1.levels=3 --attn-option $1.recall_chunk=$CHUNK --attn-option $1.recall_top=$TOP --attn-option $1.window=$WINDOW"; }
MKA_HASH_ARGS=${MKA_HASH_ARGS:-$(recall mka)}
FASTMKA_HASH_ARGS=${FASTMKA_HASH_ARGS:-$(recall fastmka)}
export PYTHONUNBUFFERED=1

SEQ_LEN=$(python3 -c "from mka.train.options import parse_lengths as p; print(max(p('$LENGTHS', 'lengths') + p('$TRAIN_LENGTHS', 'lengths')))") || exit 2
# shellcheck disable=SC2206
COMMON=(--task mqar $TASK --seq-len "$SEQ_LEN" --task-lengths "$TRAIN_LENGTHS" --max-steps "$STEPS" --batch-size "$BATCH"
        --lr "$LR" --warmup-steps $(( STEPS / 10 )) --eval-examples "$EXAMPLES" --log-interval 10 $MODEL $EXTRA)
mkdir -p "$OUT"
echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), PRESET=$PRESET"
echo "== MQAR, window $WINDOW, lengths $LENGTHS (trained on $TRAIN_LENGTHS), $STEPS steps of $BATCH examples per model; out $OUT"

MODELS=()   # LABEL=CHECKPOINT_FOLDER of the models that trained
train() {   # train LABEL FLAGS...: one mka train run per model; a variant the registry lacks is skipped
    local label=$1 problem variant
    shift
    # shellcheck disable=SC2086
    problem=$(python3 - "${COMMON[@]}" "$@" --out "$OUT/$label" <<'EOF' 2>&1
import sys
from mka.train.model_factory import gpt_config
from mka.train.options import ConfigError, parse
from mka.train.recall_tasks import build_task
try:
    s = parse(sys.argv[1:])
    for v in s.variants():
        gpt_config(s, v, build_task(s).vocab_size, "torch")   # the registry validates name and options
except ConfigError as e:
    print(e)
EOF
)
    if [[ -n $problem ]]; then echo "== $label: SKIPPED, not available in this build: $problem"; return; fi
    variant=$(python3 -c "from mka.train.options import parse; import sys; print(parse(sys.argv[1:]).attention)" \
              "${COMMON[@]}" "$@")
    if [[ -d $OUT/$label/$variant ]]; then echo "== $label: $OUT/$label holds a run already: evaluating it"
    else
        echo "== $label: mka train $*"
        python3 -m mka.train "${COMMON[@]}" "$@" --out "$OUT/$label" || { echo "== $label: FAILED (exit $?)"; return; }
    fi
    MODELS+=("$label=$OUT/$label/$variant")
}

train full --attention mha
train window --attention mha --attn-option "mha.window=$WINDOW"
train mka --attention mka --attn-option mka.levels=2 --attn-option "mka.window=$WINDOW"
# shellcheck disable=SC2086
train mka-hash $MKA_HASH_ARGS
# shellcheck disable=SC2086
train fastmka-hash $FASTMKA_HASH_ARGS

if (( ${#MODELS[@]} == 0 )); then echo "== no model trained"; exit 1; fi
echo "== held-out accuracy against length: mka eval recall ${MODELS[*]}"
python3 -m mka.cli eval recall "${MODELS[@]}" --lengths "$LENGTHS" --examples "$EXAMPLES" --batch-size "$BATCH" \
    --out "$OUT"
