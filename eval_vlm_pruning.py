"""Evaluate vision-token pruning of a LLaVA model in origin / soft / hard mode, with random and FastV baselines
at the same token budget, and write one JSON file (vlm/evaluate.py; docs/vlm_eval.md).

    python eval_vlm_pruning.py --tiny_random --modes origin soft hard --baselines random fastv --output r.json
    python eval_vlm_pruning.py --checkpoint runs/vlm_pruning/checkpoint_1000.pt --cifar_vqa data --output r.json
"""
import os
import sys
from typing import Optional, Sequence

from utils.cli import OneLineParser
from utils.errors import UsageError, run_cli

DEFAULT_LIMIT = 64
TINY_RANDOM_LIMIT = 8  # the tiny random LLaVA on one CPU core: ~30 s for 8 samples x 3 modes, minutes for 64


def parse_args(argv: Optional[Sequence[str]]):
    from vlm.evaluate import BASELINES, MODES
    p = OneLineParser(description="Origin / soft / hard evaluation of vision-token pruning (issue 11).")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a checkpoint of train_vlm_pruning.py (merger + pruner + model source)")
    source.add_argument("--tiny_random", action="store_true", help="tiny random LLaVA + untrained merger / pruner")
    p.add_argument("--data", help="VQA JSONL file (image, question, answers)")
    p.add_argument("--cifar_vqa", metavar="DIR", help="folder holding cifar-10-batches-py: its CIFAR-10 VQA test set")
    p.add_argument("--modes", nargs="+", default=list(MODES), help=f"any of {' '.join(MODES)}")
    p.add_argument("--baselines", nargs="*", default=[], help=f"any of {' '.join(BASELINES)} (run in soft/hard)")
    p.add_argument("--budgets", nargs="+", type=float, help="baselines' target T̄ in vision tokens "
                   "(default: the T̄ the learned method reached)")
    p.add_argument("--baseline_layers", nargs="+", type=int, default=[2], help="random drop's layers; FastV: first")
    p.add_argument("--output", required=True, help="results JSON (written atomically)")
    p.add_argument("--limit", type=int, help=f"samples evaluated (first N; default {DEFAULT_LIMIT}, "
                   f"{TINY_RANDOM_LIMIT} with --tiny_random: about 30 s on one CPU core)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=4)
    p.add_argument("--latency_iters", type=int, default=3, help="timed prefills per mode (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed prefills before them")
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_progress", action="store_true", help="no progress bar (stderr)")
    args = p.parse_args(argv)
    if args.limit is None:
        args.limit = TINY_RANDOM_LIMIT if args.tiny_random else DEFAULT_LIMIT
    for mode in args.modes:
        if mode not in MODES:
            raise UsageError(f"--modes {mode}: unknown mode; choose from {', '.join(MODES)}")
    for name in args.baselines:
        if name not in BASELINES:
            raise UsageError(f"--baselines {name}: unknown baseline; choose from {', '.join(BASELINES)}")
    if not args.checkpoint and not args.tiny_random:
        raise UsageError("--checkpoint or --tiny_random: give the model to evaluate")
    if args.data and args.cifar_vqa:
        raise UsageError("--data and --cifar_vqa: give one data source")
    if args.data and not os.path.isfile(args.data):
        raise UsageError(f"--data {args.data}: no such file")
    if args.cifar_vqa and not os.path.isdir(os.path.join(args.cifar_vqa, "cifar-10-batches-py")):
        raise UsageError(f"--cifar_vqa {args.cifar_vqa}: no cifar-10-batches-py folder in it "
                         f"(materialise ../shared/data with its materialize_cifar10.py)")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    if args.baselines and args.budgets is None and not set(args.modes) & {"soft", "hard"}:
        raise UsageError("--baselines: needs soft or hard in --modes, or --budgets")
    for flag in ("limit", "batch_size", "max_new_tokens", "latency_iters"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must be >= 0")
    if args.budgets is not None and any(b <= 0 for b in args.budgets):
        raise UsageError(f"--budgets {args.budgets}: token budgets must be positive")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--output {args.output}: folder {out_dir} does not exist")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    def work() -> str:
        args = parse_args(argv)
        from utils.checkpoint import atomic_write_json
        from vlm.evaluate import evaluate_from_args, summary_table
        results = evaluate_from_args(args)
        atomic_write_json(args.output, results, indent=2)
        return summary_table(results), args.output

    return run_cli(work, lambda done: print(f"{done[0]}\nwrote {done[1]}"))


if __name__ == "__main__":
    sys.exit(main())
