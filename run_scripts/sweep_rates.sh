#!/usr/bin/env bash
# Sweep the per-round pruning rate for one model (resumable: re-run to continue).
#   ARCH=res20s DATASET=cifar100 EPOCHS=120 bash run_scripts/sweep_rates.sh
source "$(dirname "$0")/common.sh"
ARCH=${ARCH:-res20s}; DATASET=${DATASET:-cifar100}; STRUCT=${STRUCT:-rsst}; EPOCHS=${EPOCHS:-120}
ROUNDS=${ROUNDS:-20}; OUT=${OUT:-runs}
for rate in ${RATES:-0.1 0.2 0.3 0.5}; do
    run_one "$OUT/${DATASET}_${STRUCT}_${ARCH}_rate${rate}" --arch "$ARCH" --dataset "$DATASET" \
        --struct "$STRUCT" --rate "$rate" --epochs "$EPOCHS" --pruning_times "$ROUNDS" "${@}"
done
