"""Milliseconds of the lockstep driver's copies around one fused epoch (training/fused/transfer.py: load_group
before, store_group after): the cells' weights, masks, momentum and running sums into the fused tensors and
back, for N res20s cells with random masks; and how many top-level aten calls one round trip makes (each a
Python call, and on a GPU a kernel launch or more).

    python -m benchmarks.fused_transfer --cells 8 --device cuda --out benchmarks/results/fused_transfer.json
"""
import argparse
import sys
import time
from collections import Counter
from types import SimpleNamespace

import torch

from benchmarks.output import save
from models import create_model, dense_modules
from pruners.base import RoundPlan
from pruners.masks import prunable_weights
from training.fused import FusedTrainStep, fuse_models
from training.fused.transfer import load_group, store_group
from training.step import TrainStep


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


def aten_calls(fused, step, group) -> Counter:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        load_group(fused, step, group)
        store_group(fused, step, group, None, 128)
    return Counter(e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="2,4,8", help="comma-separated cell counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"{'cells':>5} {'ms / epoch':>10} {'aten calls':>10}  ({device}, load_group + store_group)")
    for cells in [int(c) for c in args.cells.split(",")]:
        fused, step, group = make_group(cells, device)
        ms = round_trip_ms(fused, step, group, device, args.repeats)
        calls = aten_calls(fused, step, group)
        rows.append({"cells": cells, "ms_per_epoch": round(ms, 2), "aten_calls": sum(calls.values()),
                     "top_calls": dict(calls.most_common(6))})
        print(f"{cells:>5} {ms:>10.2f} {sum(calls.values()):>10}")
    return save({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "argv": sys.argv[1:], "rows": rows}, args.out)


if __name__ == "__main__":
    sys.exit(main())
