"""The struct-mode protocol: how a round's masks are chosen.

A struct mode turns the trained weights and current masks into a RoundPlan:
  train_masks    zeroed throughout the round's training,
  penalty_masks  weights an L2 regulariser pulls toward zero (RSST), or None,
  final_masks    what the round ends with (the weights are zeroed to them).
The round loop only sees masks; heads, channels and schedules live here.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from pruners.masks import Masks, global_magnitude_masks
from utils.config import RunConfig
from utils.errors import UsageError


@dataclass
class RoundPlan:
    train_masks: Masks
    final_masks: Masks
    penalty_masks: Optional[Masks] = None


@dataclass
class PruneContext:
    """What a struct mode may look at when planning a round."""
    model: nn.Module
    weights: Dict[str, torch.Tensor]  # prunable weights of `model`, by parameter name
    config: RunConfig
    round_index: int
    calibration_batches: Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor]]]
    log: Callable[[str], None] = print


class StructMode:
    """Element-wise global L1 pruning followed by an optional regroup."""

    name = "base"
    regularized = False
    accepts_vit_structured = False
    changes_forward = False  # True for modes whose configure_model changes how the model runs
    masks_weights = True  # False for modes that shrink tokens or factorise layers instead of masking weights

    def __init__(self, config: RunConfig):
        self.config = config

    def check_model(self, model: nn.Module) -> None:
        """Raise UsageError, before any work, when this mode cannot prune `model`."""
        if self.config.vit_structured and not self.accepts_vit_structured:
            raise UsageError(f"--vit_structured: not used by --struct {self.config.struct}; "
                             f"use --struct refill or rsst")

    def configure_model(self, model: nn.Module, round_index: int, log: Callable[[str], None] = print) -> None:
        """Called at the start of every round (also a resumed one) before training: modes that
        change how the model runs rather than its weights (token pruning) set it up here."""

    def round_metrics(self) -> dict:
        """Extra numbers for the round record (e.g. tokens kept); plain floats/ints."""
        return {}

    def element_masks(self, ctx: PruneContext, masks: Masks) -> Masks:
        return global_magnitude_masks(ctx.weights, masks, self.config.rate)

    def regroup(self, ctx: PruneContext, element_masks: Masks) -> Masks:
        return element_masks

    def plan_round(self, ctx: PruneContext, masks: Masks) -> RoundPlan:
        structured = self.regroup(ctx, self.element_masks(ctx, masks))
        return RoundPlan(train_masks=structured, final_masks=structured)

    def reg_lambda(self, progress: float) -> float:
        """Strength of the regulariser at `progress` in [0, 1] of the round; 0 when not regularised."""
        return 0.0

    def describe(self) -> str:
        return self.name
