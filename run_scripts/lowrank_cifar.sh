#!/usr/bin/env bash
# Issue 12 item 6 on CIFAR-10: (1) vit_tiny over 5 rounds at --rate 0.3 twice, --struct lowrank (truncated SVD
# of every block Linear) and the head-level structured run (--struct refill --vit_structured: heads + MLP
# neurons), the two at about the same parameter count per round, run side by side on one GPU; (2) the feature
# cache of the dense round-0 vit_tiny ([65, 192] per image), the three learned factorisations on it and the
# ratio table against truncated SVD / PCA / random projection. Outputs under $OUT.
#   DATA=data OUT=runs/lowrank_cifar bash run_scripts/lowrank_cifar.sh    # under 6 min 22 s on one H200
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-data}; OUT=${OUT:-runs/lowrank_cifar}; DATASET=${DATASET:-cifar10}; EPOCHS=${EPOCHS:-15}
ARCH=${ARCH:-vit_tiny}; IMAGES=${IMAGES:-10000}; LR_EPOCHS=${LR_EPOCHS:-30}; RANK=${RANK:-32}

common=(--arch "$ARCH" --dataset "$DATASET" --data "$DATA" --rate 0.3 --pruning_times 5 --epochs "$EPOCHS"
        --lr 0.05 --weight_decay 5e-4 --warmup "${WARMUP:-2}" --batch_size 128 --prune_type pt --no_wandb ${RUN_FLAGS:-})
"$PYTHON" main_imp_fillback.py "${common[@]}" --struct refill --vit_structured --save_dir "$OUT/heads" \
    > "$OUT.heads.log" 2>&1 &
heads=$!
"$PYTHON" main_imp_fillback.py "${common[@]}" --struct lowrank --save_dir "$OUT/lowrank" > "$OUT.lowrank.log" 2>&1 &
lowrank=$!
# the feature work needs only the dense round 0 of the head-level run: it overlaps the later rounds
until [ -f "$OUT/heads/0checkpoint.pth.tar" ] || ! kill -0 $heads 2>/dev/null; do sleep 2; done
"$PYTHON" extract_features.py --encoder "runner:$OUT/heads/0checkpoint.pth.tar" --dataset "$DATASET" --data "$DATA" \
    --out "$OUT/cache" --limit "$IMAGES" --dtype float32 --no_progress
for arch in ResMLP MLP; do
    "$PYTHON" train_lowrank.py --arch $arch --features "$OUT/cache" --epochs "$LR_EPOCHS" --rank "$RANK" \
        --batch_size 64 --lr 1e-3 --results_dir "$OUT/results"
done
"$PYTHON" train_lowrank.py --arch AdaLoRA --features "$OUT/cache" --epochs "$LR_EPOCHS" --rank $((2 * RANK)) \
    --batch_size 64 --lr 1e-3 --use_rank_allocator --allocator_keep_ratio 0.5 --results_dir "$OUT/results"
"$PYTHON" compare_svd_nn.py --features "$OUT/cache" --results_dir "$OUT/results" --ranks 8 16 32 64 \
    --device "${COMPARE_DEVICE:-cuda}" --out "$OUT/compare_svd_nn.json"
status=0
wait $heads || status=$?
wait $lowrank || status=$?
tail -n 3 "$OUT.heads.log" "$OUT.lowrank.log"
exit $status
