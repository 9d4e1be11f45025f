#!/usr/bin/env bash
# Issue 15's measurements of fused training (training/fused, docs/fused.md) on one GPU, in one command; JSON and
# logs under $OUT. PARTS picks the parts and their order (default "compile runner sweep table"):
#   compile  8 fused cells at batch 128 against one run, eager and --compile, res20s then vit_tiny
#            (compile.json, compile_vit.json, eager.json): the headline rows of the README's Sweeps table
#   runner   main_imp_fillback.py --fused_grid seed=1..8 against one plain run, res20s, 3 epochs of round 0 on
#            CIFAR-10 in $DATA (runner_fused.log, runner_plain.log, runner.json: the last epoch's images/s per
#            cell and the plain run's, from each run's metrics.jsonl)
#   sweep    the issue's end-to-end number: a real 3 criteria x 2 rates x 20-round res20s sweep.py run fused and
#            one cell at a time, 1 epoch a round, extrapolated to 20 epochs a round with the measured epoch time
#            (benchmarks/sweep_wallclock.py; sweep_wallclock.json; by the runner's rates about 3 minutes fused and
#            7-10 one at a time on an H100). SWEEP_EXECUTORS=local (or fused) runs one of the two, and
#            MERGE=<an earlier sweep_wallclock.json> adds the other's measurement (two calls of a 10-minute limit)
#   table    1, 2, 4, 8, 16 fused cells at batch 128 and 512 next to one run and N separate processes, with the
#            3 criteria x 2 rates x 20-round sweep estimate (table.json; the longest part)
#   OUT=benchmarks/results/fused_h200 bash run_scripts/fused_bench.sh
#   OUT=/tmp/f DEVICE=cpu DATASET=synthetic PARTS="compile runner" bash run_scripts/fused_bench.sh   # CPU smoke run
# The run dirs of the runner and sweep parts go under $RUNS (default runs/fused_bench_runs), not $OUT.
# STEPS / WARMUP: timed and untimed steps per row (default 15 / 3); EPOCHS: the runner's epochs (default 3). The CPU
# smoke run takes 2 cells of 8 images, eager, and a small test ViT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/fused_bench}; RUNS=${RUNS:-runs/fused_bench_runs}; DEVICE=${DEVICE:-cuda}
PARTS=${PARTS:-compile runner sweep table}
DATA=${DATA:-data}; DATASET=${DATASET:-cifar10}; STEPS=${STEPS:-15}; WARMUP=${WARMUP:-3}; EPOCHS=${EPOCHS:-3}
case "$DEVICE" in
    cuda|cpu) ;;
    *) echo "error: DEVICE=$DEVICE: cuda or cpu" >&2; exit 2 ;;
esac
[ -n "${PARTS// /}" ] || { echo "error: PARTS is empty: name one or more of compile runner sweep table" >&2; exit 2; }
for part in $PARTS; do
    case "$part" in
        compile|runner|sweep|table) ;;
        *) echo "error: PARTS: $part is not one of compile runner sweep table" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
SPEED=("$PYTHON" -m benchmarks.fused_speed --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP")
# the headline rows: 8 cells at batch 128, compiled; a CPU smoke run takes 2 cells of 8 images, eager, a test ViT
# (BATCH overrides the per-cell batch size of the compile and runner parts)
CELLS=8 COMPILE=--compile VIT=vit_tiny; BATCH=${BATCH:-128}
[ "$DEVICE" = cpu ] && CELLS=2 COMPILE= VIT=test_vit BATCH=${BATCH/#128/8}

for part in $PARTS; do
    echo "== $part"
    case "$part" in
    compile)
        row=(--cells "$CELLS" --batch_sizes "$BATCH" --max_processes 1)
        "${SPEED[@]}" --archs res20s "${row[@]}" --out "$OUT/eager.json"
        "${SPEED[@]}" --archs res20s "${row[@]}" $COMPILE --out "$OUT/compile.json"
        "${SPEED[@]}" --archs "$VIT" "${row[@]}" $COMPILE --fused_route grouped --out "$OUT/compile_vit.json" ;;
    runner)
        common=(--dataset "$DATASET" --data "$DATA" --arch res20s --pruning_times 1 --epochs "$EPOCHS" --rate 0.2
                --batch_size "$BATCH" --no_wandb --print_freq 50)
        rm -rf "$RUNS/runner"
        "$PYTHON" main_imp_fillback.py "${common[@]}" --seed 1 --save_dir "$RUNS/runner/plain" \
            > "$OUT/runner_plain.log" 2>&1
        "$PYTHON" main_imp_fillback.py "${common[@]}" --save_dir "$RUNS/runner/fused" \
            --fused_grid seed=1,2,3,4,5,6,7,8 > "$OUT/runner_fused.log" 2>&1
        "$PYTHON" - "$OUT" "$RUNS" <<'EOF'
import json, pathlib, sys
out, runs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def last_rate(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["images_per_second"] for r in records if "images_per_second" in r][-1]
plain = last_rate(runs / "runner" / "plain")
cells = {d.name: last_rate(d) for d in sorted((runs / "runner" / "fused").iterdir()) if (d / "metrics.jsonl").exists()}
summary = {"plain_images_per_second": plain, "cells_images_per_second": cells,
           "fused_images_per_second": sum(cells.values()), "fused_over_plain": sum(cells.values()) / plain}
(out / "runner.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"runner: one run {plain:,.0f} img/s, {len(cells)} fused cells {sum(cells.values()):,.0f} img/s "
      f"({sum(cells.values()) / plain:.2f}x), last epoch")
EOF
        ;;
    sweep)
        sweep=(); [ "$DEVICE" = cpu ] && sweep=(--rounds 1 --grid rate=0.2,0.3 --target_epochs 3)
        [ -n "${MERGE:-}" ] && sweep+=(--merge "$MERGE")
        "$PYTHON" -m benchmarks.sweep_wallclock --out "$OUT/sweep_wallclock.json" --root "$RUNS/sweeps" "${sweep[@]}" \
            --executors "${SWEEP_EXECUTORS:-fused,local}" \
            -- --dataset "$DATASET" --data "$DATA" --batch_size "$BATCH" ;;
    table)
        table=(--archs res20s,vit_tiny --cells 1,2,4,8,16 --batch_sizes 128,512 --max_processes 8)
        [ "$DEVICE" = cpu ] && table=(--archs res20s,test_vit --cells 1,2 --batch_sizes 8 --max_processes 2)
        "${SPEED[@]}" "${table[@]}" --sweep_estimate --out "$OUT/table.json" ;;
    esac
done
