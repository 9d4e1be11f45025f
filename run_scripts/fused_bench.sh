#!/usr/bin/env bash
# Issue 15's measurements of fused training (training/fused, docs/fused.md) on one GPU, in one command; JSON and
# logs under $OUT, the run dirs of the runner and sweep parts under $RUNS (default runs/fused_bench_runs; each
# run of a part replaces its own). PARTS picks the parts and their order (default "compile kernels runner sweep
# table"):
#   compile  8 fused cells at batch 128 against one run: res20s eager (eager.json) and compiled (compile.json),
#            vit_tiny on the grouped route compiled (compile_vit.json): the headline rows of the README's table
#   kernels  the same res20s row with the convolutions tuned among cuDNN's layouts only (kernels_cudnn*.json) and
#            with the Triton grouped kernels too (kernels_tuned*.json), eager and compiled; and the driver's copies
#            around an epoch for 2, 4, 8 cells (transfer.json, benchmarks/fused_transfer.py)
#   runner   main_imp_fillback.py --fused_grid seed=1..8 against one plain run, res20s, EPOCHS epochs of round 0
#            on $DATASET in $DATA (runner_plain.log, runner_fused.log; runner.json: the last epoch's images/s of
#            each cell and of the plain run, benchmarks/runner_rates.py)
#   sweep    the issue's end-to-end number: a real 3 criteria x 2 rates x 20-round res20s sweep.py run fused and
#            one cell at a time, 2 epochs a round, extrapolated to 20 epochs a round with the steady epoch time
#            (benchmarks/sweep_wallclock.py; sweep_wallclock.json; H100, 1 epoch a round: 2.4 minutes fused, 4.5
#            one at a time; the second epochs add about 1 and 1.7 minutes by the measured epoch times).
#            SWEEP_EXECUTORS=local (or fused) runs one of the two, and MERGE=<an earlier sweep_wallclock.json>
#            adds the other's measurement (two calls of a 10-minute limit)
#   table    1, 2, 4, 8, 16 fused cells at batch 128 and 512 next to one run and N separate processes, with the
#            training-only sweep estimate (table.json; the longest part)
#   OUT=benchmarks/results/fused_h200 bash run_scripts/fused_bench.sh
#   OUT=/tmp/f DEVICE=cpu DATASET=synthetic PARTS="compile runner" bash run_scripts/fused_bench.sh   # CPU smoke run
# STEPS / WARMUP: timed and untimed steps of each benchmark row (default 15 / 3); EPOCHS: the runner part's epochs
# (default 3); BATCH: the per-cell batch size of the compile, runner and sweep parts (default 128). DEVICE=cpu is a
# smoke run on any machine (about 4 minutes on 2 cores for "compile runner"): 2 cells, eager, a small test ViT,
# batch 64, 1 epoch. Relative paths are taken from where the script is called.
set -euo pipefail
fail() { echo "error: $*" >&2; exit 2; }
[ $# -eq 0 ] || fail "fused_bench.sh takes no arguments (settings are environment variables: OUT, PARTS, ...)"
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
OUT=$(absolute "${OUT:-runs/fused_bench}"); RUNS=$(absolute "${RUNS:-runs/fused_bench_runs}")
DATA=$(absolute "${DATA:-data}"); MERGE=${MERGE:+$(absolute "$MERGE")}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}; DATASET=${DATASET:-cifar10}; PARTS=${PARTS-compile kernels runner sweep table}
case "$DEVICE" in
    cuda) CELLS=8 COMPILE=--compile VIT=vit_tiny; BATCH=${BATCH:-128}; EPOCHS=${EPOCHS:-3} ;;
    cpu) CELLS=2 COMPILE= VIT=test_vit; BATCH=${BATCH:-64}; EPOCHS=${EPOCHS:-1} ;;
    *) fail "DEVICE=$DEVICE: cuda or cpu" ;;
esac
STEPS=${STEPS:-15}; WARMUP=${WARMUP:-3}; SWEEP_EXECUTORS=${SWEEP_EXECUTORS:-fused,local}
[ -n "${PARTS// /}" ] || fail "PARTS is empty: name one or more of compile kernels runner sweep table"
for part in $PARTS; do
    case "$part" in
        compile|kernels|runner|sweep|table) ;;
        *) fail "PARTS: $part is not one of compile kernels runner sweep table" ;;
    esac
done
for name in STEPS BATCH EPOCHS; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || fail "$name=${!name}: a positive whole number"
done
[[ "$WARMUP" =~ ^[0-9]+$ ]] || fail "WARMUP=$WARMUP: a whole number"
case "$SWEEP_EXECUTORS" in
    fused|local|fused,local|local,fused) ;;
    *) fail "SWEEP_EXECUTORS=$SWEEP_EXECUTORS: fused, local or fused,local" ;;
esac
[ -z "$MERGE" ] || [ -f "$MERGE" ] || fail "MERGE=$MERGE: no such file"
runner=(--dataset "$DATASET" --data "$DATA" --arch res20s --batch_size "$BATCH" --device "$DEVICE" --no_wandb)
if [[ " $PARTS " == *" runner "* ]]; then  # the runner's own checks of its flags, before any run dir is replaced
    "$PYTHON" -c 'import sys; from utils.cli import parse_config; from utils.errors import run_cli
sys.exit(run_cli(lambda: parse_config(sys.argv[1:])))' "${runner[@]}" --epochs "$EPOCHS" --pruning_times 1 \
        || fail "the runner part's flags (DATASET, DATA, BATCH, EPOCHS) were refused, see the line above"
fi
mkdir -p "$OUT"
SPEED=("$PYTHON" -m benchmarks.fused_speed --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP")

run_logged() {  # run_logged LOG COMMAND...: the command's output into LOG; on failure its last line on stderr
    local log=$1; shift
    "$@" > "$log" 2>&1 || { local code=$?; echo "error: $(tail -n 1 "$log") (log: $log)" >&2; exit $code; }
}

for part in $PARTS; do
    echo "== $part"
    case "$part" in
    compile)
        row=(--cells "$CELLS" --batch_sizes "$BATCH" --max_processes 1)
        "${SPEED[@]}" --archs res20s "${row[@]}" --out "$OUT/eager.json"
        "${SPEED[@]}" --archs res20s "${row[@]}" $COMPILE --out "$OUT/compile.json"
        "${SPEED[@]}" --archs "$VIT" "${row[@]}" $COMPILE --fused_route grouped --out "$OUT/compile_vit.json" ;;
    kernels)
        row=(--archs res20s --cells "$CELLS" --batch_sizes "$BATCH" --max_processes 1)
        for layout in cudnn tuned; do
            "${SPEED[@]}" "${row[@]}" --conv_layout "$layout" --out "$OUT/kernels_$layout.json"
            [ -z "$COMPILE" ] || "${SPEED[@]}" "${row[@]}" --conv_layout "$layout" $COMPILE \
                --out "$OUT/kernels_${layout}_compile.json"
        done
        "$PYTHON" -m benchmarks.fused_transfer --cells 2,4,8 --device "$DEVICE" --out "$OUT/transfer.json" ;;
    runner)
        rm -rf "$RUNS/runner"
        flags=("${runner[@]}" --pruning_times 1 --epochs "$EPOCHS" --rate 0.2 --print_freq 50)
        run_logged "$OUT/runner_plain.log" "$PYTHON" main_imp_fillback.py "${flags[@]}" --seed 1 \
            --save_dir "$RUNS/runner/plain"
        run_logged "$OUT/runner_fused.log" "$PYTHON" main_imp_fillback.py "${flags[@]}" \
            --save_dir "$RUNS/runner/fused" --fused_grid "seed=$(seq -s, 1 "$CELLS")"
        "$PYTHON" -m benchmarks.runner_rates --plain "$RUNS/runner/plain" --fused "$RUNS/runner/fused" \
            --out "$OUT/runner.json" ;;
    sweep)
        sweep=(--executors "$SWEEP_EXECUTORS"); [ -n "$MERGE" ] && sweep+=(--merge "$MERGE")
        [ "$DEVICE" = cpu ] && sweep+=(--rounds 1 --grid rate=0.2,0.3 --target_epochs 3)
        "$PYTHON" -m benchmarks.sweep_wallclock --out "$OUT/sweep_wallclock.json" --root "$RUNS/sweeps" \
            "${sweep[@]}" -- "${runner[@]}" ;;
    table)
        table=(--archs res20s,vit_tiny --cells 1,2,4,8,16 --batch_sizes 128,512 --max_processes 8)
        [ "$DEVICE" = cpu ] && table=(--archs res20s,test_vit --cells 1,2 --batch_sizes 8 --max_processes 2)
        "${SPEED[@]}" "${table[@]}" --sweep_estimate --out "$OUT/table.json" ;;
    esac
done
