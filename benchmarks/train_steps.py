"""The runner's own training step, built as the benchmarks time it (shared by epoch_speed and fused_speed).

One model of `arch` (10 classes) and training/step.py's TrainStep with the runner's GPU settings: bf16
autocast on CUDA (fp32 on the CPU), channels_last for convnets on CUDA, the step captured in one CUDA
graph on its first call, torch.compile inside it when asked; optionally 80 % of the prunable weights
masked (random masks), so the masked path runs.
"""
from typing import NamedTuple

import torch

from models import create_model, dense_modules
from pruners.base import RoundPlan
from pruners.masks import prunable_weights
from training.rounds import wants_channels_last
from training.step import TrainStep, resolve_amp

MASKED_SHARE = 0.8  # fraction of the prunable weights a masked benchmark step masks out
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4


class PlainStep(NamedTuple):
    model: torch.nn.Module
    step: TrainStep
    amp: str             # "bf16" on CUDA, "none" on the CPU
    channels_last: bool  # the step feeds the model channels_last images (convnets on CUDA)


def random_masks(weights: dict, generator: torch.Generator = None) -> dict:
    """0/1 float masks shaped as `weights` (name -> tensor), each entry kept with probability 1 - MASKED_SHARE."""
    return {name: (torch.rand(w.shape, generator=generator, device=w.device) >= MASKED_SHARE).float()
            for name, w in weights.items()}


def plain_step(arch: str, device: torch.device, masked: bool, compiled: bool) -> PlainStep:
    """One model and its graph-captured TrainStep (lr and lambda are per-call arguments of the step).

    `masked`: 80 % of the prunable weights masked (models.dense_modules excluded, as the runner does).
    `compiled`: torch.compile inside the step (TrainStep falls back to eager, with a warning, on failure).
    Raises ValueError (models registry) for an unknown arch.
    """
    model = create_model(arch, 10).to(device)
    weights = prunable_weights(model, exclude=dense_modules(model))
    nhwc = wants_channels_last("auto", model, device)  # the runner's rule: convnets on CUDA
    if nhwc:
        model.to(memory_format=torch.channels_last)
    amp = resolve_amp("auto", device)
    step = TrainStep(model, weights if masked else {}, device, amp, MOMENTUM, WEIGHT_DECAY, regularized=False,
                     use_graph=True, channels_last=nhwc, compile_model=compiled)
    masks = random_masks(weights) if masked else {}
    step.start_round(RoundPlan(train_masks=masks, final_masks=masks))
    return PlainStep(model, step, amp, nhwc)
