"""Dense vs masked vs compact: parameters, FLOPs, batch-1 latency and batch throughput of structured checkpoints.

Each checkpoint goes through export_compact's whole pipeline (compact/export.py: build, verify
max |logit difference| <= 1e-4, measure); the exports go to a temporary directory, the runs' own
compact/round_<k>.json files are written as by export_compact.py. One JSON with every case and the
compact / masked ratios, and a table per case.

    # checkpoints (synthetic data, CPU; the weights' accuracy does not matter for speed)
    F="--dataset synthetic --no_wandb --batch_size 64 --lr 0.05 --pruning_times 3 --epochs 1 --rate 0.5 \
       --val_size 2900 --criteria magnitude --struct refill"
    python main_imp_fillback.py $F --arch res20s --save_dir /tmp/bench/res20s_refill
    python main_imp_fillback.py $F --arch vit_tiny --vit_structured --save_dir /tmp/bench/vit_tiny_refill
    python -m benchmarks.compact_speed /tmp/bench/res20s_refill/2checkpoint.pth.tar \
        /tmp/bench/vit_tiny_refill/2checkpoint.pth.tar --device cpu --threads 1 \
        --out benchmarks/results/compact_speed_cpu.json
"""
import argparse
import os
import platform
import sys
import tempfile

import torch

try:
    from compact.export import Options, export
    from utils.checkpoint import atomic_write_json
except ImportError:
    sys.exit("run from the repository root: python -m benchmarks.compact_speed CHECKPOINT ... --out FILE")


def ratios(variants: dict, batch: int) -> dict:
    """compact relative to masked: FLOPs and parameters (masked / compact), speedups of the medians."""
    masked, compact = variants["masked"], variants["compact"]
    key = f"throughput_img_s_b{batch}"
    return {"flops_reduction": masked["flops_per_image"] / compact["flops_per_image"],
            "param_reduction": masked["params"] / compact["params"],
            "latency_b1_speedup": masked["latency_ms_b1"]["median"] / compact["latency_ms_b1"]["median"],
            f"throughput_b{batch}_speedup": compact[key]["median"] / masked[key]["median"]}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 on a shared CPU: a descheduled worker thread stalls every op)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, path in enumerate(args.checkpoints):
            print(f"== {path}")
            report = export(Options(checkpoint=path, out=os.path.join(scratch, str(index)), device=args.device,
                                    runs=args.runs, batch=args.batch, compile=args.compile, dtype=args.dtype))
            case = {key: report[key] for key in ("checkpoint", "round", "struct", "vit_structured", "sparsity",
                                                 "max_abs_logit_diff", "variants") if key in report}
            if "variants" in report:
                case["compact_vs_masked"] = ratios(report["variants"], args.batch)
                print("compact vs masked: " + ", ".join(f"{k} {v:.2f}x" for k, v in case["compact_vs_masked"].items()))
            cases.append(case)
    device = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else \
        cpu_name()
    result = {"device": args.device, "device_name": device, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()), "torch": torch.__version__,
              "dtype": args.dtype, "compile": args.compile, "runs": args.runs, "batch": args.batch, "cases": cases}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_json(args.out, result, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
