"""One epoch of masked training, and evaluation. Knows nothing about rounds.

The step itself (forward, backward, masked SGD, RSST penalty) is a TrainStep
(step.py); metrics accumulate on the device and are read once per epoch, so a
CUDA epoch has exactly one host synchronisation.
"""
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.step import TrainStep, autocast


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    samples: int
    bad_step: Optional[int] = None  # first step whose loss was not finite (policy "stop")
    skipped: int = 0  # batches skipped for a non-finite loss (policy "skip_batch")


def train_epoch(model: nn.Module, step: TrainStep, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                schedule: Callable[[int], Tuple[float, float]]) -> EpochResult:
    """`schedule(i)` gives (learning rate, regulariser strength) for step i."""
    model.train()
    seen, skipped = 0, 0
    for index, (images, labels) in enumerate(batches):
        lr, reg_lambda = schedule(index)
        if step(images, labels, lr, reg_lambda):
            seen += labels.shape[0]
        else:
            skipped += 1
    loss_sum, correct, bad = step.read_epoch()
    return EpochResult(loss=loss_sum / max(seen, 1), accuracy=100.0 * correct / max(seen, 1), samples=seen,
                       bad_step=bad, skipped=skipped)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, amp: str = "none",
             channels_last: bool = False) -> EpochResult:
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, labels in batches:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.shape[0]
    return EpochResult(loss=float(loss_sum) / max(seen, 1), accuracy=100.0 * int(correct) / max(seen, 1),
                       samples=seen)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, amp: str = "none", channels_last: bool = False) -> bool:
    """Recompute BatchNorm running statistics as a plain average over `batches` (train-mode forwards).

    Zeroing weights that were still training (the end of an RSST round) changes the activations
    the stored statistics describe; without this the sparse model is evaluated with stale ones.
    Returns False (and does nothing) for models without BatchNorm.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    try:
        for images, _ in batches:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                model(images)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return True
