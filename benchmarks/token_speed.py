"""Speed of training-free anchor token pruning (SPEC section 4) on ViT-B/16-shaped image encoders.

Measures images/s and latency of random-weight ViT-B/16 encoders (open_clip
ViT-B-16 visual tower, timm vit_base_patch16_224) at 197 tokens and pruned
(k_anchors=10, top_m=50: 61 tokens from block `start_block` on), at batch 1 and
256, in bf16 on CUDA with CUDA-event timing, warm-up and medians, both eager
and replayed from a CUDA graph (batch 1 is launch-bound when eager). Two scopes:
the whole encoder, and the pruned blocks alone (fed the tokens an unpruned
forward gives them), where the same blocks run once more on the kept tokens
without scoring, so the scoring's cost and its share of the saved time are
measured, not modelled. Each pruned row carries the ideal speedup from the
tokens each block processes (FLOPs: 24*N*D^2 for the linear layers, 4*N^2*D for
attention, plus the patch embedding in the encoder scope) and the fraction of
it achieved.

Run from the repository root, no interaction:

    python -m benchmarks.token_speed --out benchmarks/results/token_speed.json           # GPU: bf16, batch 1 and 256
    python -m benchmarks.token_speed --out r.json --profile prof/                        # + kernel tables (GPU)
    python -m benchmarks.token_speed --quick --out /tmp/token_speed.json                 # CPU smoke: fp32, tiny widths
"""
import argparse
import json
import os
import statistics
import sys
from typing import Callable, Dict, List

import torch

try:
    from tokens import apply_pruning_to_model
    from tokens.backends import find_target
    from tokens.graphed import capture
    from tokens.report import run_lengths
    from utils.timing import time_ms
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


def block_flops(tokens_per_block: List[int], width: int) -> float:
    """Multiply-add FLOPs x2 of transformer blocks: 24*N*D^2 for the linear layers, 4*N^2*D for attention."""
    return sum(24 * n * width ** 2 + 4 * n ** 2 * width for n in tokens_per_block)


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], None]:
    """Capture fn() (fixed input tensor) in a CUDA graph: at batch 1 a ViT is bound by kernel launches,
    and a replay launches them all at once, so this shows what pruning saves without that overhead."""
    graph, _ = capture(fn, device, warmup=3)
    return graph.replay


def attach_pruning(model: torch.nn.Module, args):
    return apply_pruning_to_model(model, args.k_anchors, args.top_m, args.alpha, args.start_block,
                                  scoring_graphs=not args.eager_scoring)


def blocks_input(model: torch.nn.Module, target, images: torch.Tensor, start_block: int) -> torch.Tensor:
    """The tokens entering block `start_block` in an unpruned forward of `images`."""
    captured = {}

    def grab(module, args, kwargs):
        captured["x"] = (args[0] if args else next(iter(kwargs.values()))).clone()

    hook = target.blocks[start_block].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(images)
    finally:
        hook.remove()
    return captured["x"]


def run_blocks(blocks, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def profile_modes(model, images, args, name: str) -> None:
    """Kernel tables (torch.profiler, CUDA time) of a few baseline and pruned forwards, one text file each."""
    from torch.profiler import ProfilerActivity, profile
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    for mode in ("baseline", "pruned"):
        handle = attach_pruning(model, args) if mode == "pruned" else None
        try:
            with torch.inference_mode():
                for _ in range(3):
                    model(images)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        model(images)
                    torch.cuda.synchronize()
        finally:
            if handle is not None:
                handle.restore()
        path = os.path.join(args.profile, f"{slug}_b{images.shape[0]}_{mode}.txt")
        with open(path, "w") as out:
            out.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))


def timed(fn: Callable[[], torch.Tensor], execution: str, args, device) -> dict:
    """Median / p10 / p90 ms of fn(), eager or replayed from a CUDA graph; {"error": ...} if capture fails."""
    try:
        with torch.inference_mode():
            step = fn if execution == "eager" else graphed(fn, device)
            times = time_ms(step, device, args.warmup, args.iters)
    except RuntimeError as exc:  # one failed capture should not cost the other rows of an unattended run
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
    return {"median_ms": round(statistics.median(times), 4), "p10_ms": round(percentile(times, 0.1), 4),
            "p90_ms": round(percentile(times, 0.9), 4)}


def run_mode(model, target, fn, scope: str, mode: str, execution: str, batch: int, args, device) -> dict:
    tokens = [target.num_tokens] * len(target.blocks)
    handle = None
    if mode == "pruned":
        handle = attach_pruning(model, args)
        tokens = handle.tokens_per_block()
    try:
        result = timed(fn, execution, args, device)
    finally:
        if handle is not None:
            handle.restore()
    if scope == "blocks":
        tokens = tokens[args.start_block:]
    row = dict({"batch": batch, "execution": execution, "scope": scope, "mode": mode, "tokens_per_block": tokens},
               **result)
    if "median_ms" in row:
        row["images_per_s"] = round(batch / row["median_ms"] * 1e3, 2)
    return row


def compare(base: dict, pruned: dict, gflops: Callable[[List[int]], float]) -> None:
    """Speedup over the unpruned row, the ideal one from the FLOPs of the tokens each block processes, and
    the fraction of it achieved; written into the pruned row."""
    for row in (base, pruned):
        row["gflops_per_image"] = round(gflops(row["tokens_per_block"]), 3)
    if "error" in base or "error" in pruned:
        return
    speedup = base["median_ms"] / pruned["median_ms"]
    ideal = base["gflops_per_image"] / pruned["gflops_per_image"]
    pruned.update(speedup=round(speedup, 3), ideal_speedup=round(ideal, 3), achieved_of_ideal=round(speedup / ideal, 3))


def measure(name: str, model: torch.nn.Module, args, device: torch.device, dtype: torch.dtype) -> List[dict]:
    """Rows for the whole encoder and for the pruned blocks alone (blocks start_block.. fed the tokens an
    unpruned forward gives them), baseline and pruned, per batch size and execution."""
    model = model.to(device=device, dtype=dtype).eval()
    target = find_target(model)
    width = target.readers[0].num_heads * target.readers[0].head_dim
    patches = target.num_tokens - target.num_prefix_tokens
    patch_flops = 2 * patches * 3 * 16 * 16 * width
    gflops = {"encoder": lambda tokens: (block_flops(tokens, width) + patch_flops) / 1e9,
              "blocks": lambda tokens: block_flops(tokens, width) / 1e9}
    executions = ["eager", "cuda_graph"] if device.type == "cuda" and not args.no_cuda_graph else ["eager"]
    keep = target.num_prefix_tokens + args.k_anchors + args.top_m
    pruned_blocks = target.blocks[args.start_block:]
    rows = []
    for batch in args.batch_sizes:
        images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
        x = blocks_input(model, target, images, args.start_block)
        x_kept = x[:keep] if target.sequence_first else x[:, :keep].contiguous()
        forwards = {"encoder": lambda: model(images), "blocks": lambda: run_blocks(pruned_blocks, x)}
        for execution in executions:
            for scope, fn in forwards.items():
                base, pruned = (dict(run_mode(model, target, fn, scope, mode, execution, batch, args, device),
                                     model=name) for mode in ("baseline", "pruned"))
                compare(base, pruned, gflops[scope])
                if scope == "blocks" and "speedup" in pruned:
                    # the same blocks on prefix + k + m tokens with no scoring: what pruning could take at best
                    unscored = timed(lambda: run_blocks(pruned_blocks, x_kept), execution, args, device)
                    if "median_ms" in unscored:
                        saved = base["median_ms"] - unscored["median_ms"]
                        overhead = pruned["median_ms"] - unscored["median_ms"]
                        pruned.update(unscored_ms=unscored["median_ms"], saved_ms=round(saved, 4),
                                      overhead_ms=round(overhead, 4), overhead_of_saved=round(overhead / saved, 3))
                rows += [base, pruned]
        if args.profile and device.type == "cuda" and batch == max(args.batch_sizes):
            profile_modes(model, images, args, name)
    return rows


def table(rows: List[dict]) -> str:
    head = ["model", "batch", "execution", "scope", "mode", "tokens/block", "median ms", "p10 ms", "p90 ms", "images/s",
            "speedup", "ideal", "achieved", "overhead/saved"]
    body = []
    for r in rows:
        line = [r["model"], str(r["batch"]), r["execution"], r["scope"], r["mode"], run_lengths(r["tokens_per_block"])]
        if "error" in r:
            body.append(line + [r["error"]] + [""] * 6)
            continue
        line += [f"{r['median_ms']:.3f}", f"{r['p10_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['images_per_s']:.1f}"]
        if "speedup" in r:
            line += [f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['achieved_of_ideal']:.0%}"]
            line += [f"{r['overhead_of_saved']:.0%}" if "overhead_of_saved" in r else ""]
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
    p.add_argument("--eager_scoring", action="store_true",
                   help="score eagerly instead of replaying the scoring from a CUDA graph (tokens/graphed.py)")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="GPU: let cuDNN time its convolution algorithms (the patch embedding) before choosing")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="GPU: also write torch.profiler kernel tables of the largest batch to DIR")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 256])
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 20)
    args.iters = args.iters if args.iters is not None else (5 if args.quick else 50)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
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
