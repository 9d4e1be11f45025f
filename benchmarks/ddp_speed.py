"""Epoch time of the runner on 1 GPU vs N GPUs (torchrun, data parallel) at one global batch size.

For each model (res20s, vit_tiny) it runs the real command line, dense, one round of --epochs epochs:
  1 GPU    python main_imp_fillback.py <flags>
  N GPUs   torchrun --standalone --nproc_per_node N main_imp_fillback.py <flags>   (batch / N per rank)
and reads metrics.jsonl: the median over epochs 2.. (epoch 1 holds torch.compile and the CUDA-graph
capture) of train_seconds (training steps only) and epoch_seconds (+ validation), and the images/s.
Speedup = 1-GPU train time / N-GPU train time; scaling efficiency = speedup / N. See docs/ddp.md.

    python -m benchmarks.ddp_speed --data data --out benchmarks/results/ddp_speed_h100x2.json
    python -m benchmarks.ddp_speed --quick --out /tmp/ddp_speed.json      # CPU smoke run (gloo, synthetic)
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

try:
    from utils.checkpoint import atomic_write_json
except ImportError:
    sys.exit("run from the repository root: python -m benchmarks.ddp_speed --out FILE [--quick]")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(arch: str, gpus: int, args, save_dir: str) -> list:
    """The command line of one measured run; `gpus` > 1 goes through torchrun."""
    flags = ["--arch", arch, "--dataset", args.dataset, "--data", args.data, "--struct", "none",
             "--pruning_times", "1", "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
             "--lr", "0.1", "--no_wandb", "--no_progress", "--checkpoint_interval", "1000", "--save_dir", save_dir]
    if args.quick:
        flags += ["--device", "cpu", "--val_size", "2700"]
    script = os.path.join(ROOT, "main_imp_fillback.py")
    if gpus == 1:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), script,
            *flags]


def measure(arch: str, gpus: int, args) -> dict:
    """Run once; the median per-epoch numbers past the first epoch."""
    save_dir = tempfile.mkdtemp(prefix=f"ddp_speed_{arch}_{gpus}_")
    try:
        cmd = command(arch, gpus, args, os.path.join(save_dir, "run"))
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"))
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        with open(os.path.join(save_dir, "run", "metrics.jsonl")) as f:
            epochs = [r for r in map(json.loads, f) if r["type"] == "epoch"]
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
    steady = epochs[1:] or epochs
    return {"arch": arch, "gpus": gpus, "global_batch": args.batch_size, "rank_batch": args.batch_size // gpus,
            "epochs_measured": len(steady),
            "train_seconds": statistics.median(r["train_seconds"] for r in steady),
            "epoch_seconds": statistics.median(r["epoch_seconds"] for r in steady),
            "images_per_second": statistics.median(r["images_per_second"] for r in steady),
            "first_epoch_seconds": epochs[0]["epoch_seconds"], "val_top1_last": epochs[-1]["val_top1"],
            "command": " ".join(os.path.basename(part) if part.startswith(ROOT) else part for part in cmd[1:])}


def table(rows: list) -> str:
    lines = ["| model | GPUs | global / rank batch | train s/epoch | epoch s (+val) | img/s | speedup | efficiency |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['arch']} | {row['gpus']} | {row['global_batch']} / {row['rank_batch']} | "
                     f"{row['train_seconds']:.3f} | {row['epoch_seconds']:.3f} | {row['images_per_second']:,.0f} | "
                     f"{row['speedup']:.2f}x | {100 * row['efficiency']:.0f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder with cifar-10-batches-py")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--archs", nargs="+", default=["res20s", "vit_tiny"])
    parser.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument("--batch_size", type=int, default=512, help="global batch (each rank: batch / --gpus)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not measured")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: synthetic data, gloo, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.dataset, args.epochs, args.batch_size = "synthetic", 2, 64
        args.archs = ["test_vit"] if args.archs == parser.get_default("archs") else args.archs
    elif torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    rows = []
    for arch in args.archs:
        single = measure(arch, 1, args)
        several = measure(arch, args.gpus, args)
        for row in (single, several):
            row["speedup"] = single["train_seconds"] / row["train_seconds"]
            row["efficiency"] = row["speedup"] / row["gpus"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.quick else "cpu",
              "torch": torch.__version__, "dataset": args.dataset, "epochs": args.epochs, "rows": rows}
    atomic_write_json(args.out, record, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
