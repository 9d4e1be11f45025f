"""Speed of training-free anchor token pruning (SPEC section 4) on ViT-B/16-shaped image encoders.

Measures images/s and latency of random-weight ViT-B/16 encoders (open_clip
ViT-B-16 visual tower, timm vit_base_patch16_224) at 197 tokens and pruned
(k_anchors=10, top_m=50: 61 tokens from block `start_block` on), at batch 1 and
256, in bf16 on CUDA with CUDA-event timing, warm-up and medians, both eager
and replayed from a CUDA graph (batch 1 is launch-bound when eager). It also
reports the ideal speedup from the tokens each block processes (FLOPs of the
blocks: 24*N*D^2 for the linear layers, 4*N^2*D for attention, plus the patch
embedding) and the fraction of it achieved. Scoring costs one extra key
projection and a few small ops in the first pruning block; it is measured,
not modelled.

Run from the repository root, no interaction:

    python -m benchmarks.token_speed --out benchmarks/results/token_speed.json           # GPU: bf16, batch 1 and 256
    python -m benchmarks.token_speed --quick --out /tmp/token_speed.json                 # CPU smoke: fp32, tiny widths
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

try:
    from tokens import apply_pruning_to_model
    from tokens.backends import find_target
    from tokens.report import run_lengths
except ImportError:  # run as a file, the repository root is not on sys.path
    sys.exit("run from the repository root: python -m benchmarks.token_speed --out FILE [--quick]")


def build_models(quick: bool) -> Dict[str, torch.nn.Module]:
    """ViT-B/16 shapes (224 px, patch 16: 196 patches + CLS); --quick keeps the tokens, shrinks the width."""
    import open_clip
    import timm
    from open_clip.transformer import VisionTransformer as ClipViT
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    if quick:
        return {"open_clip ViT-B-16 (tiny width)": ClipViT(image_size=224, patch_size=16, width=64, layers=4, heads=2,
                                                           mlp_ratio=4.0, output_dim=64),
                "timm vit_base_patch16_224 (tiny width)": VisionTransformer(img_size=224, patch_size=16, embed_dim=64,
                                                                            depth=4, num_heads=2, num_classes=0)}
    return {"open_clip ViT-B-16": open_clip.create_model("ViT-B-16", pretrained=None).visual,
            "timm vit_base_patch16_224": timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)}


def time_forward(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int) -> List[float]:
    """Per-iteration milliseconds: CUDA events on GPU (no host timing of async kernels), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def encoder_flops(tokens_per_block: List[int], width: int, patches: int, patch_pixels: int) -> float:
    blocks = sum(24 * n * width ** 2 + 4 * n ** 2 * width for n in tokens_per_block)
    return blocks + 2 * patches * patch_pixels * width


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], None]:
    """Capture fn() (fixed input tensor) in a CUDA graph: at batch 1 a ViT is bound by kernel launches,
    and a replay launches them all at once, so this shows what pruning saves without that overhead."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_mode(model, target, images, mode: str, execution: str, args, device) -> dict:
    handle = None
    tokens = [target.num_tokens] * len(target.blocks)
    if mode == "pruned":
        handle = apply_pruning_to_model(model, args.k_anchors, args.top_m, args.alpha, args.start_block)
        tokens = handle.tokens_per_block()
    row = {"batch": images.shape[0], "execution": execution, "mode": mode, "tokens_per_block": tokens}
    try:
        with torch.inference_mode():
            step = (lambda: model(images)) if execution == "eager" else graphed(lambda: model(images), device)
            times = time_forward(step, device, args.warmup, args.iters)
    except RuntimeError as exc:  # one failed capture should not cost the other rows of an unattended run
        return dict(row, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    finally:
        if handle is not None:
            handle.restore()
    median = statistics.median(times)
    return dict(row, median_ms=round(median, 4), p10_ms=round(percentile(times, 0.1), 4),
                p90_ms=round(percentile(times, 0.9), 4), images_per_s=round(images.shape[0] / median * 1e3, 2))


def measure(name: str, model: torch.nn.Module, args, device: torch.device, dtype: torch.dtype) -> List[dict]:
    model = model.to(device=device, dtype=dtype).eval()
    target = find_target(model)
    width = target.readers[0].num_heads * target.readers[0].head_dim
    patches = target.num_tokens - target.num_prefix_tokens
    executions = ["eager", "cuda_graph"] if device.type == "cuda" and not args.no_cuda_graph else ["eager"]
    rows = []
    for batch in args.batch_sizes:
        images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
        for execution in executions:
            base, pruned = (dict(run_mode(model, target, images, mode, execution, args, device), model=name)
                            for mode in ("baseline", "pruned"))
            for row in (base, pruned):
                row["gflops_per_image"] = round(encoder_flops(row["tokens_per_block"], width, patches, 768) / 1e9, 3)
            if "error" not in base and "error" not in pruned:
                speedup = base["median_ms"] / pruned["median_ms"]
                ideal = base["gflops_per_image"] / pruned["gflops_per_image"]
                pruned.update(speedup=round(speedup, 3), ideal_speedup=round(ideal, 3),
                              achieved_of_ideal=round(speedup / ideal, 3))
            rows += [base, pruned]
    return rows


def table(rows: List[dict]) -> str:
    head = ["model", "batch", "execution", "mode", "tokens/block", "median ms", "p10 ms", "p90 ms", "images/s",
            "speedup", "ideal", "achieved"]
    body = []
    for r in rows:
        line = [r["model"], str(r["batch"]), r["execution"], r["mode"], run_lengths(r["tokens_per_block"])]
        if "error" in r:
            body.append(line + [r["error"]] + [""] * 6)
            continue
        line += [f"{r['median_ms']:.3f}", f"{r['p10_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['images_per_s']:.1f}"]
        if "speedup" in r:
            line += [f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['achieved_of_ideal']:.0%}"]
        body.append(line + [""] * (len(head) - len(line)))
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="anchor token pruning speed benchmark (writes JSON, prints a table)")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--quick", action="store_true", help="CPU, fp32, tiny widths, batch 1 and 4, few iterations")
    p.add_argument("--batch_sizes", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--k_anchors", type=int, default=10)
    p.add_argument("--top_m", type=int, default=50)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--start_block", type=int, default=1)
    p.add_argument("--no_cuda_graph", action="store_true", help="GPU: skip the CUDA-graph rows (eager only)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 256])
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 20)
    args.iters = args.iters if args.iters is not None else (5 if args.quick else 50)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for name, model in build_models(args.quick or not cuda).items():
        rows += measure(name, model, args, device, dtype)
        del model
    import open_clip
    import timm
    report = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype),
              "versions": {"torch": torch.__version__, "timm": timm.__version__, "open_clip": open_clip.__version__},
              "rows": rows}
    print(table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as handle:
        json.dump(report, handle, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
