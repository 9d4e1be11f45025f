"""Milliseconds of the lockstep driver's copies around one fused epoch (training/fused/transfer.py: load_group
before, store_group after): the cells' weights, masks, momentum and running sums into the fused tensors and
back, for N res20s cells with random masks; and how many aten operators one round trip dispatches (each a
Python-to-C++ call, and on a GPU a kernel launch or more).

    python -m benchmarks.fused_transfer --cells 8 --device cuda --out benchmarks/results/fused_transfer.json
"""
import argparse
import os
import sys
import time
from collections import Counter
from types import SimpleNamespace

import torch

from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.fused_speed import int_list
from benchmarks.output import save
from models import create_model, dense_modules
from pruners.base import RoundPlan
from pruners.masks import prunable_weights
from training.fused import FusedTrainStep, fuse_models
from training.fused.transfer import load_group, store_group
from training.step import TrainStep
from utils.errors import UsageError, run_cli
from utils.writable import PathError, check_writable


def make_group(cells: int, device: torch.device):
    """(fused model, fused step, EpochRequest stand-ins) of `cells` res20s cells, channels_last on CUDA as the
    runner lays them out."""
    group = []
    for seed in range(cells):
        torch.manual_seed(seed)
        model = create_model("res20s", 10).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        weights = prunable_weights(model, exclude=dense_modules(model))
        step = TrainStep(model, weights, device, "none", 0.9, 1e-4, regularized=True, use_graph=False)
        masks = {n: (torch.rand(w.shape, device=device) > 0.5).float() for n, w in weights.items()}
        step.start_round(RoundPlan(train_masks=masks, final_masks=masks, penalty_masks=masks))
        group.append(SimpleNamespace(runner=SimpleNamespace(session=SimpleNamespace(model=model, step=step),
                                                            config=SimpleNamespace(batch_size=128)),
                                     carried=(0, 0), result=None))
    fused = fuse_models([r.runner.session.model for r in group])
    if device.type == "cuda":
        fused.to_channels_last()
    step = FusedTrainStep(fused, group[0].runner.session.step.masked_names, device, "none", 0.9, [1e-4] * cells,
                          regularized=True, use_graph=False)
    return fused, step, group


def round_trip_ms(fused, step, group, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(2):
        load_group(fused, step, group)
        store_group(fused, step, group, None, 128)
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        load_group(fused, step, group)
        store_group(fused, step, group, None, 128)
    sync()
    return 1000 * (time.perf_counter() - started) / repeats


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched while active, by name (e.g. "aten.copy_.default")."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def aten_calls(fused, step, group) -> Counter:
    with OperatorCount() as counter:
        load_group(fused, step, group)
        store_group(fused, step, group, None, 128)
    return counter.counts


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, checked before any work: UsageError naming the flag."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="2,4,8", help="comma-separated cell counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--repeats", type=int, default=10, help="timed round trips (after 2 untimed ones)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    args.cells = int_list("--cells", args.cells, 64)
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: must be at least 1")
    if args.device not in ("cuda", "cpu"):
        raise UsageError(f"--device {args.device!r}: choose cuda or cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here (use --device cpu)")
    try:
        check_writable(args.out, "--out", create_folders=True)
    except PathError as exc:
        raise UsageError(str(exc)) from None
    return args


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    rows = []
    print(f"{'cells':>5} {'ms / epoch':>10} {'aten ops':>10}  ({device}, load_group + store_group)")
    for cells in args.cells:
        fused, step, group = make_group(cells, device)
        ms = round_trip_ms(fused, step, group, device, args.repeats)
        calls = aten_calls(fused, step, group)
        rows.append({"cells": cells, "ms_per_epoch": round(ms, 2), "aten_ops": sum(calls.values()),
                     "top_ops": dict(calls.most_common(6))})
        print(f"{cells:>5} {ms:>10.2f} {sum(calls.values()):>10}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    return save({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "argv": sys.argv[1:], "rows": rows}, args.out)


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)), report=lambda code: None)


if __name__ == "__main__":
    sys.exit(main())
