"""Evaluation and BatchNorm recalibration of N cells as one fused forward: each cell's own batches through the
fused model at once.

The lockstep driver's cells validate after every epoch (and test after every round), and in RSST rounds
recompute their BatchNorm statistics for the sparse view before each validation; run one after another, N
such forwards of a small model leave the GPU as idle as N separate trainings would. `evaluate_cells` is
training.loop.evaluate for a FusedModel (the same loss and top-1 sums, per cell), `recalibrate_cells`
training.loop.recalibrate_batchnorm (a wide BatchNorm's per-channel statistics are each cell's own).
"""
import itertools
from typing import Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from training.fused.models import FusedModel
from training.loop import EpochResult, recalibrate_batchnorm
from training.step import autocast


def stacked_batches(fused: FusedModel, loaders: Sequence[Iterable[Tuple[torch.Tensor, torch.Tensor]]],
                    device: torch.device) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The cells' batches side by side: (images as `fused.stack_images` lays them out [N, B, C, H, W], labels
    [N, B]) on `device`, from one loader per cell in cell order. Raises ValueError when the loaders are not one
    per cell or yield different batch counts or sizes (fused cells share the split sizes and batch size)."""
    if len(loaders) != fused.cells:
        raise ValueError(f"{len(loaders)} loaders for {fused.cells} cells")
    finished = object()
    for batches in itertools.zip_longest(*loaders, fillvalue=finished):
        if any(batch is finished for batch in batches) or len({batch[1].shape[0] for batch in batches}) > 1:
            raise ValueError("the cells' loaders differ in batch count or batch size")
        yield (fused.stack_images([batch[0].to(device) for batch in batches]),
               torch.stack([batch[1].to(device) for batch in batches]))


@torch.no_grad()
def evaluate_cells(fused: FusedModel, loaders: Sequence[Iterable[Tuple[torch.Tensor, torch.Tensor]]],
                   device: torch.device, amp: str = "none") -> List[EpochResult]:
    """Loss and top-1 accuracy (%) of each cell of `fused` (eval mode) on its own loader.

    loaders: one per cell, in cell order, yielding (images [B, C, H, W], labels [B]) batches of equal sizes
    across cells (the same split size: what fused cells share). The cells' batches are stacked
    (`fused.stack_images`) and run as one forward: logits [N, B, classes]. Raises ValueError when the loaders
    are not one per cell or yield different batch counts or sizes."""
    fused.eval()
    cells = fused.cells
    loss_sum = torch.zeros(cells, device=device)
    correct = torch.zeros(cells, device=device, dtype=torch.long)
    seen = 0
    for images, labels in stacked_batches(fused, loaders, device):
        with autocast(device, amp):
            logits = fused(images)  # [N, B, classes]
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        loss_sum += losses.view(cells, -1).sum(dim=1)
        correct += (logits.argmax(-1) == labels).sum(dim=1)
        seen += labels.shape[1]
    losses, hits = loss_sum.tolist(), correct.tolist()
    return [EpochResult(loss=losses[i] / max(seen, 1), accuracy=100.0 * hits[i] / max(seen, 1), samples=seen)
            for i in range(cells)]


@torch.no_grad()
def recalibrate_cells(fused: FusedModel, loaders: Sequence[Iterable[Tuple[torch.Tensor, torch.Tensor]]],
                      device: torch.device, amp: str = "none") -> bool:
    """Recompute every BatchNorm running statistic of `fused` as a plain average over the cells' own batches
    (train-mode forwards of the stacked batches, one loader per cell as for `evaluate_cells`): each cell's
    channels get the statistics `training.loop.recalibrate_batchnorm` computes for that cell alone (up to
    rounding). Returns False for a model without BatchNorm; ValueError as `stacked_batches`."""
    return recalibrate_batchnorm(fused, stacked_batches(fused, loaders, device), amp)
