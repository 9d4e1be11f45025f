"""Epoch time of CIFAR training: the reference-style loop vs our GPU-resident, graph-captured step.

For each model (res20s, vit_tiny) and batch size (128, 512), in one process on one GPU:
  reference  torchvision CIFAR10 dataset object + PIL transforms + DataLoader(num_workers=2),
             fp32, torch.optim.SGD, .item() every step (the habit of the RSST / IMP code bases)
  ours       data resident on the GPU as uint8, crop+flip there, bf16 autocast, channels_last for
             convnets, the whole step (fwd, bwd, masked SGD) replayed from one CUDA graph; unmasked
  masked     ours with 80 % of the prunable weights masked (masks enforced every step)
  compiled   ours with torch.compile inside the captured step (--compile)
plus evaluation cost (5,000 validation images at batch 1,024, as a share of a training epoch),
peak GPU memory, and the analytic floor: forward FLOPs per image x 3 (fwd + bwd) x images per
epoch / (a stated fraction of the GPU's dense bf16 peak).

    python -m benchmarks.epoch_speed --data data --out benchmarks/results/epoch_speed.json
    python -m benchmarks.epoch_speed --quick --out /tmp/epoch_speed.json      # CPU smoke run
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

try:
    from data import DATASETS, ImageSet, load
    from data.loader import TensorLoader
    from benchmarks.train_steps import plain_step
    from models import create_model
    from training.loop import evaluate, train_epoch
    from utils.checkpoint import atomic_write_json
except ImportError:
    sys.exit("run from the repository root: python -m benchmarks.epoch_speed --out FILE [--quick]")

H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, SXM datasheet


def reference_epoch(arch, root, batch_size, device, max_steps=None):
    """The loop users come from; torchvision's md5 check is bypassed because the bundle is re-encoded."""
    import torchvision
    import torchvision.transforms as T

    class LocalCIFAR10(torchvision.datasets.CIFAR10):
        def _check_integrity(self):
            return True

        def _load_meta(self):
            self.classes = [str(i) for i in range(10)]
    spec = DATASETS["cifar10"]
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(spec.mean, spec.std)])
    dataset = LocalCIFAR10(root, train=True, transform=transform, download=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2,
                                         pin_memory=device.type == "cuda", drop_last=True)
    model = create_model(arch, 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    seen, started = 0, time.perf_counter()
    for index, (images, labels) in enumerate(loader):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _ = loss.item(), (logits.argmax(1) == labels).sum().item()  # the per-step host syncs
        seen += labels.shape[0]
        if max_steps and index + 1 >= max_steps:
            break
    return seen / (time.perf_counter() - started)


def our_step(arch, splits, batch_size, device, masked, compiled):
    model, step, amp, nhwc = plain_step(arch, device, masked, compiled)
    spec = splits.spec
    loader = TensorLoader(splits.train, batch_size, spec.mean, spec.std, device, train=True, drop_last=True)
    val = TensorLoader(splits.val, 1024, spec.mean, spec.std, device, train=False)
    return model, step, loader, val, amp, nhwc


def timed_epoch(model, step, loader, device, epoch):
    loader.set_epoch_seed(epoch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = train_epoch(model, step, loader, lambda i: (0.01, 0.0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result.samples / (time.perf_counter() - started), time.perf_counter() - started


def flops_per_image(arch, device):
    from utils.flops import flops_per_image as count  # the runner's counter: attention counted on the CPU too
    return count(create_model(arch, 10).to(device), (3, 32, 32))


def measure(args, splits, device):
    rows = []
    for arch in args.archs:
        fwd = flops_per_image(arch, device)
        floor = 3 * fwd * len(splits.train) / (args.peak * args.mfu)
        for batch_size in args.batch_sizes:
            row = {"arch": arch, "batch_size": batch_size, "flops_fwd_per_image": fwd, "floor_seconds": floor}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row["reference_img_s"] = reference_epoch(arch, args.data, batch_size, device,
                                                     args.reference_steps)
            if device.type == "cuda":
                row["reference_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
            for variant, masked, compiled in (("ours", False, False), ("masked", True, False),
                                              ("compiled", False, True)):
                if variant not in args.variants:
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                try:
                    model, step, loader, val, amp, nhwc = our_step(arch, splits, batch_size, device, masked, compiled)
                    timed_epoch(model, step, loader, device, 0)  # capture / compile / warm-up
                    rate, seconds = timed_epoch(model, step, loader, device, 1)
                    row[f"{variant}_img_s"], row[f"{variant}_epoch_s"] = rate, seconds
                    if variant == "ours":
                        evaluate(model, val, device, amp, nhwc)  # first call: kernel selection for the batch
                        started = time.perf_counter()
                        evaluate(model, val, device, amp, nhwc)
                        row["eval_share_of_epoch"] = (time.perf_counter() - started) / seconds
                except Exception as exc:  # a failing variant is recorded, the table goes on
                    row[f"{variant}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                if device.type == "cuda":
                    row[f"{variant}_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows):
    head = "| model | batch | reference img/s | ours img/s | speedup | masked overhead | compiled img/s | " \
           "eval / epoch | ours s/epoch | floor s/epoch | peak MB (ref / ours) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ours, ref = r.get("ours_img_s"), r["reference_img_s"]
        masked = r.get("masked_img_s")
        lines.append("| {} | {} | {:,.0f} | {} | {} | {} | {} | {} | {} | {:.2f} | {} |".format(
            r["arch"], r["batch_size"], ref, f"{ours:,.0f}" if ours else r.get("ours_error", "-"),
            f"{ours / ref:.1f}x" if ours else "-",
            f"{100 * (ours / masked - 1):+.1f}%" if ours and masked else "-",
            f"{r['compiled_img_s']:,.0f}" if "compiled_img_s" in r else r.get("compiled_error", "-")[:40],
            f"{100 * r['eval_share_of_epoch']:.1f}%" if "eval_share_of_epoch" in r else "-",
            f"{r['ours_epoch_s']:.2f}" if "ours_epoch_s" in r else "-", r["floor_seconds"],
            f"{r.get('reference_peak_mb', 0):.0f} / {r.get('ours_peak_mb', 0):.0f}"))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder with cifar-10-batches-py")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--archs", nargs="+", default=["res20s", "vit_tiny"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--variants", nargs="+", default=["ours", "masked", "compiled"])
    parser.add_argument("--peak", type=float, default=H100_BF16_DENSE_PEAK, help="dense bf16 FLOP/s of the GPU")
    parser.add_argument("--mfu", type=float, default=0.5, help="fraction of --peak the floor assumes")
    parser.add_argument("--reference_steps", type=int, default=None, help="cap the reference epoch's steps")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run on a small synthetic subset")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        args.archs, args.batch_sizes, args.variants, args.reference_steps = ["res20s"], [64], ["ours", "masked"], 4
        splits = load("synthetic", args.data)
        splits = type(splits)(train=ImageSet(splits.train.images[:256], splits.train.labels[:256]),
                              val=splits.val, test=splits.test, spec=splits.spec)
        args.data = write_cifar_like(splits, args.out)
    else:
        splits = load("cifar10", args.data, val_size=5000)
    rows = measure(args, splits, device)
    record = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "train_images": len(splits.train), "mfu_for_floor": args.mfu,
              "peak_flops": args.peak, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_json(args.out, record, indent=2)
    print(table(rows))


def write_cifar_like(splits, out):
    """A cifar-10-batches-py folder holding the small synthetic subset (for --quick only)."""
    import pickle
    root = os.path.join(os.path.dirname(os.path.abspath(out)), "epoch_speed_quick_data")
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    data = splits.train.images.reshape(len(splits.train), -1).numpy()
    labels = splits.train.labels.tolist()
    for index, part in enumerate(range(0, len(labels), len(labels) // 5)[:5]):
        rows = slice(part, part + len(labels) // 5)
        with open(os.path.join(folder, f"data_batch_{index + 1}"), "wb") as f:
            pickle.dump({"data": data[rows], "labels": labels[rows]}, f)
    return root


if __name__ == "__main__":
    main()
