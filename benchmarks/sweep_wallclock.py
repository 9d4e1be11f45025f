"""Issue 15's end-to-end number, measured: the wall-clock time of a real sweep, fused vs one run at a time.

Runs the same `sweep.py` grid (default 3 criteria x 2 rates of res20s, 20 rounds) twice, with short rounds of
`--epochs` epochs each: `--executor fused --fuse N` (the cells as fused groups) and `--executor local` (one cell
after another). Each wall clock covers everything a user waits for: process start, data loading, compilation,
pruning, validation, test and checkpoints. A real sweep trains `--target_epochs` epochs a round; the extra
epochs are added with the measured per-epoch time (the median `epoch_seconds` of each run's metrics.jsonl, its
first epoch left out: it carries compilation and graph capture; a fused group's is its slowest cell's, since
the cells validate in turns after each fused epoch), as the issue asks:

    hours(target) = (wall + sum over processes run one after another of
                     rounds x (target_epochs - epochs) x epoch seconds) / 3600

where a fused group is one process (its cells' epochs are one fused epoch) and each local cell its own.

    python -m benchmarks.sweep_wallclock --out benchmarks/results/sweep_wallclock_h200.json -- \\
        --dataset cifar10 --data data
    python -m benchmarks.sweep_wallclock --out /tmp/w.json --rounds 2 --grid rate=0.2,0.3 --target_epochs 3 \\
        -- --dataset synthetic --batch_size 64                            # CPU smoke run, about 3 minutes
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Sequence

from benchmarks.output import save
from utils.errors import UsageError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extrapolated_hours(wall_seconds: float, epoch_seconds: Sequence[float], rounds: int, epochs: int,
                       target_epochs: int) -> float:
    """Hours of the sweep at `target_epochs` epochs a round: the measured `wall_seconds` (at `epochs` a round)
    plus rounds x (target_epochs - epochs) x each sequential process's epoch time (`epoch_seconds`, one entry per
    process that ran one after another). Raises ValueError for target_epochs < epochs or no process."""
    if target_epochs < epochs or not epoch_seconds:
        raise ValueError("extrapolated_hours: needs target_epochs >= epochs and at least one process")
    return (wall_seconds + rounds * (target_epochs - epochs) * sum(epoch_seconds)) / 3600


def steady_epoch_seconds(metrics_path: str) -> float:
    """Median epoch_seconds of a run's metrics.jsonl without its first epoch (compilation, graph capture);
    the first epoch's when it is the only one. Raises UsageError naming the file when it has no epoch."""
    with open(metrics_path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    seconds = [r["epoch_seconds"] for r in records if r.get("type") == "epoch"]
    if not seconds:
        raise UsageError(f"{metrics_path}: no epoch record (did the run train?)")
    return statistics.median(seconds[1:] or seconds)


def fused_groups(sweep_dir: str, cells: Sequence[str]) -> List[List[str]]:
    """The cells (run dir names) of each process a fused sweep ran: the groups sweep.py wrote to
    `<sweep_dir>/fused/<group>.json` (each member's `--save_dir`), and every other cell alone."""
    folder, groups = os.path.join(sweep_dir, "fused"), []
    names = sorted(n for n in os.listdir(folder) if not n.endswith(".results.json")) if os.path.isdir(folder) else []
    for name in names:
        with open(os.path.join(folder, name)) as handle:
            commands = json.load(handle)["cells"]
        groups.append([os.path.basename(c[c.index("--save_dir") + 1].rstrip("/")) for c in commands])
    grouped = {cell for group in groups for cell in group}
    return groups + [[cell] for cell in cells if cell not in grouped]


def run_sweep(executor: str, args, runner_flags: List[str]) -> Dict[str, object]:
    """One sweep of the grid with `executor`; its wall clock, cells and per-process epoch seconds."""
    name = f"wallclock_{executor}"
    shutil.rmtree(os.path.join(args.root, name), ignore_errors=True)
    command = [sys.executable, os.path.join(ROOT, "sweep.py"), *[f"--grid={g}" for g in args.grid],
               "--root", args.root, "--name", name, "--executor", executor]
    command += ["--fuse", str(args.fuse)] if executor == "fused" else ["--parallel", "1"]
    command += ["--", *runner_flags, "--pruning_times", str(args.rounds), "--epochs", str(args.epochs)]
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise UsageError(f"the {executor} sweep failed (exit {done.returncode}): {' | '.join(tail)}")
    sweep_dir = os.path.join(args.root, name)
    cells = sorted(d for d in os.listdir(sweep_dir) if os.path.isfile(os.path.join(sweep_dir, d, "metrics.jsonl")))
    epoch = {cell: steady_epoch_seconds(os.path.join(sweep_dir, cell, "metrics.jsonl")) for cell in cells}
    # one process per fused group, one per local cell. A fused cell's epoch spans the group's fused epoch and the
    # validations of the cells before it (they take turns): the group's epoch is its longest
    groups = fused_groups(sweep_dir, cells) if executor == "fused" else [[cell] for cell in cells]
    process_seconds = [max(epoch[c] for c in group) for group in groups]
    return {"wall_seconds": wall, "cells": len(cells), "processes": len(groups),
            "epoch_seconds_per_process": process_seconds, "epoch_seconds_per_cell": epoch,
            "hours_at_target": extrapolated_hours(wall, process_seconds, args.rounds, args.epochs,
                                                  args.target_epochs)}


def device_name() -> str:
    """The GPU the runs trained on (the runner takes CUDA when there is one), else "cpu"."""
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="python -m benchmarks.sweep_wallclock --out OUT [options] -- <runner flags>")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--grid", action="append", help="as sweep.py --grid (default criteria=remain,magnitude,l1 "
                                                   "and rate=0.2,0.3)")
    p.add_argument("--rounds", type=int, default=20, help="rounds of each cell (--pruning_times)")
    p.add_argument("--epochs", type=int, default=1, help="epochs a round in the measured sweeps")
    p.add_argument("--target_epochs", type=int, default=20, help="epochs a round of the sweep extrapolated to")
    p.add_argument("--fuse", type=int, default=8, help="most cells a fused group (sweep.py --fuse)")
    p.add_argument("--executors", default="fused,local", help="sweeps to run: fused, local or both")
    p.add_argument("--root", default="runs", help="where the two sweeps' folders go (wallclock_<executor>)")
    p.add_argument("--merge", metavar="JSON", help="an earlier output of this benchmark, measured with the same "
                                                    "flags, whose sweeps join this one's (e.g. the local sweep "
                                                    "run in another session: --executors fused --merge local.json)")
    args = p.parse_args(argv[:split])
    args.grid = args.grid or ["criteria=remain,magnitude,l1", "rate=0.2,0.3"]
    args.executors = [e for e in args.executors.split(",") if e]
    for flag in ("rounds", "epochs", "fuse"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.target_epochs < args.epochs:
        raise UsageError(f"--target_epochs {args.target_epochs}: must be at least --epochs ({args.epochs})")
    unknown = [e for e in args.executors if e not in ("fused", "local")]
    if unknown or not (args.executors or args.merge):
        raise UsageError(f"--executors {','.join(args.executors)}: choose fused, local or fused,local")
    banned = [f for f in ("--pruning_times", "--epochs", "--save_dir", "--resume")
              if any(given == f or given.startswith(f + "=") for given in argv[split + 1:])]
    if banned:
        raise UsageError(f"runner flags: {', '.join(banned)} are set by the benchmark (--rounds, --epochs)")
    return args, argv[split + 1:]


SHARED_FLAGS = ("grid", "rounds", "epochs", "target_epochs", "fuse")  # what a merged file must have measured alike


def merged_sweeps(path: str, flags: dict, runner_flags: List[str], executors: Sequence[str]) -> Dict[str, dict]:
    """The sweeps of an earlier output `path`, checked to be measured as this run's (SHARED_FLAGS and the runner
    flags); UsageError naming the file and what differs, or an executor measured in both."""
    try:
        with open(path) as handle:
            earlier = json.load(handle)
        sweeps, their_flags, their_runner = earlier["sweeps"], earlier["flags"], earlier["runner_flags"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--merge {path}: not an output of this benchmark ({type(exc).__name__})") from None
    differ = [key for key in SHARED_FLAGS if their_flags.get(key) != flags[key]]
    differ += ["runner flags"] if their_runner != runner_flags else []
    if differ:
        raise UsageError(f"--merge {path}: measured with other {', '.join(differ)} than this run")
    both = sorted(set(sweeps) & set(executors))
    if both:
        raise UsageError(f"--merge {path}: already has the {', '.join(both)} sweep this run measures")
    return sweeps


def run(argv=None) -> int:
    args, runner_flags = parse_args(argv)
    runner_flags = runner_flags or ["--dataset", "cifar10"]
    runner_flags = [*runner_flags, *([] if "--arch" in runner_flags else ["--arch", "res20s"]), "--no_wandb"]
    flags = {k: v for k, v in vars(args).items() if k != "out"}
    earlier = merged_sweeps(args.merge, flags, runner_flags, args.executors) if args.merge else {}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = {**earlier, **{executor: run_sweep(executor, args, runner_flags) for executor in args.executors}}
    record = {"device": device_name(), "flags": flags, "runner_flags": runner_flags, "sweeps": results}
    print(f"{'executor':8s}  cells  processes  measured wall s ({args.rounds} rounds x {args.epochs} epochs)  "
          f"epoch s per process  hours at {args.target_epochs} epochs a round")
    for executor, r in results.items():
        seconds = ", ".join(f"{s:.2f}" for s in r["epoch_seconds_per_process"])
        print(f"{executor:8s}  {r['cells']:5d}  {r['processes']:9d}  {r['wall_seconds']:38.1f}  {seconds:>19s}  "
              f"{r['hours_at_target']:.3f}")
    if {"fused", "local"} <= set(results):
        ratio = results["local"]["hours_at_target"] / results["fused"]["hours_at_target"]
        record["fused_speedup"] = ratio
        measured = results["local"]["wall_seconds"] / results["fused"]["wall_seconds"]
        record["fused_speedup_measured"] = measured
        print(f"fused: {ratio:.2f}x faster at {args.target_epochs} epochs a round ({measured:.2f}x in the measured "
              f"sweeps)")
    return save(record, args.out, indent=1)


def main(argv=None) -> int:
    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
