"""Issue 15's end-to-end number, measured: the wall-clock time of a real sweep, fused vs one run at a time.

Runs the same `sweep.py` grid (default 3 criteria x 2 rates of res20s, 20 rounds) twice, with short rounds of
`--epochs` epochs each: `--executor fused --fuse N` (the cells as fused groups) and `--executor local` (one cell
after another). Each wall clock covers everything a user waits for: process start, data loading, compilation,
pruning, validation, test and checkpoints. A real sweep trains `--target_epochs` epochs a round; the extra
epochs are added with the measured per-epoch time, as the issue asks: the median `epoch_seconds` of each run's
metrics.jsonl over the epochs that are not the first of their round (a round's first epoch also carries the
round's start, and in a fused group the waits for every cell's pruning and checkpoints, which a longer round
does not repeat; hence `--epochs 2`, the default; at `--epochs 1` all epochs but the run's first are used, an
upper bound), a fused group's being its slowest cell's, since the cells validate in turns after each fused epoch:

    hours(target) = (wall + sum over processes run one after another of
                     rounds x (target_epochs - epochs) x epoch seconds) / 3600

where a fused group is one process (its cells' epochs are one fused epoch) and each local cell its own.

    python -m benchmarks.sweep_wallclock --out benchmarks/results/sweep_wallclock_h200.json -- \\
        --dataset cifar10 --data data
    python -m benchmarks.sweep_wallclock --out /tmp/w.json --rounds 2 --grid rate=0.2,0.3 --target_epochs 3 \\
        -- --dataset synthetic --batch_size 64                            # CPU smoke run, a few minutes
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

from benchmarks.fused_sweep import faster_or_slower
from benchmarks.output import save
from benchmarks.runner_rates import epoch_records, run_dirs
from utils.writable import PathError, check_writable
from utils.cli import parse_config
from utils.errors import UsageError, error_line, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extrapolated_hours(wall_seconds: float, epoch_seconds: Sequence[float], rounds: int, epochs: int,
                       target_epochs: int) -> float:
    """Hours of the sweep at `target_epochs` epochs a round: the measured `wall_seconds` (at `epochs` a round)
    plus rounds x (target_epochs - epochs) x each sequential process's epoch time (`epoch_seconds`, one entry per
    process that ran one after another). Raises ValueError for target_epochs < epochs or no process."""
    if target_epochs < epochs or not epoch_seconds:
        raise ValueError("extrapolated_hours: needs target_epochs >= epochs and at least one process")
    return (wall_seconds + rounds * (target_epochs - epochs) * sum(epoch_seconds)) / 3600


def steady_epoch_seconds(run_dir: str) -> float:
    """Median epoch_seconds of a run's metrics.jsonl over the epochs that are not the first of their round
    (`epoch` > 1); with one epoch a round, over all but the run's first (compilation, graph capture); the
    first's when it is the only one. Raises UsageError naming the file when it has no epoch."""
    records = epoch_records(run_dir)
    later = [r["epoch_seconds"] for r in records if r["epoch"] > 1]
    seconds = [r["epoch_seconds"] for r in records]
    return statistics.median(later or seconds[1:] or seconds)


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


class SweepFailed(Exception):
    """A sweep sweep.py accepted ended with a non-zero exit code (a cell crashed or diverged)."""


def sweep_command(executor: str, args, runner_flags: List[str], dry_run: bool = False) -> List[str]:
    """The sweep.py command of the `executor` sweep (its folder: <root>/wallclock_<executor>)."""
    command = [sys.executable, os.path.join(ROOT, "sweep.py"), *[f"--grid={g}" for g in args.grid],
               "--root", args.root, "--name", f"wallclock_{executor}", "--executor", executor]
    command += ["--dry_run"] if dry_run else []
    command += ["--fuse", str(args.fuse)] if executor == "fused" else ["--parallel", "1"]
    return command + ["--", *runner_flags, "--pruning_times", str(args.rounds), "--epochs", str(args.epochs)]


def check_sweep(executor: str, args, runner_flags: List[str]) -> None:
    """sweep.py --dry_run of the sweep (it writes and launches nothing): UsageError with sweep.py's own line when
    it refuses the grid or the runner flags, before any earlier measurement is removed."""
    done = subprocess.run(sweep_command(executor, args, runner_flags, dry_run=True), cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        line = ((done.stderr or done.stdout).strip().splitlines() or ["no message"])[-1]
        raise UsageError(f"sweep.py refuses the {executor} sweep: {line.removeprefix('error: ')}")


def run_sweep(executor: str, args, runner_flags: List[str]) -> Dict[str, object]:
    """One sweep of the grid with `executor` (the previous one in its folder removed first); its wall clock,
    cells and per-process epoch seconds."""
    sweep_dir = os.path.join(args.root, f"wallclock_{executor}")
    shutil.rmtree(sweep_dir, ignore_errors=True)
    started = time.time()
    done = subprocess.run(sweep_command(executor, args, runner_flags), cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SweepFailed(f"the {executor} sweep failed (exit {done.returncode}): {' | '.join(tail)}")
    cells = run_dirs(sweep_dir)
    epoch = {cell: steady_epoch_seconds(os.path.join(sweep_dir, cell)) for cell in cells}
    # one process per fused group, one per local cell. A fused cell's epoch spans the group's fused epoch and the
    # validations of the cells before it (they take turns): the group's epoch is its longest
    groups = fused_groups(sweep_dir, cells) if executor == "fused" else [[cell] for cell in cells]
    process_seconds = [max(epoch[c] for c in group) for group in groups]
    return {"wall_seconds": wall, "epochs": args.epochs, "cells": len(cells), "processes": len(groups),
            "epoch_seconds_per_process": process_seconds, "epoch_seconds_per_cell": epoch,
            "hours_at_target": extrapolated_hours(wall, process_seconds, args.rounds, args.epochs,
                                                  args.target_epochs)}


def has_flag(flags: Sequence[str], name: str) -> bool:
    """Whether `name` is among runner `flags`, as `--name value` or `--name=value`."""
    return any(flag == name or flag.startswith(name + "=") for flag in flags)


def device_name(runner_flags: Sequence[str]) -> str:
    """What the runs trained on: "cpu" when the runner flags say --device cpu or there is no GPU, else the GPU's
    name (the runner's default device takes CUDA when there is one)."""
    import torch
    if parse_config(list(runner_flags)).device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name()


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="python -m benchmarks.sweep_wallclock --out OUT [options] -- <runner flags>")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--grid", action="append", help="as sweep.py --grid (default criteria=remain,magnitude,l1 "
                                                   "and rate=0.2,0.3)")
    p.add_argument("--rounds", type=int, default=20, help="rounds of each cell (--pruning_times)")
    p.add_argument("--epochs", type=int, default=2, help="epochs a round in the measured sweeps (2: the second "
                                                      "epoch of each round gives the steady epoch time)")
    p.add_argument("--target_epochs", type=int, default=20, help="epochs a round of the sweep extrapolated to")
    p.add_argument("--fuse", type=int, default=8, help="most cells a fused group (sweep.py --fuse)")
    p.add_argument("--executors", default="fused,local", help="sweeps to run: fused, local or both")
    p.add_argument("--root", default="runs", help="where the two sweeps' folders go (wallclock_<executor>)")
    p.add_argument("--merge", metavar="JSON", help="an earlier output of this benchmark, measured with the same "
                                                    "flags, whose sweeps join this one's (e.g. the local sweep "
                                                    "run in another session: --executors fused --merge local.json)")
    args = p.parse_args(argv[:split])
    try:
        check_writable(args.out, "--out", create_folders=True)
    except PathError as exc:
        raise UsageError(str(exc)) from None
    args.root = os.path.abspath(args.root)  # sweep.py runs in the repository: the same folder either way
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
    banned = {"--pruning_times": "--rounds", "--epochs": "--epochs", "--save_dir": "--root", "--resume": "--root"}
    given = [f for f in banned if has_flag(argv[split + 1:], f)]
    if given:
        ours = ", ".join(dict.fromkeys(banned[f] for f in given))
        raise UsageError(f"runner flags: {', '.join(given)} are set by the benchmark (use its {ours})")
    return args, argv[split + 1:]


# what a merged file must have measured alike (not --epochs: each sweep is extrapolated from its own)
SHARED_FLAGS = ("grid", "rounds", "target_epochs", "fuse")
SWEEP_KEYS = ("wall_seconds", "cells", "processes", "epoch_seconds_per_process", "hours_at_target")


def read_merge(path: str) -> dict:
    """An earlier output of this benchmark; UsageError naming the file when it is missing, a folder, or not one."""
    if not os.path.exists(path):
        raise UsageError(f"--merge {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"--merge {path}: is a folder, expected a sweep_wallclock JSON file")
    try:
        with open(path) as handle:
            earlier = json.load(handle)
        sweeps = earlier["sweeps"]
        ok = isinstance(earlier["flags"], dict) and isinstance(earlier["runner_flags"], list) and isinstance(
            earlier["device"], str) and isinstance(sweeps, dict) and all(
            isinstance(s, dict) and all(k in s for k in SWEEP_KEYS) for s in sweeps.values())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--merge {path}: not an output of this benchmark ({type(exc).__name__})") from None
    if not ok:
        raise UsageError(f"--merge {path}: not an output of this benchmark (its sweeps lack {', '.join(SWEEP_KEYS)})")
    return earlier


def merged_sweeps(path: str, flags: dict, runner_flags: List[str], executors: Sequence[str],
                  device: str) -> dict:
    """The earlier output `path` (its sweeps and device), checked to be measured as this run's: SHARED_FLAGS, the
    runner flags (compared as the runner parses them: order does not matter) and the device (when this run
    measures a sweep); UsageError naming the file and what differs, or an executor measured in both."""
    earlier = read_merge(path)
    differ = [key for key in SHARED_FLAGS if earlier["flags"].get(key) != flags[key]]
    try:
        same_runner = parse_config(list(earlier["runner_flags"])) == parse_config(list(runner_flags))
    except UsageError:
        same_runner = False
    differ += [] if same_runner else ["runner flags"]
    differ += ["device"] if executors and earlier["device"] != device else []
    if differ:
        raise UsageError(f"--merge {path}: measured with other {', '.join(differ)} than this run")
    both = sorted(set(earlier["sweeps"]) & set(executors))
    if both:
        raise UsageError(f"--merge {path}: already has the {', '.join(both)} sweep this run measures")
    for sweep in earlier["sweeps"].values():  # files written before sweeps recorded their own --epochs
        sweep.setdefault("epochs", earlier["flags"].get("epochs"))
    return earlier


def run(argv=None) -> int:
    args, runner_flags = parse_args(argv)
    runner_flags = runner_flags or ["--dataset", "cifar10"]
    runner_flags = [*runner_flags, *([] if has_flag(runner_flags, "--arch") else ["--arch", "res20s"]),
                    *([] if "--no_wandb" in runner_flags else ["--no_wandb"])]
    flags = {k: v for k, v in vars(args).items() if k != "out"}
    for executor in args.executors:
        check_sweep(executor, args, runner_flags)
    device, earlier = device_name(runner_flags), {}
    if args.merge:
        merged = merged_sweeps(args.merge, flags, runner_flags, args.executors, device)
        earlier, device = merged["sweeps"], device if args.executors else merged["device"]
    folder = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot create its folder {folder} ({exc.strerror})") from None
    results = {**earlier, **{executor: run_sweep(executor, args, runner_flags) for executor in args.executors}}
    record = {"device": device, "flags": flags, "runner_flags": runner_flags, "sweeps": results}
    print(f"{'executor':8s}  cells  processes  measured wall s ({args.rounds} rounds x epochs)  "
          f"epoch s per process  hours at {args.target_epochs} epochs a round")
    for executor, r in results.items():
        seconds = ", ".join(f"{s:.2f}" for s in r["epoch_seconds_per_process"])
        wall = f"{r['wall_seconds']:.1f} ({r.get('epochs', '?')} epochs a round)"
        print(f"{executor:8s}  {r['cells']:5d}  {r['processes']:9d}  {wall:>36s}  {seconds:>19s}  "
              f"{r['hours_at_target']:.3f}")
    if {"fused", "local"} <= set(results):
        ratio = results["local"]["hours_at_target"] / results["fused"]["hours_at_target"]
        record["fused_speedup"] = ratio
        line = f"fused: {faster_or_slower(ratio)} at {args.target_epochs} epochs a round"
        epochs = {executor: results[executor].get("epochs") for executor in ("fused", "local")}
        if epochs["fused"] == epochs["local"]:
            measured = results["local"]["wall_seconds"] / results["fused"]["wall_seconds"]
            record["fused_speedup_measured"] = measured
            line += f" ({faster_or_slower(measured)} in the measured sweeps)"
        else:  # each extrapolated from its own; a 1-epoch sweep's steady epoch is an upper bound
            record["epochs_differ"] = epochs
            line += (f" (the sweeps were measured at different epochs a round, fused {epochs['fused']}, local "
                     f"{epochs['local']}: their wall clocks are not compared; a 1-epoch sweep's estimate is an "
                     f"upper bound)")
        print(line)
    return save(record, args.out, indent=1)


def main(argv=None) -> int:
    return run_cli(lambda: run(argv), expected=[(SweepFailed, error_line(1))])


if __name__ == "__main__":
    sys.exit(main())
