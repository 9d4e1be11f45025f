"""The per-step learning rate of a round (the optimiser update itself is in step.py).

The LR is a pure function of (epoch, step) -- linear warm-up over the round's
effective warm-up, then x0.1 at each milestone (both resolved together by
utils.config.resolve_schedule) -- so the schedule has no state to save: a
resumed run recomputes it.
"""
from typing import Sequence

from utils.config import RunConfig


def lr_at(base_lr: float, epoch: int, step: int, steps_per_epoch: int, warmup: int,
          milestones: Sequence[int]) -> float:
    """The LR of step `step` (0-based) of epoch `epoch` (0-based): it reaches `base_lr` on the last
    step of the warm-up, then drops x0.1 from the start of each milestone epoch."""
    if epoch < warmup:
        return base_lr * (epoch * steps_per_epoch + step + 1) / (warmup * steps_per_epoch)
    return base_lr * 0.1 ** sum(1 for m in milestones if epoch >= m)


def effective_warmup(config: RunConfig) -> int:
    """Warm-up epochs of a round: the config's resolved value (or the default resolution)."""
    return config.schedule()[0]
