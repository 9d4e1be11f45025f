#!/usr/bin/env bash
# Baseline vs training-free anchor token pruning (SPEC section 4), zero-shot with clip_benchmark,
# then one table: accuracy, image-encoder images/s (steady state, and all batches with the warm-up) and
# tokens per block side by side. Offline CIFAR-10: python -m tokens.wds_data --cifar10_npz ... --out DIR
# writes a 16-shard set (clip_benchmark's default 4 loader workers each need a shard).
#
#   MODEL=ViT-B-32 PRETRAINED=openai DATASET=cifar10 DATASET_ROOT=data ./prune_compare.sh
#   MODEL=ViT-B-16 PRETRAINED=openai DATASET=wds/cifar10 DATASET_ROOT=data/wds_cifar10 K=10 M=50 ./prune_compare.sh --batch_size 256
#
# Settings (environment): MODEL, PRETRAINED (empty string: random weights), DATASET, DATASET_ROOT,
# K, M, ALPHA, START_BLOCK, OUT (result folder), EXTRACT=1 (also save the pruned run's CLS attention),
# PYTHON. Extra arguments go to both runs (any clip_benchmark eval flag).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-ViT-B-32}"
PRETRAINED="${PRETRAINED-openai}"
DATASET="${DATASET:-cifar10}"
DATASET_ROOT="${DATASET_ROOT:-data}"
K="${K:-10}"
M="${M:-50}"
ALPHA="${ALPHA:-0.5}"
START_BLOCK="${START_BLOCK:-1}"
OUT="${OUT:-prune_compare_results}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p "$OUT"
common=(--model "$MODEL" --pretrained "$PRETRAINED" --dataset "$DATASET" --dataset_root "$DATASET_ROOT"
        --task zeroshot_classification "$@")
pruned=(--enable_pruning --k_anchors "$K" --top_m "$M" --alpha "$ALPHA" --start_block "$START_BLOCK")
if [[ "${EXTRACT:-0}" == 1 ]]; then
    pruned+=(--extract_attention --attention_output "$OUT/pruned_attention.pt")
fi

echo "== baseline: $MODEL ($PRETRAINED) on $DATASET"
"$PYTHON" "$HERE/clip_prune.py" "${common[@]}" --output "$OUT/baseline.json"
echo "== pruned: k_anchors=$K top_m=$M alpha=$ALPHA start_block=$START_BLOCK"
"$PYTHON" "$HERE/clip_prune.py" "${common[@]}" "${pruned[@]}" --output "$OUT/pruned.json"
echo
"$PYTHON" -m tokens.report "$OUT/baseline.json" "$OUT/pruned.json"
