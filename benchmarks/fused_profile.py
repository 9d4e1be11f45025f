"""Where the time of a fused training step goes, on one GPU (kernels, whole models, convolutions).

Three parts, written to one JSON file and printed as tables:

- `profile`: torch.profiler over `--steps` graph-replayed training steps of the plain run and of N fused
  cells on the auto route and on the streams route (benchmarks/fused_speed's runners, same data and masks).
  Kernel time per step, grouped into convolution / batch norm / matmul / optimizer / other, and the top
  kernels by time. Fused variants take --conv_layout (tuned: each grouped conv in its faster layout).
- `models`: forward + backward of whole models (no optimizer), bf16, each variant captured in one CUDA
  graph: one model; N models one after another on one stream; N models on N CUDA streams (the graph
  runs their kernels concurrently); the N models fused by training/fused (`fuse_models`).
- `convs`: every distinct Conv2d shape the arch runs (found with forward hooks on one batch), forward +
  backward (input and weight gradients) in bf16, each captured in a CUDA graph and replayed: one conv
  of the cell's width (times N: what N one-at-a-time runs pay) against one grouped conv of N cells, in
  channels_last and in NCHW, with cuDNN's heuristic choice and with `cudnn.benchmark`.

    python -m benchmarks.fused_profile --arch res20s --cells 8 --batch_size 128 --out /tmp/profile.json
"""
import argparse
import re
import sys
from collections import defaultdict
from contextlib import nullcontext
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.fused_speed import fused_runner, int_list, plain_runner, warm_up
from benchmarks.output import save
from models import create_model, is_known_arch
from tokens.graphed import capture
from training.fused import fuse_models
from training.fused.layout import tune_conv_layouts
from utils.errors import UsageError, run_cli
from utils.timing import median_ms

CATEGORIES = [("batch norm", r"batch_?norm|bn_fw|bn_bw|welford"),  # first matching label wins
              ("optimizer", r"foreach|multi_tensor"),
              ("convolution", r"conv|cudnn|xmma|implicit|dgrad|wgrad|winograd|fprop"),
              ("matmul", r"gemm|bmm|cublas|cutlass")]


def category(kernel: str) -> str:
    name = kernel.lower()
    return next((label for label, pattern in CATEGORIES if re.search(pattern, name)), "other")


def kernel_times(run_step: Callable[[int], None], steps: int) -> Dict[str, float]:
    """Kernel name -> CUDA microseconds per step over `steps` steps (graph replays included)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in range(steps):
            run_step(k)
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        if device_us and event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.key] += device_us / steps
    return dict(times)


def summarize(times: Dict[str, float], top: int) -> dict:
    by_category = defaultdict(float)
    for name, us in times.items():
        by_category[category(name)] += us
    ranked = sorted(times.items(), key=lambda item: -item[1])[:top]
    return {"total_us": sum(times.values()), "by_category_us": dict(by_category),
            "top_kernels": [{"kernel": name[:160], "us": us, "category": category(name)} for name, us in ranked]}


def conv_shapes(arch: str, batch: int) -> List[dict]:
    """Distinct Conv2d calls of one forward of `arch` on [batch, 3, 32, 32]: in/out channels, kernel,
    stride, padding, groups, input H and W, and how many times each occurs."""
    model = create_model(arch, 10)
    seen: Dict[tuple, int] = defaultdict(int)

    def hook(module, inputs, _output):
        h, w = inputs[0].shape[-2:]
        seen[(module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
              module.padding[0], module.groups, h, w)] += 1
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(batch, 3, 32, 32))
    for handle in handles:
        handle.remove()
    keys = ("in_channels", "out_channels", "kernel", "stride", "padding", "groups", "height", "width")
    return [dict(zip(keys, shape), count=count) for shape, count in seen.items()]


def graphed_us(fn: Callable[[], None], replays: int = 50) -> float:
    """Microseconds per replay of `fn` captured in one CUDA graph (tokens.graphed.capture after 3 warm-up
    calls on a side stream): the median over `replays` replays, each bracketed by CUDA events."""
    device = torch.device("cuda")
    graph, _ = capture(fn, device, warmup=3)
    return 1000 * median_ms(graph.replay, device, warmup=1, iters=replays)


def model_us(arch: str, batch: int, cells: int, how: str, conv_layout: str = "model") -> float:
    """Microseconds per graph replay of forward + backward (cross-entropy, bf16 autocast) of `cells`
    models of `arch`: how = "sequential" (one stream), "streams" (cell i on CUDA stream i) or "fused"
    (conv_layout "tuned": each grouped conv in its faster layout, training/fused/layout.py)."""
    models = [create_model(arch, 10).cuda() for _ in range(cells)]
    convnet = any(isinstance(m, nn.Conv2d) for m in models[0].modules())
    fmt = torch.channels_last if convnet else torch.contiguous_format
    images = torch.randn(cells, batch, 3, 32, 32, device="cuda")
    labels = torch.randint(0, 10, (cells, batch), device="cuda")
    if how == "fused":
        fused = fuse_models(models).cuda().to(memory_format=fmt)
        if conv_layout == "tuned":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                tune_conv_layouts(fused, images)

        def fn():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = fused(images)
                loss = F.cross_entropy(logits.reshape(cells * batch, -1), labels.reshape(-1))
            loss.backward()
        return graphed_us(fn)
    models = [m.to(memory_format=fmt) for m in models]
    inputs = [images[i].contiguous(memory_format=fmt) for i in range(cells)]
    side = [torch.cuda.Stream() for _ in range(cells)] if how == "streams" else None

    def fn():
        main = torch.cuda.current_stream()
        for i, model in enumerate(models):
            if side:
                side[i].wait_stream(main)
            with torch.cuda.stream(side[i]) if side else nullcontext():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(inputs[i]), labels[i])
                loss.backward()
        for stream in side or []:
            main.wait_stream(stream)
    return graphed_us(fn)


def model_table(arch: str, batch: int, cells: int, conv_layout: str = "model") -> dict:
    """{cells, one_us, <how>_us and <how>_speedup (N x one / <how>) or <how>_error} for each variant."""
    row = {"cells": cells}
    for how, count in (("one", 1), ("sequential", cells), ("streams", cells), ("fused", cells)):
        try:
            row[f"{how}_us"] = model_us(arch, batch, count, "sequential" if how == "one" else how, conv_layout)
        except Exception as exc:  # a capture failure is a finding, not the end of the benchmark
            row[f"{how}_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if how != "one" and f"{how}_us" in row and "one_us" in row:
            row[f"{how}_speedup"] = cells * row["one_us"] / row[f"{how}_us"]
    print(row, flush=True)
    return row


def conv_us(shape: dict, batch: int, cells: int, channels_last: bool) -> float:
    """Forward + backward (input and weight gradients) of one conv of `cells` groups of `shape`, bf16."""
    conv = nn.Conv2d(cells * shape["in_channels"], cells * shape["out_channels"], shape["kernel"], shape["stride"],
                     shape["padding"], groups=cells * shape["groups"], bias=False).cuda().to(torch.bfloat16)
    x = torch.randn(batch, cells * shape["in_channels"], shape["height"], shape["width"], device="cuda",
                    dtype=torch.bfloat16)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv, x = conv.to(memory_format=fmt), x.to(memory_format=fmt).requires_grad_(True)
    grad_out = torch.randn_like(conv(x)).contiguous(memory_format=fmt)

    def fn():
        torch.autograd.grad(conv(x), (x, conv.weight), grad_out)
    return graphed_us(fn)


def conv_table(arch: str, batch: int, cells: int) -> List[dict]:
    rows = []
    for shape in conv_shapes(arch, batch):
        row = dict(shape)
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            tag = "benchmark" if bench else "heuristic"
            row[f"one_x{cells}_us_{tag}"] = cells * conv_us(shape, batch, 1, channels_last=True)
            row[f"grouped_cl_us_{tag}"] = conv_us(shape, batch, cells, channels_last=True)
            row[f"grouped_nchw_us_{tag}"] = conv_us(shape, batch, cells, channels_last=False)
        torch.backends.cudnn.benchmark = False
        rows.append(row)
        print(row, flush=True)
    return rows


def format_convs(rows: List[dict], cells: int) -> str:
    head = ["conv (in>out k s, HxW)", "count"] + [f"{v} {t}" for t in ("heuristic", "benchmark")
                                                  for v in (f"1 x{cells} us", "grouped CL us", "grouped NCHW us")]
    lines = [head]
    for r in rows:
        name = f"{r['in_channels']}>{r['out_channels']} k{r['kernel']} s{r['stride']}, {r['height']}x{r['width']}"
        lines.append([name, str(r["count"])] + [f"{r[f'{v}_us_{t}']:.1f}" for t in ("heuristic", "benchmark")
                                                for v in (f"one_x{cells}", "grouped_cl", "grouped_nchw")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def format_profile(parts: Dict[str, dict]) -> str:
    labels = sorted({c for part in parts.values() for c in part["by_category_us"]})
    lines = [["variant", "total us/step"] + labels]
    for name, part in parts.items():
        lines.append([name, f"{part['total_us']:.0f}"] + [f"{part['by_category_us'].get(c, 0):.0f}" for c in labels])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    for name, part in parts.items():
        out.append(f"top kernels, {name}:")
        out += [f"  {k['us']:8.1f} us  {k['category']:<11}  {k['kernel'][:110]}" for k in part["top_kernels"]]
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--arch", default="res20s")
    p.add_argument("--cells", default="8", help="numbers of fused cells to profile, e.g. 8 or 4,8")
    p.add_argument("--batch_size", type=int, default=128, help="per-cell batch size")
    p.add_argument("--steps", type=int, default=10, help="profiled steps (after 5 warm-up steps)")
    p.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    p.add_argument("--fused_layout", default="channels_last", choices=("channels_last", "contiguous"))
    p.add_argument("--conv_layout", default="tuned", choices=("tuned", "model"),
                   help="fused variants: tuned = each grouped conv in its faster layout; model = all in --fused_layout")
    p.add_argument("--no_convs", action="store_true", help="skip the per-convolution timing")
    args = p.parse_args(argv)
    args.cells = int_list("--cells", args.cells, 256)
    if not is_known_arch(args.arch):
        raise UsageError(f"--arch {args.arch!r}: unknown architecture")
    for flag in ("batch_size", "steps", "top"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if not torch.cuda.is_available():
        raise UsageError("no CUDA device here: this benchmark profiles GPU kernels")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda")
    parts = {}
    run_step, keep = plain_runner(args.arch, args.batch_size, device, compiled=False)
    warm_up(run_step, 5, device)
    parts["one run"] = summarize(kernel_times(run_step, args.steps), args.top)
    del run_step, keep
    for cells in args.cells:
        for route in ("auto", "streams"):
            info = {}
            run_step, keep = fused_runner(args.arch, args.batch_size, cells, device, False, args.fused_layout, route,
                                          args.conv_layout, info)
            warm_up(run_step, 5, device)
            summary = summarize(kernel_times(run_step, args.steps), args.top)
            parts[f"{cells} fused ({keep[0].model.route})"] = {**summary, **info}  # info: the conv layouts applied
            del run_step, keep
    print(format_profile(parts), flush=True)
    record = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "flags": {k: v for k, v in vars(args).items() if k != "out"}, "profile": parts,
              "models": [model_table(args.arch, args.batch_size, cells, args.conv_layout) for cells in args.cells]}
    if not args.no_convs and any(isinstance(m, nn.Conv2d) for m in create_model(args.arch, 10).modules()):
        record["convs"] = {str(cells): conv_table(args.arch, args.batch_size, cells) for cells in args.cells}
        for cells, rows in record["convs"].items():
            print(f"convolutions, {cells} cells:\n{format_convs(rows, int(cells))}")
    return save(record, args.out, indent=1)


def main(argv=None) -> int:
    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
