"""Turn a head / channel / neuron-structured round checkpoint into a physically smaller model.

    python export_compact.py RUN_DIR/3checkpoint.pth.tar --out compact_r3 [--device cpu|cuda] [--runs 50]
        [--batch 256] [--compile] [--dtype fp32|bf16] [--data DIR]

Writes DIR/model.safetensors, DIR/arch.json, DIR/report.json and RUN_DIR/compact/round_<k>.json;
load the model with compact.load_compact(DIR). Details: docs/compact.md.
"""
import argparse
import sys

from compact.export import CompactMismatch, Options, export
from utils.errors import error_line, os_error_line, run_cli


def parse(argv=None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], allow_abbrev=False)
    parser.add_argument("checkpoint", help="<k>checkpoint.pth.tar or <k>model_best.pth.tar of a run")
    parser.add_argument("--out", required=True, help="new (or empty) directory for the compact model")
    parser.add_argument("--device", default="cpu", help="where latency / throughput are timed: cpu, cuda, cuda:N")
    parser.add_argument("--runs", type=int, default=50, help="timed forwards per measurement (after warm-up)")
    parser.add_argument("--batch", type=int, default=256, help="batch size of the throughput measurement")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="dtype of the timed models")
    parser.add_argument("--data", default=None, help="CIFAR root for the verification images (default: the "
                                                     "checkpoint's --data)")
    args = parser.parse_args(argv)
    return Options(checkpoint=args.checkpoint, out=args.out, device=args.device, runs=args.runs, batch=args.batch,
                   compile=args.compile, dtype=args.dtype, data=args.data)


def main(argv=None) -> int:
    options = parse(argv)
    return run_cli(lambda: export(options), expected=[(CompactMismatch, error_line(1)), (OSError, os_error_line())])


if __name__ == "__main__":
    sys.exit(main())
