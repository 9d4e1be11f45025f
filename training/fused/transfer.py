"""The lockstep driver's copies between the cells and their fused model, around each fused epoch.

The cells stay the source of truth (their checkpoints are those of separate runs): before an epoch, each
cell's weights, masks, momentum and running sums go into the fused tensors; after it, back into each cell.
"""
import math
from typing import Optional, Sequence

import torch

from pruners.base import RoundPlan
from training.fused.models import FusedModel
from training.fused.step import FusedTrainStep
from training.loop import EpochResult


@torch.no_grad()
def load_group(fused: FusedModel, step: FusedTrainStep, group: Sequence) -> None:
    """The cells' weights, masks, momentum and running sums into the fused tensors (in place). group: the
    EpochRequests (training/fused/requests.py) of the cells, in the fused model's cell order."""
    steps = [r.runner.session.step for r in group]
    fused.load_cells([r.runner.session.model.state_dict() for r in group])
    step.start_round([RoundPlan(train_masks=dict(zip(s.masked_names, s.masks)),
                                final_masks=dict(zip(s.masked_names, s.masks)),
                                penalty_masks=dict(zip(s.masked_names, s.penalty_masks)) if s.penalty_masks
                                else None) for s in steps])
    for i, cell_step in enumerate(steps):
        step.load_cell_state_dict(i, cell_step.state_dict())
        for name in ("loss_sum", "correct", "first_bad"):
            getattr(step, name)[i].copy_(getattr(cell_step, name))
    step.step_index.copy_(steps[0].step_index)
    step.skipped.zero_()  # this call's skips; those before it come in each request's `carried`


@torch.no_grad()
def store_group(fused: FusedModel, step: FusedTrainStep, group: Sequence, stopped: Optional[int], seen: int) -> None:
    """Weights, momentum and running sums back into each cell, and each request's EpochResult: `seen` images per
    cell this call (`stopped`: the batch a stop ended the epoch at, or None)."""
    shared = [name for name, (_, index) in fused.fused_state.items() if index[0] == ()]
    skips = step.skipped.tolist()
    before = [{name: r.runner.session.model.state_dict()[name].clone() for name in shared} for r in group]
    for i, (request, state) in enumerate(zip(group, fused.unfuse())):
        session = request.runner.session
        for name in shared:  # one counter for the group, which started at cell 0's value
            state[name] = before[i][name] + (state[name] - before[0][name])
        session.model.load_state_dict(state)
        session.step.load_state_dict(step.cell_state_dict(i))
        for name in ("loss_sum", "correct", "first_bad"):
            getattr(session.step, name).copy_(getattr(step, name)[i])
        session.step.step_index.copy_(step.step_index)
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
