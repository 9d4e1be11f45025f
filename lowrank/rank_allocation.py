"""Adaptive rank of the AdaLoRA factoriser through peft's RankAllocator (peft.tuners.adalora).

The allocator scores each rank triplet (lora_A row, lora_E entry, lora_B column) by smoothed
sensitivity |w * dL/dw| times its uncertainty, and masks the weakest E entries down to a budget
that falls on a cubic schedule from init_r to target_r (Zhang et al., ICLR 2023):
    steps 1..tinit                  warm-up, every rank kept
    tinit < step < T - tfinal       budget shrinks, masks every deltaT steps
    step == T - tfinal              final mask (target budget), fixed from then on
    step > T - tfinal               the final rank pattern is re-applied every step
This module only drives peft's object the way peft's AdaLoraModel.update_and_allocate does; the
scoring and masking are peft's own code. One difference: between two masks of the budgeting phase
the latest rank pattern is re-applied after every step (peft's own `mask_using_rank_pattern`, which
AdaLoraModel uses only in the final phase). AdaLoraModel lets the optimiser revive a masked scale
until the next mask; here a revived E of size ~lr would bring its row back into the AdaLoRA
factoriser's least-squares code at a tiny scale and spoil the reconstruction, so masking is monotone.
"""
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from lowrank.models import ADAPTER
from utils.errors import UsageError

BETA = 0.85  # peft's default smoothing of sensitivity (beta1) and uncertainty (beta2)


@dataclass(frozen=True)
class AllocatorSettings:
    """init_warmup = peft tinit, final_warmup = tfinal, mask_interval = deltaT (steps);
    keep_ratio = target_r / init_r."""
    init_warmup: int
    final_warmup: int
    mask_interval: int
    keep_ratio: float


def target_rank(init_rank: int, keep_ratio: float) -> int:
    """round(init_rank * keep_ratio), at least 1."""
    return max(1, round(init_rank * keep_ratio))


def check_settings(settings: AllocatorSettings, init_rank: int, total_steps: int) -> None:
    """Raise UsageError (one line naming the flag) where peft would crash or refuse the schedule."""
    target = target_rank(init_rank, settings.keep_ratio)
    if not 0 < settings.keep_ratio or target >= init_rank:
        raise UsageError(f"--allocator_keep_ratio {settings.keep_ratio}: the target rank {target} must be below "
                         f"the initial rank {init_rank} (peft's RankAllocator cannot mask nothing)")
    if settings.mask_interval < 1 or settings.init_warmup < 0 or settings.final_warmup < 0:
        raise UsageError("--allocator_mask_interval must be >= 1 and the warm-ups >= 0")
    if settings.init_warmup >= total_steps - settings.final_warmup:
        raise UsageError(f"--allocator_init_warmup {settings.init_warmup} + --allocator_final_warmup "
                         f"{settings.final_warmup} leave no budgeting phase in {total_steps} training steps "
                         f"(epochs x batches per epoch)")


class RankAllocation:
    """peft's RankAllocator attached to an AdaLoRA factoriser for `total_steps` optimiser steps.

    Call `step(global_step)` after every optimiser step (gradients still present), global_step
    counting from 1; it returns the effective rank (number of non-zero E entries) afterwards.
    """

    def __init__(self, model: nn.Module, settings: AllocatorSettings, total_steps: int):
        check_settings(settings, model.rank, total_steps)
        from peft import AdaLoraConfig  # imported here: peft (transformers) takes seconds to import
        from peft.tuners.adalora import RankAllocator
        self.model, self.total_steps = model, total_steps
        self.config = AdaLoraConfig(init_r=model.rank, target_r=target_rank(model.rank, settings.keep_ratio),
                                    tinit=settings.init_warmup, tfinal=settings.final_warmup,
                                    deltaT=settings.mask_interval, beta1=BETA, beta2=BETA, total_step=total_steps)
        self.allocator = RankAllocator(model, self.config, ADAPTER)
        self.rank_pattern: Optional[dict] = None

    @property
    def final_step(self) -> int:
        """The step at which the target budget is fixed (T - tfinal)."""
        return self.total_steps - self.config.tfinal

    def step(self, global_step: int) -> int:
        if global_step < self.final_step:
            _, pattern = self.allocator.update_and_allocate(self.model, global_step)
            if pattern is None and self.rank_pattern is not None:
                self.allocator.mask_using_rank_pattern(self.model, self.rank_pattern)
            self.rank_pattern = pattern or self.rank_pattern
        elif global_step == self.final_step:
            _, self.rank_pattern = self.allocator.update_and_allocate(self.model, global_step, force_mask=True)
            self.allocator.reset_ipt()
        else:
            self.allocator.mask_using_rank_pattern(self.model, self.rank_pattern)
        return effective_rank(self.model)

    def finished(self, global_step: int) -> bool:
        """True once the final rank pattern is fixed."""
        return global_step >= self.final_step


def effective_rank(model: nn.Module) -> int:
    """Number of rank triplets whose scale E is non-zero (the model's rank for models without E)."""
    return int(model.kept_ranks().numel()) if hasattr(model, "kept_ranks") else model.rank
