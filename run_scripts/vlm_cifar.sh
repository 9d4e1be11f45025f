#!/usr/bin/env bash
# Issue 11 item 6 end to end on the CIFAR-10 VQA set: train a tiny LLaVA (random init, 576 vision tokens at
# 336 px / patch 14), then the merger + pruner heads at T̄ = 75 / 50 / 25 % of the vision tokens, then the
# origin / soft / hard evaluation next to random-drop and FastV at the learned T̄. Outputs under $OUT:
# tiny_llava/ (tiny_llava.json), t75/ t50/ t25/ (checkpoints), eval_t75.json eval_t50.json eval_t25.json.
#   DATA=data OUT=runs/vlm_cifar bash run_scripts/vlm_cifar.sh          # 6 min 18 s on one H200
# BUDGETS picks the pruning runs and their order (default "t75 t50 t25"). EXTRA_KEYS adds config overrides to
# every pruning run, e.g. the merge the CPU diagnosis favours (docs/vlm.md):
#   EXTRA_KEYS="merge_similarity=cosine merge_assignment=others merge_positions=original" bash run_scripts/vlm_cifar.sh
# A CPU smoke run (67 s on 2 cores; IMAGE_SIZE=112 gives 64 vision tokens instead of 576):
#   OMP_NUM_THREADS=1 DATA=data OUT=/tmp/vlm_small MINUTES=0.5 IMAGE_SIZE=112 HIDDEN=32 VISION_LAYERS=2 BATCH=8 \
#     WORKERS=0 PRUNE_WORKERS=0 PRUNE_STEPS=5 PRUNE_BATCH=4 PRUNE_IMAGES=500 LIMIT=16 EVAL_BATCH=8 \
#     TRAIN_IMAGES=500 bash run_scripts/vlm_cifar.sh
# VISION_MINUTES=m first trains the tower + projector as a CIFAR-10 classifier for m minutes (the stand-in for
# LLaVA's pretrained CLIP, vlm/vision_pretrain.py); FREEZE_VISION=1 then keeps the tower fixed (--freeze_vision).
# Longer training than one call allows (docs/vlm.md): INIT=path continues a saved tiny_llava.pt (train_tiny_llava.py
# --init: its weights and sizes, a fresh optimizer cycle over this call's MINUTES; HIDDEN / LAYERS / VISION_LAYERS /
# IMAGE_SIZE may be left unset, and one set to another size than the checkpoint's stops it with one line).
# BASE_CHECKPOINT=path skips the tiny LLaVA training and prunes that file instead (INIT, MINUTES, BATCH, VISION_MINUTES
# and FREEZE_VISION, which only the training reads, are then an error):
#   OUT=runs/more INIT=runs/vlm_cifar/tiny_llava/tiny_llava.pt bash run_scripts/vlm_cifar.sh
#   OUT=runs/prune BASE_CHECKPOINT=runs/more/tiny_llava/tiny_llava.pt bash run_scripts/vlm_cifar.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
GIVEN_SIZES="${HIDDEN:+h}${LAYERS:+l}${VISION_LAYERS:+v}${IMAGE_SIZE:+i}"  # with INIT only these are passed on
GIVEN_TRAINING="${MINUTES:+ MINUTES}${BATCH:+ BATCH}${VISION_MINUTES:+ VISION_MINUTES}${FREEZE_VISION:+ FREEZE_VISION}"
case "${FREEZE_VISION:-0}" in
    0) FREEZE_VISION= ;;
    1) ;;
    *) echo "error: FREEZE_VISION=$FREEZE_VISION: 1 (freeze the tower) or 0" >&2; exit 2 ;;
esac
DATA=${DATA:-data}; OUT=${OUT:-runs/vlm_cifar}; MINUTES=${MINUTES:-3.8}; IMAGE_SIZE=${IMAGE_SIZE:-336}
HIDDEN=${HIDDEN:-128}; LAYERS=${LAYERS:-12}; VISION_LAYERS=${VISION_LAYERS:-4}; BATCH=${BATCH:-64}
WORKERS=${WORKERS:-8}; PRUNE_STEPS=${PRUNE_STEPS:-300}; PRUNE_BATCH=${PRUNE_BATCH:-32}
LIMIT=${LIMIT:-1000}; EVAL_BATCH=${EVAL_BATCH:-100}; TRAIN_IMAGES=${TRAIN_IMAGES:-45000}
LAYERS_PRUNED=${LAYERS_PRUNED:-[2,5,8]}; PRUNE_WORKERS=${PRUNE_WORKERS:-4}; PRUNE_IMAGES=${PRUNE_IMAGES:-5000}
# the heads' keep ratios of the T̄ 50 % and 25 % runs (for LAYERS_PRUNED [2,5,8] of 12; [1,2,3] of 4: 0.74 / 0.26)
KEEP50=${KEEP50:-0.78}; KEEP25=${KEEP25:-0.41}; BASELINE_LAYERS=${BASELINE_LAYERS:-2}  # random / FastV drop layer

BASE_CHECKPOINT=${BASE_CHECKPOINT:-}; INIT=${INIT:-}
BUDGETS=${BUDGETS:-t75 t50 t25}  # which pruning runs, in this order (e.g. BUDGETS="t25" for the smallest alone)
for name in $BUDGETS; do
    case "$name" in t75|t50|t25) ;; *) echo "error: BUDGETS: $name is not one of t75 t50 t25" >&2; exit 2 ;; esac
done
if [ -z "${BUDGETS// /}" ]; then echo "error: BUDGETS is empty: name one or more of t75 t50 t25" >&2; exit 2; fi

if [ -n "$BASE_CHECKPOINT" ]; then
    if [ -n "$INIT" ]; then
        echo "error: BASE_CHECKPOINT and INIT: give one (INIT trains, BASE_CHECKPOINT skips training)" >&2; exit 2
    fi
    if [ ! -f "$BASE_CHECKPOINT" ]; then echo "error: BASE_CHECKPOINT $BASE_CHECKPOINT: no such file" >&2; exit 2; fi
    if [ -n "$GIVEN_TRAINING" ]; then
        echo "error: BASE_CHECKPOINT skips the training, so$GIVEN_TRAINING would do nothing: drop them" >&2; exit 2
    fi
    BASE="$BASE_CHECKPOINT"
    echo "pruning $BASE (BASE_CHECKPOINT: no tiny LLaVA training)"
else
    SIZES=()  # a fresh model gets every size; one continued with INIT its own, but for sizes set here (checked)
    if [ -z "$INIT" ] || [[ $GIVEN_SIZES == *h* ]]; then SIZES+=(--hidden_size "$HIDDEN" --vision_hidden_size "$HIDDEN"); fi
    if [ -z "$INIT" ] || [[ $GIVEN_SIZES == *l* ]]; then SIZES+=(--num_layers "$LAYERS"); fi
    if [ -z "$INIT" ] || [[ $GIVEN_SIZES == *v* ]]; then SIZES+=(--vision_layers "$VISION_LAYERS"); fi
    if [ -z "$INIT" ] || [[ $GIVEN_SIZES == *i* ]]; then SIZES+=(--image_size "$IMAGE_SIZE"); fi
    "$PYTHON" train_tiny_llava.py --data "$DATA" --out "$OUT/tiny_llava" --minutes "$MINUTES" --steps 100000 \
        --batch_size "$BATCH" --lr 2e-3 --warmup 200 "${SIZES[@]}" \
        --train_images "$TRAIN_IMAGES" --eval_every 100000 --eval_images "$LIMIT" --val_images 1000 \
        --workers "$WORKERS" --no_progress ${INIT:+--init "$INIT"} \
        ${VISION_MINUTES:+--vision_pretrain_steps 100000 --vision_pretrain_minutes "$VISION_MINUTES"} \
        ${FREEZE_VISION:+--freeze_vision}
    BASE="$OUT/tiny_llava/tiny_llava.pt"
fi

# name, merge ratio, extra keys: T̄ = M (2 + 3r + 3r² + 4r³) / 12 for layers [2, 5, 8] of 12 and head keep ratio r
declare -A SETTINGS=([t75]="0.75" [t50]="0.75 pruner_keep_ratio=$KEEP50 pruner_sparsity_weight=100 lr_pruner=5e-3"
                     [t25]="0.75 pruner_keep_ratio=$KEEP25 pruner_sparsity_weight=100 lr_pruner=5e-3")
for name in $BUDGETS; do
    set -- ${SETTINGS[$name]}
    ratio=$1; shift
    "$PYTHON" train_vlm_pruning.py --config configs/vision_token_pruning.yaml \
        --base_checkpoint "$BASE" data="$DATA" train_images="$PRUNE_IMAGES" steps="$PRUNE_STEPS" \
        batch_size="$PRUNE_BATCH" merge_ratio="$ratio" "pruning_layers=$LAYERS_PRUNED" pruner_d_internal="$HIDDEN" \
        discriminator_d_internal="$HIDDEN" lr_merger=1e-3 lr_pruner=1e-3 save_every="$PRUNE_STEPS" no_wandb=true \
        progress=false workers="$PRUNE_WORKERS" save_dir="$OUT/$name" "$@" ${EXTRA_KEYS:-}
    "$PYTHON" eval_vlm_pruning.py --checkpoint "$(ls "$OUT/$name"/checkpoint_*.pt | tail -1)" --cifar_vqa "$DATA" \
        --modes origin soft hard --baselines random fastv --baseline_layers $BASELINE_LAYERS --limit "$LIMIT" \
        --batch_size "$EVAL_BATCH" \
        --max_new_tokens 3 --no_progress --output "$OUT/eval_$name.json"
done
