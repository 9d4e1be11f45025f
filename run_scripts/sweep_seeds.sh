#!/usr/bin/env bash
# The same experiment over several seeds (resumable).
#   SEEDS="1 2 3" ARCH=vit_tiny bash run_scripts/sweep_seeds.sh --vit_structured --criteria magnitude
source "$(dirname "$0")/common.sh"
ARCH=${ARCH:-res20s}; DATASET=${DATASET:-cifar100}; STRUCT=${STRUCT:-rsst}; RATE=${RATE:-0.3}
EPOCHS=${EPOCHS:-80}; ROUNDS=${ROUNDS:-20}; OUT=${OUT:-runs}
for seed in ${SEEDS:-1 2 3}; do
    run_one "$OUT/${DATASET}_${STRUCT}_${ARCH}_rate${RATE}_seed${seed}" --arch "$ARCH" --dataset "$DATASET" \
        --struct "$STRUCT" --rate "$RATE" --seed "$seed" --epochs "$EPOCHS" --pruning_times "$ROUNDS" "${@}"
done
