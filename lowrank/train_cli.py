"""Flags of train_lowrank.py (alias train_real_data.py) -> one frozen TrainConfig, checked before any work.

    python train_lowrank.py --arch ResMLP|MLP|AdaLoRA --features CACHE --epochs 100 --lr 1e-4 --rank 128
        --batch_size 8 --lambda_B 1e-4 --lambda_ortho 1e-3 --weight_decay 1e-5 --patience 10
        --results_dir results [--resume] [--dropout 0.0] [--use_rank_allocator --allocator_init_warmup S
        --allocator_final_warmup S --allocator_mask_interval S --allocator_keep_ratio 0.5]

Every refusal is one line `error: ...` naming the flag or file, exit 2, with nothing written.
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from utils.errors import NumericalError, UsageError, error_line, os_error_line, run_cli

VAL_FRACTION, SPLIT_SEED = 0.1, 0


@dataclass(frozen=True)
class TrainConfig:
    arch: str
    features: str
    epochs: int
    lr: float
    rank: int
    batch_size: int
    lambda_B: float
    lambda_ortho: float
    weight_decay: float
    patience: int
    results_dir: str
    resume: bool
    dropout: float
    use_rank_allocator: bool
    allocator_init_warmup: Optional[int]
    allocator_final_warmup: Optional[int]
    allocator_mask_interval: int
    allocator_keep_ratio: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Learn X [N, D] ~ A [N, r] B [r, D] on a feature cache "
                                                 "(see docs/lowrank.md).")
    add = parser.add_argument
    add("--arch", required=True, help="ResMLP, MLP or AdaLoRA")
    add("--features", required=True, metavar="CACHE", help="feature cache directory (extract_features.py)")
    add("--epochs", type=int, default=100, help="epochs to train; with --resume, additional epochs")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate")
    add("--rank", type=int, default=128, help="rank r of the factors, 1..min(N, D) (ignored with --resume)")
    add("--batch_size", type=int, default=8)
    add("--lambda_B", type=float, default=1e-4, help="weight of ||B||^2 / (r D)")
    add("--lambda_ortho", type=float, default=1e-3, help="weight of ||B B^T - I||^2 / r^2")
    add("--weight_decay", type=float, default=1e-5, help="AdamW weight decay")
    add("--patience", type=int, default=10, help="early stopping: epochs without a lower validation MSE")
    add("--results_dir", default="results", help="outputs go to RESULTS_DIR/<arch>/")
    add("--resume", action="store_true", help="continue from RESULTS_DIR/<arch>/best_model.pt")
    add("--dropout", type=float, default=0.0, help="dropout inside the trunk")
    add("--use_rank_allocator", action="store_true", help="AdaLoRA: prune ranks with peft's RankAllocator")
    add("--allocator_init_warmup", type=int, default=None,
        help="steps before pruning (peft tinit; default 10%% of steps)")
    add("--allocator_final_warmup", type=int, default=None,
        help="steps at the final rank (peft tfinal; default 20%% of steps)")
    add("--allocator_mask_interval", type=int, default=10, help="steps between masks (peft deltaT)")
    add("--allocator_keep_ratio", type=float, default=0.5, help="target rank / initial rank (below 1)")
    return parser


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse and check the plain ranges (files and shapes are checked by `prepare`)."""
    args = build_parser().parse_args(argv)
    from lowrank.models import ARCHS
    ARCHS[args.arch]  # UsageError listing the archs
    _check(args.epochs >= 1, f"--epochs {args.epochs}: must be at least 1")
    _check(args.batch_size >= 1, f"--batch_size {args.batch_size}: must be at least 1")
    _check(args.patience >= 1, f"--patience {args.patience}: must be at least 1")
    for flag in ("lr", "lambda_B", "lambda_ortho", "weight_decay"):
        value = getattr(args, flag)
        _check(math.isfinite(value) and value >= 0, f"--{flag} {value}: must be a finite number >= 0")
    _check(not args.use_rank_allocator or args.arch == "AdaLoRA",
           f"--use_rank_allocator: only --arch AdaLoRA has per-rank scales to prune (got --arch {args.arch})")
    return TrainConfig(**vars(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry: 0 done, 2 bad input (one line, nothing written), 3 non-finite loss."""
    def work() -> None:
        config = parse_config(argv)
        from lowrank.trainer import prepare, train
        train(prepare(config))

    interrupted = "interrupted; best_model.pt and history.json hold the last finished epoch"
    return run_cli(work, expected=[(NumericalError, error_line(3)), (OSError, os_error_line()),
                                   (KeyboardInterrupt, lambda exc: (interrupted, 130))])
