"""Speed of anchor token pruning through the real zero-shot path: prune_compare.sh -> clip_prune.py ->
`clip_benchmark eval` (SPEC section 4), as a user runs it.

Writes the CIFAR-10 test set (or synthetic images) as a 16-shard WebDataset set, runs the README's
command `MODEL=... DATASET=wds/cifar10 ... ./prune_compare.sh --batch_size B` (baseline, then pruned
with k_anchors=10, top_m=50), and collects both result files into one JSON: steady-state encoder
images/s (full batches after the warm-up batches and the graph captures), the warm-up and partial
batches separately, and the speedups from each. `benchmarks/token_speed.py` times the encoder alone
with CUDA events; this one measures what clip_benchmark users get (clip_benchmark's --amp autocast,
its data loader, the scoring-graph captures inside the run).

    python -m benchmarks.clip_eval_speed --cifar10_npz ../shared/data/cifar10_jpeg.npz \
        --out benchmarks/results/clip_eval_speed_h200.json                         # GPU: ViT-B-16, batch 256
    python -m benchmarks.clip_eval_speed --synthetic 40 --model local-dir:DIR --batch_size 8 \
        --k 4 --m 12 --out /tmp/clip_eval_speed.json                               # CPU smoke (tiny CLIP)

`--pretrained ''` (the default) builds random weights: the speed does not depend on them, and no
weights can be downloaded where this was measured.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("images_per_s", "overall_images_per_s", "encoder_seconds", "images", "steady_batches", "steady_seconds",
        "warmup_batches", "warmup_seconds", "partial_batches", "partial_seconds", "tokens_per_block")


def write_data(args, folder: str) -> None:
    from tokens.wds_data import CIFAR10_CLASSES, SHARDS, cifar10_npz_samples, cifar10_templates, synthetic_samples
    from tokens.wds_data import write_wds
    templates = cifar10_templates()
    if args.cifar10_npz:
        samples, classes = cifar10_npz_samples(args.cifar10_npz, args.limit)
        write_wds(folder, samples, classes, templates, "jpg", shards=SHARDS)
    else:
        write_wds(folder, synthetic_samples(args.synthetic), CIFAR10_CLASSES, templates[:1], "png", shards=SHARDS)


def compare_command(args, data: str, results: str) -> tuple:
    """The README's prune_compare.sh command line and its environment."""
    env = dict(os.environ, MODEL=args.model, PRETRAINED=args.pretrained, DATASET="wds/cifar10", DATASET_ROOT=data,
               K=str(args.k), M=str(args.m), OUT=results, PYTHON=sys.executable)
    command = [os.path.join(HERE, "prune_compare.sh"), "--batch_size", str(args.batch_size), *args.extra]
    shown = (f"MODEL={args.model} PRETRAINED='{args.pretrained}' DATASET=wds/cifar10 DATASET_ROOT={data} "
             f"K={args.k} M={args.m} ./prune_compare.sh {' '.join(command[1:])}")
    return command, env, shown


def summarise(results: str, shown: str, args) -> dict:
    runs = {}
    for name in ("baseline", "pruned"):
        with open(os.path.join(results, f"{name}.json")) as handle:
            result = json.load(handle)
        runs[name] = {"metrics": result["metrics"], **{k: result["token_pruning"].get(k) for k in KEYS}}
    base, pruned = runs["baseline"], runs["pruned"]
    speedups = {}
    for key in ("images_per_s", "overall_images_per_s"):
        if base[key] and pruned[key]:
            speedups[key] = round(pruned[key] / base[key], 3)
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"command": shown, "device": device, "torch": torch.__version__, "model": args.model,
            "pretrained": args.pretrained or "random weights", "batch_size": args.batch_size,
            "runs": runs, "speedup": speedups}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--cifar10_npz", help="the project's cifar10_jpeg.npz bundle (its 10,000 test images)")
    source.add_argument("--synthetic", type=int, help="this many generated images instead (smoke runs)")
    p.add_argument("--limit", type=int, default=0, help="--cifar10_npz: only this many test images")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--pretrained", default="", help="'' (default): random weights")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--k", type=int, default=10, help="k_anchors")
    p.add_argument("--m", type=int, default=50, help="top_m")
    p.add_argument("--workdir", default=None, help="where the data set and result files go (default: a temp dir)")
    p.add_argument("--out", required=True, help="JSON file for the combined results")
    p.add_argument("extra", nargs="*", help="further clip_benchmark eval flags (after --)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or scratch
        data, results = os.path.join(work, "wds_cifar10"), os.path.join(work, "results")
        write_data(args, data)
        command, env, shown = compare_command(args, data, results)
        print(f"== {shown}", flush=True)
        subprocess.run(command, env=env, check=True)
        report = summarise(results, shown, args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f"{args.out}.tmp", "w") as handle:
        json.dump(report, handle, indent=1)
    os.replace(f"{args.out}.tmp", args.out)
    b, p = report["runs"]["baseline"], report["runs"]["pruned"]
    print(f"steady state: {b['images_per_s']} -> {p['images_per_s']} images/s "
          f"({report['speedup'].get('images_per_s')}x); all batches: {b['overall_images_per_s']} -> "
          f"{p['overall_images_per_s']} ({report['speedup'].get('overall_images_per_s')}x); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
