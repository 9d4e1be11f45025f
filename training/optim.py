"""The per-step learning rate of a round (the optimiser update itself is in step.py).

The LR is a pure function of (epoch, step) -- linear warm-up over `--warmup`
epochs, then x0.1 at each `--decreasing_lr` milestone -- so the schedule has no
state to save: a resumed run recomputes it.
"""
from typing import Sequence

from utils.config import RunConfig


def lr_at(base_lr: float, epoch: int, step: int, steps_per_epoch: int, warmup: int,
          milestones: Sequence[int]) -> float:
    if epoch < warmup:
        return base_lr * (epoch * steps_per_epoch + step + 1) / (warmup * steps_per_epoch)
    return base_lr * 0.1 ** sum(1 for m in milestones if epoch >= m)


def effective_warmup(config: RunConfig) -> int:
    """The default warm-up (20 epochs) shrinks to a sixth of a short round; an explicit one is kept."""
    return config.warmup if config.warmup < config.epochs else config.epochs // 6
