"""Horizontal fusion: N same-shaped runs of a sweep trained as one model (HFTA, MLSys 2021).

models.py: FusedModel and the grouped-conv route; stacked.py: the vmap and streams routes;
fuse.py: fuse_models (route choice), fuse_masks.
step.py: FusedTrainStep, N TrainSteps in one (per-cell lr, lambda, weight decay, masks, skips).
runner.py: LockstepDriver, the cells of a fused group in threads; console.py: their labelled output.
See docs/fused.md.
"""
from training.fused.fuse import fuse_masks, fuse_models
from training.fused.models import FusedModel
from training.fused.step import FusedTrainStep

__all__ = ["FusedModel", "FusedTrainStep", "fuse_masks", "fuse_models"]
