"""Lottery-ticket control branches: the same sparsity as a ticket, without what makes it a ticket.

`--resume_from <k>checkpoint.pth.tar --branch KIND` re-trains round k of the parent in a run dir of
its own, as open_lth's branches do (Frankle & Carbin 2019, sec. 2 and 4; Frankle et al. 2020):

    retrain        the parent's round-k masks, trained again from the parent's rewind point
                   (--prune_type pt: from the round's trained weights) under this run's flags
    random_reinit  the parent's round-k masks, weights drawn fresh at random (a new init, seeded by
                   --seed); the fresh init is also this branch's rewind point for later rounds
    random_prune   the parent's per-layer kept counts at random positions (element-wise), trained
                   from the parent's rewind point

A ticket that beats random_reinit and random_prune at the same sparsity owes its accuracy to the
weights / positions IMP found. Further rounds (--pruning_times > k + 1) go on pruning as usual.
"""
import os
from typing import Dict, Optional

import torch

from data import DATASETS
from models import create_model
from pruners.base import RoundPlan
from pruners.masks import apply_masks, random_masks_like
from training.session import RoundProgress, Session
from utils import checkpoint
from utils.seeding import derived_seed

SEEDED = ("random_reinit", "random_prune")  # controls whose --seed may differ from the parent's
# the draws of a control must differ from the parent's own init and from each other, whatever --seed is
_STREAMS = {"random_reinit": 0x5EED01, "random_prune": 0x5EED02}


def fresh_init(arch: str, num_classes: int, seed: int) -> Dict[str, torch.Tensor]:
    """A new random initialisation of `arch` (CPU state dict) from a stream of its own; the global RNG
    is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, _STREAMS["random_reinit"]))
        return {k: v.detach().clone() for k, v in create_model(arch, num_classes).state_dict().items()}


def control_start(session: Session, kind: str, payload: dict, path: str,
                  rewind_source: Optional[str]) -> "tuple[RoundProgress, Optional[Dict[str, torch.Tensor]]]":
    """Set up `session` to train round `payload["round"]` as the control `kind` (after the parent
    checkpoint `payload` at `path` was restored into it). Returns the round's progress (epoch 0, fixed
    masks, the parent as lineage parent) and, for random_reinit with a rewinding --prune_type, the fresh
    init to save as this branch's rewind weights (None otherwise)."""
    config, round_index = session.config, payload["round"]
    masks = session.masks_from(payload, "masks")
    if kind == "random_prune":
        generator = torch.Generator().manual_seed(derived_seed(config.seed, _STREAMS["random_prune"], round_index))
        masks = random_masks_like(masks, generator)
    new_rewind = None
    if kind == "random_reinit":
        state = fresh_init(config.arch, DATASETS[config.dataset].num_classes, config.seed)
        session.model.load_state_dict(state)
        new_rewind = None if config.prune_type == "pt" else state
    elif rewind_source is not None:  # retrain / random_prune: back to the parent's rewind point
        session.model.load_state_dict(checkpoint.load_file(rewind_source)["model"])
    apply_masks(session.weights, masks)
    session.best_round = None  # a new training of round k: its own best
    progress = RoundProgress(round=round_index, plan=RoundPlan(train_masks=masks, final_masks=masks),
                             parent=os.path.abspath(path), parent_sha256=checkpoint.sha256_of(path))
    return progress, new_rewind
