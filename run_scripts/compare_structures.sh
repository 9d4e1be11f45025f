#!/usr/bin/env bash
# Unstructured vs head-level RSST on ViT-Tiny, and ResNet-20 vs ViT-Tiny, at one rate (resumable);
# then one report over all of them.
source "$(dirname "$0")/common.sh"
DATASET=${DATASET:-cifar100}; RATE=${RATE:-0.3}; EPOCHS=${EPOCHS:-80}; ROUNDS=${ROUNDS:-20}; OUT=${OUT:-runs}
common=(--dataset "$DATASET" --rate "$RATE" --epochs "$EPOCHS" --pruning_times "$ROUNDS")
rsst=(--struct rsst --criteria magnitude)  # --struct none reads no --criteria (the runner refuses it there)
run_one "$OUT/${DATASET}_none_vit_rate${RATE}" --arch vit_tiny --struct none "${common[@]}" "${@}"
run_one "$OUT/${DATASET}_rsst_vit_unstructured_rate${RATE}" --arch vit_tiny "${rsst[@]}" "${common[@]}" "${@}"
run_one "$OUT/${DATASET}_rsst_vit_head_rate${RATE}" --arch vit_tiny "${rsst[@]}" --vit_structured "${common[@]}" "${@}"
run_one "$OUT/${DATASET}_rsst_res20s_rate${RATE}" --arch res20s "${rsst[@]}" "${common[@]}" "${@}"
"$PYTHON" report_runs.py "$OUT" --out "$OUT/report"
