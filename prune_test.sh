#!/usr/bin/env bash
# One-minute smoke run of anchor token pruning with clip_benchmark: a random-weight tiny CLIP
# (open_clip `local-dir:` config, 65 image tokens) on 20 generated images, baseline vs pruned.
# Needs no network, weights or datasets. Fails (non-zero) if a result key or token count is off.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m tokens.smoke --out "$WORK" > /dev/null 2>&1
MODEL="local-dir:$WORK/model" PRETRAINED="" DATASET=wds/cifar10 DATASET_ROOT="$WORK/data" \
    K=4 M=12 ALPHA=0.5 OUT="$WORK/results" EXTRACT=1 \
    "$HERE/prune_compare.sh" --num_workers 0 --no_amp --batch_size 10 --quiet

"$PYTHON" - "$WORK/results" <<'PY'
import json, sys, torch
folder = sys.argv[1]
base, pruned = (json.load(open(f"{folder}/{name}.json")) for name in ("baseline", "pruned"))
for result in (base, pruned):
    missing = {"acc1", "acc5", "mean_per_class_recall"} - set(result["metrics"])
    assert not missing, f"metrics missing {missing}"
assert base["token_pruning"]["tokens_per_block"] == [65, 65, 65], base["token_pruning"]
assert pruned["token_pruning"]["tokens_per_block"] == [65, 17, 17], pruned["token_pruning"]
for result in (base, pruned):  # 20 images in one stream of batches of 10: 2 warm-up batches, no steady ones
    stats = result["token_pruning"]
    assert (stats["warmup_batches"], stats["steady_batches"], stats["partial_batches"]) == (2, 0, 0), stats
attention = torch.load(f"{folder}/pruned_attention.pt", weights_only=True)
assert attention["num_images"] == 20 and attention["kept_positions"][1].shape == (20, 17)
print("prune_test: OK (tokens per block 65,65,65 -> 65,17,17; attention file loads with weights_only=True)")
PY
