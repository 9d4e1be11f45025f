#!/usr/bin/env bash
# Head-level RSST on ViT-Tiny: every criteria x rate (the sweep from the RSST experiments; resumable).
#   DATASET=cifar100 bash run_scripts/sweep_criteria.sh
source "$(dirname "$0")/common.sh"
DATASET=${DATASET:-cifar100}; EPOCHS=${EPOCHS:-80}; ROUNDS=${ROUNDS:-20}; OUT=${OUT:-runs}
for rate in ${RATES:-0.3 0.5}; do
    for c in ${CRITERIA:-remain magnitude l1 l2 saliency}; do
        run_one "$OUT/${DATASET}_rsst_vit_head${rate}_${c}" --arch vit_tiny --dataset "$DATASET" --struct rsst \
            --vit_structured --criteria "$c" --rate "$rate" --epochs "$EPOCHS" --pruning_times "$ROUNDS" \
            --RST_schedule exp_custom_exponents --exponents 4 --reg_granularity_prune 1.0 "${@}"
    done
done
