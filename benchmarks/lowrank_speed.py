"""Training throughput (samples/s) of the low-rank factorisers (issue 12, item 6).

For each arch (ResMLP, MLP, AdaLoRA, and AdaLoRA with peft's RankAllocator called every step) and
batch size (8, 64), on synthetic features [256, 2048] (a VLM vision tower's size) at rank 128: the
trainer's step (lowrank.trainer.training_step: forward, loss MSE + λ_B ||B||^2 + λ_ortho orthogonality,
finiteness check, backward, AdamW, allocator) in fp32, with the batch already on the device; warm-up steps are
not timed, CUDA is synchronised around the timed steps. Also the peak GPU memory and the parameter count.

    python -m benchmarks.lowrank_speed --out benchmarks/results/lowrank_speed_h200.json   # GPU
    python -m benchmarks.lowrank_speed --tiny --out /tmp/lowrank_speed.json              # CPU smoke run
"""
import argparse
import platform
import sys
import time

import torch

try:
    from lowrank.models import create_model
    from lowrank.rank_allocation import AllocatorSettings, RankAllocation
    from lowrank.trainer import training_step
    from utils.checkpoint import atomic_write_json
except ImportError:
    sys.exit("run from the repository root: python -m benchmarks.lowrank_speed --out FILE [--tiny]")

CASES = (("ResMLP", False), ("MLP", False), ("AdaLoRA", False), ("AdaLoRA", True))
FULL = {"tokens": 256, "dim": 2048, "rank": 128, "batches": (8, 64), "warmup": 5, "steps": 30}
TINY = {"tokens": 16, "dim": 32, "rank": 8, "batches": (2, 4), "warmup": 1, "steps": 3}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, allocator: bool, batch: int, shape: dict, device: torch.device) -> dict:
    """Samples/s of `steps` timed training steps after `warmup` untimed ones."""
    torch.manual_seed(0)
    model = create_model(arch, shape["dim"], shape["tokens"], shape["rank"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    total = shape["warmup"] + shape["steps"]
    allocation = RankAllocation(model, AllocatorSettings(0, 0, 10, 0.5), total) if allocator else None
    x = torch.randn(batch, shape["tokens"], shape["dim"], device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(1, total + 1):
        if step == shape["warmup"] + 1:
            _sync(device)
            started = time.perf_counter()
        training_step(model, optimizer, x, 1e-4, 1e-3, allocation, step)
    _sync(device)
    seconds = time.perf_counter() - started
    peak = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1) if device.type == "cuda" else None
    return {"arch": arch + ("+allocator" if allocator else ""), "batch_size": batch,
            "samples_per_s": round(batch * shape["steps"] / seconds, 2),
            "ms_per_step": round(1000 * seconds / shape["steps"], 3),
            "parameters": sum(p.numel() for p in model.parameters()),
            "peak_gpu_mib": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="features [16, 32], rank 8, batches 2 and 4 (CPU test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    shape, device = (TINY if args.tiny else FULL), torch.device(args.device)
    rows = [measure(arch, allocator, batch, shape, device) for arch, allocator in CASES for batch in shape["batches"]]
    report = {"benchmark": "lowrank_speed", "features": [shape["tokens"], shape["dim"]], "rank": shape["rank"],
              "dtype": "float32", "timed_steps": shape["steps"], "warmup_steps": shape["warmup"],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "rows": rows}
    atomic_write_json(args.out, report, indent=1)
    print(f"features {report['features']}, rank {report['rank']}, fp32, {report['device']}")
    print(f"{'arch':<18}{'batch':>6}{'samples/s':>12}{'ms/step':>10}{'params':>12}{'peak MiB':>10}")
    for row in rows:
        print(f"{row['arch']:<18}{row['batch_size']:>6}{row['samples_per_s']:>12.1f}{row['ms_per_step']:>10.2f}"
              f"{row['parameters']:>12,}{row['peak_gpu_mib'] if row['peak_gpu_mib'] is not None else '-':>10}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
