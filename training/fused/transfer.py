"""The lockstep driver's copies between the cells and their fused model, around each fused epoch.

The cells stay the source of truth (their checkpoints are those of separate runs): before an epoch, each
cell's weights, masks, momentum and running sums go into the fused tensors; after it, back into each cell.
"""
import math
from typing import Optional, Sequence

import torch

from training.fused.models import FusedModel
from training.fused.step import FusedTrainStep
from training.loop import EpochResult


@torch.no_grad()
def load_group(fused: FusedModel, step: FusedTrainStep, group: Sequence) -> None:
    """The cells' weights, masks, momentum and running sums into the fused tensors (in place; a few multi-tensor
    copies). group: the EpochRequests (training/fused/requests.py) of the cells, in the fused model's cell order."""
    sessions = [r.runner.session for r in group]
    fused.load_cells([s.model.state_dict() for s in sessions])
    step.load_cell_steps([s.step for s in sessions])
    step.skipped.zero_()  # this call's skips; those before it come in each request's `carried`


@torch.no_grad()
def store_group(fused: FusedModel, step: FusedTrainStep, group: Sequence, stopped: Optional[int], seen: int) -> None:
    """Weights, momentum and running sums back into each cell (in place; a few multi-tensor copies), and each
    request's EpochResult: `seen` images per cell this call (`stopped`: the batch a stop ended the epoch at, or
    None)."""
    sessions = [r.runner.session for r in group]
    fused.store_cells([s.model.state_dict() for s in sessions])
    step.store_cell_steps([s.step for s in sessions])
    skips = step.skipped.tolist()
    for i, (request, session) in enumerate(zip(group, sessions)):
        # a skipped batch trains no images (training batches are all --batch_size: partial ones are dropped)
        samples = request.carried[0] + seen - skips[i] * request.runner.config.batch_size
        skipped = request.carried[1] + skips[i]
        if stopped is not None:
            request.result = EpochResult(loss=math.nan, accuracy=math.nan, samples=samples, skipped=skipped,
                                         stopped_at=stopped)
            continue
        loss_sum, correct, bad = session.step.read_epoch()
        request.result = EpochResult(loss=loss_sum / max(samples, 1), accuracy=100.0 * correct / max(samples, 1),
                                     samples=samples, bad_step=bad, skipped=skipped)
