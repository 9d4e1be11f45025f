"""Training images/s of N fused cells (training/fused) vs one run vs N processes of one run, on one GPU.

For each arch and batch size: one plain run (benchmarks/train_steps.py: the runner's TrainStep, CUDA
graph, bf16, channels_last for convnets, --compile), then N = --cells cells fused into one model and one
FusedTrainStep (HFTA, Wang et al., MLSys 2021: one grouped-conv model, each conv in its faster layout with
--conv_layout tuned, or a vmapped one), then N separate processes of the plain run started together on the
same GPU (benchmarks/concurrent.py). Data: uint8 CIFAR-shaped images drawn on the device (a pool of 4
batches per cell), normalised each step (the loader's crop and flip are left out); 80 % of each cell's
prunable weights masked. Each timing: warm-up steps (the first captures the graph), then timed steps
between two torch.cuda.synchronize calls.

    python -m benchmarks.fused_speed --out benchmarks/results/fused_speed_h200.json --sweep_estimate
    python -m benchmarks.fused_speed --out /tmp/f.json --device cpu --steps 3 --warmup 1 --cells 1,2 \\
        --batch_sizes 8 --archs res20s,test_vit                                    # CPU smoke run
"""
import argparse
import gc
import json
import os
import sys
import time
from collections import Counter
from typing import Callable, Dict, List, Optional

import torch

from benchmarks import concurrent
from benchmarks.fused_sweep import sweep_estimates
from benchmarks.fused_table import add_big_batch, table, targets
from benchmarks.output import save
from benchmarks.train_steps import MOMENTUM, WEIGHT_DECAY, plain_step, random_masks
from data import DATASETS
from models import create_model, dense_modules, is_known_arch
from pruners.base import RoundPlan
from pruners.masks import prunable_weights
from training.fused import FusedTrainStep, fuse_models
from training.fused.layout import tune_conv_layouts
from training.step import autocast, resolve_amp
from utils.errors import UsageError, run_cli

POOL = 4  # distinct batches per cell, cycled
LR = 0.01


class SyntheticBatches:
    """`POOL` batches of random uint8 CIFAR-shaped images and labels per cell, generated on `device`.

    `batch(k)` -> (float images, labels), normalised with CIFAR-10's mean/std: [cells, B, 3, 32, 32] and
    [cells, B], or [B, 3, 32, 32] and [B] when `cells` is None (a plain run). `layout`: "nchw"; "nhwc_grouped"
    (stored batch, H, W, cell, channel: the grouped route's [B, cells*3, H, W] view of them is channels_last
    without a copy); "nhwc_cells" (stored cell, batch, H, W, channel: each cell's [B, 3, H, W] is
    channels_last, for the streams route and a plain run).
    """

    def __init__(self, cells, batch: int, device: torch.device, layout: str, seed: int = 0):
        self.cells, count = cells, cells or 1
        generator = torch.Generator(device=device).manual_seed(seed)
        shape, order = {"nchw": ((POOL, count, batch, 3, 32, 32), (0, 1, 2, 3, 4, 5)),
                        "nhwc_grouped": ((POOL, batch, 32, 32, count, 3), (0, 4, 1, 5, 2, 3)),
                        "nhwc_cells": ((POOL, count, batch, 32, 32, 3), (0, 1, 2, 5, 3, 4))}[layout]
        stored = torch.randint(0, 256, shape, generator=generator, device=device, dtype=torch.uint8)
        self.images = stored.permute(*order)  # [POOL, cells, B, 3, H, W]
        self.labels = torch.randint(0, 10, (POOL, count, batch), generator=generator, device=device)
        spec = DATASETS["cifar10"]
        self.mean = torch.tensor(spec.mean, device=device).view(3, 1, 1) * 255
        self.std = torch.tensor(spec.std, device=device).view(3, 1, 1) * 255

    def batch(self, k: int):
        images = (self.images[k % POOL].float() - self.mean) / self.std  # elementwise: keeps the layout
        labels = self.labels[k % POOL]
        return (images, labels) if self.cells else (images[0], labels[0])


def fused_step(arch: str, cells: int, device: torch.device, compiled: bool, channels_last: bool,
               route: str = "auto"):
    """`cells` models of `arch` (seeds 0..cells-1) fused on `route`, with a graph-captured FusedTrainStep
    and each cell's own random 80 % masks; `channels_last` applies to the grouped and streams routes on
    CUDA. Returns (FusedTrainStep, batch layout for SyntheticBatches). Raises ValueError from fusion."""
    models, plans = [], []
    for seed in range(cells):
        torch.manual_seed(seed)
        models.append(create_model(arch, 10))
        masks = random_masks(prunable_weights(models[-1], exclude=dense_modules(models[-1])))
        plans.append(RoundPlan(train_masks=masks, final_masks=masks))
    fused = fuse_models(models, route, compiled=compiled).to(device)
    convnet = any(isinstance(m, torch.nn.Conv2d) for m in models[0].modules())
    layout = "nchw"
    if channels_last and convnet and device.type == "cuda" and fused.route in ("grouped", "streams"):
        fused.to_channels_last()
        layout = "nhwc_grouped" if fused.route == "grouped" else "nhwc_cells"
    step = FusedTrainStep(fused, list(plans[0].train_masks), device, resolve_amp("auto", device), MOMENTUM,
                          [WEIGHT_DECAY] * cells, regularized=False, use_graph=True, compile_model=compiled)
    step.start_round(plans)
    return step, layout


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(run_step: Callable[[int], None], warmup: int, device: torch.device) -> None:
    for k in range(warmup):
        run_step(k)
    sync(device)


def timed(run_step: Callable[[int], None], steps: int, offset: int, device: torch.device):
    """(start, end) wall-clock seconds (time.time, comparable across processes) of `steps` steps."""
    start = time.time()
    for k in range(offset, offset + steps):
        run_step(k)
    sync(device)
    return start, time.time()


def plain_runner(arch: str, batch: int, device: torch.device, compiled: bool):
    """(run_step(k), keep-alive objects) for one plain run: the step on pool batch k."""
    built = plain_step(arch, device, masked=True, compiled=compiled)
    data = SyntheticBatches(None, batch, device, "nhwc_cells" if built.channels_last else "nchw")

    def run_step(k):
        built.step(*data.batch(k), lr=LR, reg_lambda=0.0)
    return run_step, (built, data)


def fused_runner(arch: str, batch: int, cells: int, device: torch.device, compiled: bool, layout: str,
                 route: str = "auto", conv_layout: str = "model", info: Optional[dict] = None):
    """(run_step(k), keep-alive objects) for `cells` fused cells: one fused step on pool batch k. `conv_layout`
    "tuned": each grouped conv computes in its fastest layout (training/fused/layout.py; CUDA, grouped route;
    "cudnn": without the Triton kernels),
    timed before the step's first call captures its graph; `info` (if given) gets what was applied."""
    step, batch_layout = fused_step(arch, cells, device, compiled, channels_last=layout == "channels_last",
                                    route=route)
    data = SyntheticBatches(cells, batch, device, batch_layout)
    chosen = {}
    if conv_layout in ("tuned", "cudnn"):
        with autocast(device, step.amp):
            excluded = ("triton",) if conv_layout == "cudnn" else ()
            chosen = tune_conv_layouts(step.model, data.batch(0)[0], exclude=excluded)
    if info is not None:
        info["route"] = step.model.route  # the route taken (auto: grouped for convnets, streams otherwise)
        info["conv_layout"] = conv_layout if chosen else "model"  # tuning is a no-op on the CPU and other routes
        if chosen:
            info["conv_layouts"] = dict(sorted(Counter(layout for layout, _ in chosen.values()).items()))
            info["conv_us"] = {name: [layout, {k: round(v, 1) for k, v in us.items()}]  # [chosen, {layout: us}]
                               for name, (layout, us) in chosen.items()}
    lrs, lambdas = [LR] * cells, [0.0] * cells

    def run_step(k):
        step(*data.batch(k), lr=lrs, reg_lambda=lambdas)
    return run_step, (step, data)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def measure(make: Callable[[], tuple], images_per_step: int, cells: int, args, device) -> Dict[str, float]:
    """{img_s, peak_mib_per_cell} of the runner `make()` builds, or {error} (the benchmark goes on)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        run_step, keep = make()
        warm_up(run_step, args.warmup, device)
        start, end = timed(run_step, args.steps, args.warmup, device)
        result = {"img_s": args.steps * images_per_step / (end - start)}
        if device.type == "cuda":
            result["peak_mib_per_cell"] = (torch.cuda.max_memory_allocated(device) - base) / cells / 2 ** 20
        del run_step, keep
    except Exception as exc:  # OOM, no batching rule, capture failure: recorded, the table goes on
        result = {"error": error_text(exc)}
    gc.collect()
    return result


def measure_all(args, device) -> List[dict]:
    """One row per (arch, batch, cells): fused img/s and peak memory next to the one-run img/s (and with
    --big_batch, next to one run at cells * batch images per step)."""
    rows, seen = [], {}

    def big_batch(arch: str, size: int) -> dict:  # one plain run at N*B images per step, measured once per size
        if (arch, size) not in seen:
            seen[arch, size] = measure(lambda: plain_runner(arch, size, device, args.compile), size, 1, args, device)
        return seen[arch, size]
    for arch in args.archs:
        for batch in args.batch_sizes:
            one = measure(lambda: plain_runner(arch, batch, device, args.compile), batch, 1, args, device)
            print(json.dumps({"arch": arch, "batch_size": batch, "one_run": one}), flush=True)
            for cells in args.cells:
                info = {}
                fused = measure(lambda: fused_runner(arch, batch, cells, device, args.compile, args.fused_layout,
                                                     args.fused_route, args.conv_layout, info),
                                cells * batch, cells, args, device)
                fused.update(info)
                row = {"arch": arch, "batch_size": batch, "cells": cells, "one_run_img_s": one.get("img_s"),
                       "one_run_peak_mib": one.get("peak_mib_per_cell"), "one_run_error": one.get("error")}
                row.update({f"fused_{k}": v for k, v in fused.items()})
                if row["one_run_img_s"] and row.get("fused_img_s"):
                    row["fused_speedup"] = row["fused_img_s"] / row["one_run_img_s"]
                if args.big_batch and cells > 1:
                    add_big_batch(row, big_batch(arch, cells * batch))
                rows.append({k: v for k, v in row.items() if v is not None})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def add_processes(rows: List[dict], args, device) -> None:
    """N separate processes of the plain run (N in --cells, 2 <= N <= --max_processes), into `rows`."""
    for row in rows:
        if row["cells"] == 1 and "one_run_img_s" in row:  # one process is the one run
            row["processes_img_s"], row["processes_speedup"] = row["one_run_img_s"], 1.0
    configs = [(arch, batch) for arch in args.archs for batch in args.batch_sizes]
    for count in [n for n in args.cells if 2 <= n <= args.max_processes]:
        results = concurrent.run_group(count, worker_argv(args), len(configs), timeout=args.group_timeout)
        for (arch, batch), result in zip(configs, results):
            row = next(r for r in rows if (r["arch"], r["batch_size"], r["cells"]) == (arch, batch, count))
            row.update({f"processes_{k}": v for k, v in result.items()})
            if row.get("one_run_img_s") and row.get("processes_img_s"):
                row["processes_speedup"] = row["processes_img_s"] / row["one_run_img_s"]
        print(f"{count} processes: {json.dumps(results)}", flush=True)


def worker_argv(args) -> List[str]:
    return [sys.executable, "-m", "benchmarks.fused_speed", "--worker", "--out", "-", "--device", args.device,
            "--archs", ",".join(args.archs), "--batch_sizes", ",".join(map(str, args.batch_sizes)),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--cells", "1"] + \
        (["--compile"] if args.compile else []) + (["--cudnn_benchmark"] if args.cudnn_benchmark else [])


def worker(args, device) -> None:
    """One of N processes: per (arch, batch), build and warm up, wait for all, run the timed steps, wait
    again; one JSON line per config on stdout (concurrent.py's protocol)."""
    configs = [(arch, batch) for arch in args.archs for batch in args.batch_sizes]
    for index, (arch, batch) in enumerate(configs):
        concurrent.worker_config(index, lambda: plain_runner(arch, batch, device, args.compile)[0],
                                 lambda run_step: warm_up(run_step, args.warmup, device),
                                 lambda run_step: timed(run_step, args.steps, args.warmup, device),
                                 args.steps * batch, error_text)


def int_list(flag: str, text: str, most: int) -> List[int]:
    """'1,2,4' -> [1, 2, 4]; raises UsageError naming `flag` for anything but positive ints <= `most`."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 1,2,4") from None
    if not values or any(v < 1 or v > most for v in values):
        raise UsageError(f"{flag} {text!r}: every value must be between 1 and {most}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    p.add_argument("--archs", default="res20s,vit_tiny")
    p.add_argument("--cells", default="1,2,4,8,16", help="numbers of fused cells (and of processes)")
    p.add_argument("--batch_sizes", default="128,512", help="per-cell batch sizes")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (the first captures the graph)")
    p.add_argument("--compile", action="store_true", help="torch.compile inside the plain and fused steps")
    p.add_argument("--cudnn_benchmark", action="store_true", help="let cuDNN time its convolution algorithms")
    p.add_argument("--fused_layout", default="channels_last", choices=("channels_last", "contiguous"),
                   help="memory layout of the grouped route's [B, N*C, H, W] activations on CUDA")
    p.add_argument("--conv_layout", default="tuned", choices=("tuned", "cudnn", "model"),
                   help="tuned (default): each grouped-route conv computes in its fastest layout (NCHW, channels_last, "
                   "block_diagonal, or the Triton grouped kernels), timed per conv on CUDA; cudnn: the same without "
                   "the Triton kernels (the runner's choice); model: every conv in --fused_layout")
    p.add_argument("--fused_route", default="auto", choices=("auto", "grouped", "vmap", "streams"),
                   help="training/fused route: auto = grouped for convnets, streams otherwise; streams = one "
                   "CUDA stream per cell")
    p.add_argument("--big_batch", action="store_true",
                   help="also time one plain run at N x batch images per step (what fusion's N x batch images per "
                   "step are worth without fusion)")
    p.add_argument("--max_processes", type=int, default=8, help="largest N of the N-processes comparison")
    p.add_argument("--group_timeout", type=float, default=600, help="seconds one group of processes may take")
    p.add_argument("--sweep_estimate", action="store_true",
                   help="also estimate a res20s sweep's wall-clock hours, fused vs one at a time")
    p.add_argument("--sweep_cells", type=int, default=6, help="cells of the sweep (3 criteria x 2 rates)")
    p.add_argument("--rounds", type=int, default=20, help="pruning rounds of each sweep cell")
    p.add_argument("--epochs_per_round", type=int, default=20, help="training epochs per round")
    p.add_argument("--images_per_epoch", type=int, default=45000, help="training images per epoch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.archs = [a for a in args.archs.split(",") if a]
    args.cells = int_list("--cells", args.cells, 256)
    args.batch_sizes = int_list("--batch_sizes", args.batch_sizes, 1 << 16)
    for flag in ("steps", "warmup", "max_processes", "sweep_cells", "rounds", "epochs_per_round",
                 "images_per_epoch"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    unknown = [a for a in args.archs if not is_known_arch(a)]
    if unknown or not args.archs:
        raise UsageError(f"--archs: unknown architecture {', '.join(unknown) or '(none given)'}")
    if args.device not in ("cuda", "cpu"):
        raise UsageError(f"--device {args.device!r}: choose cuda or cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if device.type == "cpu":  # one thread, as each worker process: otherwise N processes get N times the cores
        torch.set_num_threads(1)
    if args.worker:
        worker(args, device)
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows = measure_all(args, device)
    add_processes(rows, args, device)
    flags = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "flags": flags, "pool_batches_per_cell": POOL, "rows": rows,
              "targets": targets(rows)}
    if args.sweep_estimate:
        record["sweep_estimate"] = sweep_estimates(rows, args)
    print(table(rows))
    for t in record["targets"]:
        got = f"{t['speedup']:.2f}x" if t["speedup"] is not None else "not measured"
        print(f"target {t['arch']}, {t['cells']} cells at batch {t['batch_size']}: >= {t['target']:g}x one run; "
              f"measured {got} ({'met' if t['met'] else 'NOT met'})")
    for line in record.get("sweep_estimate", {}).get("lines", []):
        print(line)
    return save(record, args.out, indent=1)


def main(argv=None) -> int:
    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
