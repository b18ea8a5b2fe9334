#!/usr/bin/env bash
# Recall beyond a window: models trained at equal budget on MQAR (mka train --task mqar: the
# same steps, examples, lengths, learning rate, seed and model shape for each), then the
# held-out accuracy of each against sequence length (mka eval recall), in one table and one
# accuracy_vs_length.{json,png} under $OUT. From the repository root:
#   bash bench/train_recall.sh                  # PRESET=cpu: a plumbing run, minutes on 2 cores
#   PRESET=gpu-quick PARALLEL=1 OUT=runs/recall_gpu bash bench/train_recall.sh
# Models (the window W is the same for all that have one):
#   full          mha                               the ceiling: sees the whole sequence
#   window        mha, mha.window=W                 the floor: sees W tokens back
#   mka           mka (levels 2: no L3), mka.window=W   (level 2 attends to the EMA at every
#                                                    position: a second full-length attention)
#   mka-sum       likewise with ema_stride=CHUNK    (level 2 over chunk-end summaries, SPEC §7.3)
#   fastmka       fastmka (levels 2), same window   (level 2 fused into the keys: no reach)
#   mka-hash      mka, levels=3, recall_chunk=CHUNK, recall_top=TOP, same window   (SPEC §7.2)
#   mka-sum-hash  mka-hash with ema_stride=CHUNK    (the configuration the DRAM tier serves)
#   fastmka-hash  fastmka, levels=3 by recall
# SCORE=mean ranks recalled chunks exactly, SCORE=bound by Quest's bound, SCORE=corners by the
# mean over the chunk's min/max key box's corners (recall_score, SPEC §7.2): the three recall
# models are then labelled (and kept in folders) mka-SCORE,
# mka-sum-SCORE, fastmka-SCORE.
# MODELS="full window ..." picks some of them. MKA_HASH_ARGS / FASTMKA_HASH_ARGS replace the
# recall models' mka train flags (--attention NAME, --attn-option NAME.KEY=VALUE ...); a variant
# the registry rejects is skipped with the reason. PARALLEL=1 trains the models at once (logs
# in $OUT/LABEL.log): small models leave one GPU mostly idle, so this takes about the time of
# the slowest; their tokens/s then share the GPU and are not comparable.
# The models have learned absolute positions: --seq-len (the block size) is the longest length,
# and by default every length is trained on (one length per step, in turn), so no length is
# extrapolated. TRAIN_LENGTHS sets them apart from the evaluated LENGTHS (gpu-quick adds 64:
# short examples, where attention starts almost on the answer, are where the skill is learned).
# Presets (any variable below can be set instead):
#   cpu  W 16, lengths 16,64,256 (1x, 4x, 16x W), tiny model (one 64-dim head, lr 1e-3: what
#        learnt fastest in bench/results/cpu_recall_task.md), 300 steps: plumbing, not a result
#   gpu-quick  W 256, lengths 256,1k,4k (1x, 4x, 16x W; trained on 64 too), 2 layers of 256
#              (4 heads of 64) with the key shift (--key-shift: keys read the previous token),
#              2400 steps of 32 examples at lr 1e-3, 8 pairs of a 256-token vocabulary:
#              bench/results/h100_recall_task.md (about 4 minutes of an H100, PARALLEL=1)
#   gpu  W 256, lengths 1k,4k,16k (4x, 16x, 64x W; trained on 64 and 256 too), the gpu-quick
#        model and task, batch 16, 2000 steps (not run yet: batch 8 without the short lengths
#        learnt nothing in 2000 steps, h100_recall_task.md; about 8 minutes of an H100 expected)
set -uo pipefail
PRESET=${PRESET:-cpu}
case $PRESET in
    cpu) D_WINDOW=16; D_LENGTHS=16,64,256; D_TRAIN_LENGTHS=; D_STEPS=300; D_BATCH=16
         D_EXAMPLES=128; D_CHUNK=8; D_TOP=4; D_LR=1e-3; D_WARMUP=30
         D_MODEL="--n-layer 2 --n-head 1 --n-embd 64 --precision fp32"
         D_TASK="--task-vocab 64 --num-kv-pairs 4 --num-queries 4" ;;
    gpu-quick) D_WINDOW=256; D_LENGTHS=256,1k,4k; D_TRAIN_LENGTHS=64,256,1k,4k; D_STEPS=2400
         D_BATCH=32; D_EXAMPLES=256; D_CHUNK=64; D_TOP=8; D_LR=1e-3; D_WARMUP=200
         D_MODEL="--n-layer 2 --n-head 4 --n-embd 256 --precision bf16 --key-shift"
         D_TASK="--task-vocab 256 --num-kv-pairs 8 --num-queries 8" ;;
    gpu) D_WINDOW=256; D_LENGTHS=1k,4k,16k; D_TRAIN_LENGTHS=64,256,1k,4k,16k; D_STEPS=2000
         D_BATCH=16; D_EXAMPLES=128; D_CHUNK=64; D_TOP=8; D_LR=1e-3; D_WARMUP=200
         D_MODEL="--n-layer 2 --n-head 4 --n-embd 256 --precision bf16 --key-shift"
         D_TASK="--task-vocab 256 --num-kv-pairs 8 --num-queries 8" ;;
    *) echo "PRESET: expected cpu, gpu-quick or gpu, got '$PRESET'" >&2; exit 2 ;;
esac
WINDOW=${WINDOW:-$D_WINDOW}
CHUNK=${CHUNK:-$D_CHUNK}                 # recall: tokens per chunk, chunks recalled per query
TOP=${TOP:-$D_TOP}
LENGTHS=${LENGTHS:-$D_LENGTHS}           # evaluated, and trained on in turn ...
TRAIN_LENGTHS=${TRAIN_LENGTHS:-${D_TRAIN_LENGTHS:-$LENGTHS}} # ... unless these are given
STEPS=${STEPS:-$D_STEPS}
BATCH=${BATCH:-$D_BATCH}                 # examples per step, every length
EXAMPLES=${EXAMPLES:-$D_EXAMPLES}        # held-out examples per length
MODEL=${MODEL:-$D_MODEL}
TASK=${TASK:-$D_TASK}
LR=${LR:-$D_LR}
WARMUP=${WARMUP:-$D_WARMUP}
SEED=${SEED:-0}
PARALLEL=${PARALLEL:-0}
PICK=${MODELS:-full window mka mka-sum fastmka mka-hash mka-sum-hash fastmka-hash}
EXTRA=${EXTRA:-}                         # flags added to every mka train call
OUT=${OUT:-runs/recall_$PRESET}
SCORE=${SCORE:-hash}                     # how recall ranks chunks: hash (signatures), mean, bound or corners
recall() { echo "--attention $1 --attn-option $1.levels=3 --attn-option $1.recall_chunk=$CHUNK --attn-option $1.recall_top=$TOP --attn-option $1.window=$WINDOW --attn-option $1.recall_score=$SCORE"; }
MKA_HASH_ARGS=${MKA_HASH_ARGS:-$(recall mka)}
FASTMKA_HASH_ARGS=${FASTMKA_HASH_ARGS:-$(recall fastmka)}
export PYTHONUNBUFFERED=1

SEQ_LEN=$(python3 -c "from mka.train.options import parse_lengths as p; print(max(p('$LENGTHS', 'lengths') + p('$TRAIN_LENGTHS', 'lengths')))") || exit 2
# shellcheck disable=SC2206
COMMON=(--task mqar $TASK --seq-len "$SEQ_LEN" --task-lengths "$TRAIN_LENGTHS" --max-steps "$STEPS" --batch-size "$BATCH"
        --lr "$LR" --warmup-steps "$WARMUP" --eval-examples "$EXAMPLES" --log-interval 10 --seed "$SEED"
        $MODEL $EXTRA)
mkdir -p "$OUT"
echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), PRESET=$PRESET"
echo "== MQAR, window $WINDOW, lengths $LENGTHS (trained on $TRAIN_LENGTHS), $STEPS steps of $BATCH examples per model; out $OUT"

TRAINED=()  # LABEL=CHECKPOINT_FOLDER of the models that trained (or are training: PARALLEL)
complete() {  # complete FOLDER: its run ended with the full budget (result.json says so)
    python3 -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get('complete') else 1)" \
        "$1/result.json" 2>/dev/null
}
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
    if complete "$OUT/$label/$variant"; then echo "== $label: $OUT/$label holds a finished run already: evaluating it"
    elif [[ $PARALLEL == 1 ]]; then
        echo "== $label: mka train $* (in the background: $OUT/$label.log)"
        python3 -m mka.train "${COMMON[@]}" "$@" --out "$OUT/$label" > "$OUT/$label.log" 2>&1 &
    else
        echo "== $label: mka train $*"
        python3 -m mka.train "${COMMON[@]}" "$@" --out "$OUT/$label" || { echo "== $label: FAILED (exit $?)"; return; }
    fi
    TRAINED+=("$label=$OUT/$label/$variant")
}

summaries() { echo "--attn-option mka.ema_stride=$CHUNK"; }
# PARALLEL: the background trainings stop with the script (they would keep the GPU)
trap 'kill $(jobs -p) 2>/dev/null; exit 130' INT TERM
for label in $PICK; do
    # shellcheck disable=SC2046,SC2086
    case $label in
        full) train full --attention mha ;;
        window) train window --attention mha --attn-option "mha.window=$WINDOW" ;;
        mka) train mka --attention mka --attn-option mka.levels=2 --attn-option "mka.window=$WINDOW" ;;
        mka-sum) train mka-sum --attention mka --attn-option mka.levels=2 --attn-option "mka.window=$WINDOW" $(summaries) ;;
        fastmka) train fastmka --attention fastmka --attn-option fastmka.levels=2 --attn-option "fastmka.window=$WINDOW" ;;
        # the recall models' labels (and run folders) name the score: mka-hash or mka-mean ...
        mka-hash) train "mka-$SCORE" $MKA_HASH_ARGS ;;
        mka-sum-hash) train "mka-sum-$SCORE" $MKA_HASH_ARGS $(summaries) ;;
        fastmka-hash) train "fastmka-$SCORE" $FASTMKA_HASH_ARGS ;;
        *) echo "MODELS: unknown model '$label' (known: full window mka mka-sum fastmka mka-hash mka-sum-hash fastmka-hash)" >&2; exit 2 ;;
    esac
done
if [[ $PARALLEL == 1 ]]; then
    wait
    finished=()
    for entry in "${TRAINED[@]}"; do   # the runs that ended with their full budget
        if complete "${entry#*=}"; then finished+=("$entry")
        else echo "== ${entry%%=*}: FAILED (see $OUT/${entry%%=*}.log)"; fi
    done
    TRAINED=("${finished[@]}")
fi

if (( ${#TRAINED[@]} == 0 )); then echo "== no model trained"; exit 1; fi
echo "== held-out accuracy against length: mka eval recall ${TRAINED[*]}"
python3 -m mka.cli eval recall "${TRAINED[@]}" --lengths "$LENGTHS" --examples "$EXAMPLES" --batch-size "$BATCH" \
    --out "$OUT"
