"""One epoch of masked training, and evaluation. Knows nothing about rounds.

The step itself (forward, backward, masked SGD, RSST penalty) is a TrainStep
(step.py); metrics accumulate on the device and are read once per epoch, so a
CUDA epoch has one host synchronisation -- plus one per `report_every` steps
when progress lines are printed (no progress bar), and one per epoch for the
finiteness check of the weights.

Under torchrun (training/distributed.py) a batch is this rank's part of a global batch: counts of
images are global (local count x ranks) and evaluation sums its counts over the ranks.
"""
import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.distributed import SINGLE, Distributed
from training.step import TrainStep, autocast


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    samples: int  # images trained on in the epoch (a resumed epoch: before the stop too)
    bad_step: Optional[int] = None  # first step whose loss was not finite (policy "stop")
    skipped: int = 0  # batches skipped for a non-finite loss (policy "skip_batch")
    stopped_at: Optional[int] = None  # batches done when a stop request ended the epoch early


def train_epoch(model: nn.Module, step: TrainStep, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                schedule: Callable[[int], Tuple[float, float]], start: int = 0, carried: Tuple[int, int] = (0, 0),
                stop: Optional[Callable[[], bool]] = None, report: Optional[Callable[[int, int], None]] = None,
                report_every: int = 0) -> EpochResult:
    """Train on `batches`, the epoch's batches from number `start` on (a resumed epoch starts past 0).

    `schedule(i)` gives (learning rate, regulariser strength) for batch i of the epoch. `carried`:
    (images trained, batches skipped) before `start`; the step's device sums already hold their loss.
    `stop()` is asked after every step (a host flag: no sync); when it says yes the epoch ends there
    with `stopped_at` set and the step's sums left unread, for a mid-epoch checkpoint.
    `report(done, seen)` is called every `report_every` batches (it may read the running sums).
    Images are counted over all ranks (each rank's batch is one of `step.dist.world_size` equal parts).
    """
    model.train()
    seen, skipped = carried
    for index, (images, labels) in enumerate(batches, start):
        lr, reg_lambda = schedule(index)
        if step(images, labels, lr, reg_lambda):
            seen += labels.shape[0] * step.dist.world_size
        else:
            skipped += 1
        if report is not None and report_every and (index + 1) % report_every == 0:
            report(index + 1, seen)
        if stop is not None and stop():
            return EpochResult(loss=math.nan, accuracy=math.nan, samples=seen, skipped=skipped,
                               stopped_at=index + 1)
    loss_sum, correct, bad = step.read_epoch()
    return EpochResult(loss=loss_sum / max(seen, 1), accuracy=100.0 * correct / max(seen, 1), samples=seen,
                       bad_step=bad, skipped=skipped)


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def epoch_line(record: dict, epochs: int, eta_seconds: float) -> str:
    """One log line for a finished epoch: loss, accuracies, lr, lambda, img/s, ETA of the round."""
    val = record.get("val_top1")
    return (f"round {record['round']} epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}  "
            f"train {record['train_top1']:.2f}%  val {'-' if val is None else f'{val:.2f}%'}  "
            f"lr {record['lr']:.3g}  lambda {record['reg_lambda']:.3g}  "
            f"{record['images_per_second']:.0f} img/s  round ETA {format_duration(eta_seconds)}")


def step_line(round_index: int, epoch: int, epochs: int, done: int, steps: int, loss: float,
              images_per_second: float) -> str:
    """One log line inside an epoch: batches done, running loss, images/s so far."""
    return (f"round {round_index} epoch {epoch}/{epochs} step {done}/{steps}: running loss {loss:.4f}  "
            f"{images_per_second:.0f} img/s")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, amp: str = "none",
             channels_last: bool = False, dist: Distributed = SINGLE) -> EpochResult:
    """Loss and top-1 accuracy (%) of `model` on `batches`; under torchrun `batches` is this rank's shard and
    the sums are those of all ranks."""
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
    if dist.enabled:
        totals = dist.sum_tensor(torch.stack([loss_sum.double(), correct.double(),
                                              torch.tensor(float(seen), dtype=torch.float64, device=device)]))
        loss_sum, correct, seen = totals[0], totals[1].round().long(), int(totals[2])
    return EpochResult(loss=float(loss_sum) / max(seen, 1), accuracy=100.0 * int(correct) / max(seen, 1),
                       samples=seen)


def tracked_batchnorms(model: nn.Module) -> List[nn.Module]:
    """The BatchNorm modules of `model` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, amp: str = "none", channels_last: bool = False) -> bool:
    """Recompute BatchNorm running statistics as a plain average over `batches` (train-mode forwards).

    Zeroing weights that were still training (the end of an RSST round) changes the activations
    the stored statistics describe; without this the sparse model is evaluated with stale ones.
    Returns False (and does nothing) for models without BatchNorm.
    """
    norms = tracked_batchnorms(model)
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
