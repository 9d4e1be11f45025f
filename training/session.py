"""Everything a run holds in memory, and its conversion to and from checkpoints.

A Session owns the model, its prunable weights, the loaders, the struct mode,
the current round's plan and best-validation state. `payload()` turns it into a
checkpoint dict of plain types and tensors; `restore()` does the reverse.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from data import DataSplits, ImageSet
from data.loader import TensorLoader
from models import dense_modules
from pruners.base import RoundPlan, StructMode
from pruners.masks import Masks, dense_masks, from_storage, prunable_weights, to_storage
from pruners.reshaping import ShapeChangingMode
from training.distributed import SINGLE, Distributed
from training.step import TrainStep
from utils import checkpoint
from utils.config import RunConfig
from utils.errors import UsageError
from utils.seeding import capture_rng_state, restore_rng_state

EVAL_BATCH = 1024


def device_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of the model's state on its own device (a snapshot to restore or keep as the best)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cpu_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def prunable_of(model: torch.nn.Module, config: RunConfig) -> Dict[str, torch.nn.Parameter]:
    """The weights a run masks: every conv / linear weight but the stem's and the classifier's
    (unless --conv1 / --fc)."""
    return prunable_weights(model, exclude=dense_modules(model, config.conv1, config.prune_classifier))


def check_batch_statistics(model: torch.nn.Module, train: TensorLoader, config: RunConfig) -> None:
    """UsageError, before any work, when a BatchNorm model would see a training batch of one image
    (train-mode BatchNorm needs more than one value per channel)."""
    if train.smallest_batch >= 2 or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                            for m in model.modules()):
        return
    if config.batch_size == 1:
        raise UsageError(f"--batch_size 1: --arch {config.arch} has BatchNorm, which needs at least 2 images "
                         f"per training batch")
    raise UsageError(f"--val_size{'' if config.val_size is None else f' {config.val_size}'}: leaves "
                     f"{len(train.labels)} training image(s); "
                     f"--arch {config.arch} has BatchNorm, which needs at least 2 per training batch")


@dataclass
class RoundProgress:
    """Where the current round stands."""
    round: int
    plan: RoundPlan
    epoch: int = 0  # epochs completed
    best_val: float = -1.0
    best_epoch: int = -1
    best_model: Optional[Dict[str, torch.Tensor]] = None
    last_train_loss: float = float("nan")
    parent: Optional[str] = None  # the checkpoint this round continues from
    parent_sha256: Optional[str] = None
    # a stop inside epoch `epoch` (0-based): batches done, and the epoch's running sums so far
    # ({"counters": TrainStep.counters_state(), "seen": images, "skipped": batches})
    batch: int = 0
    epoch_sums: Optional[dict] = None


@dataclass
class Session:
    config: RunConfig
    directory: str
    device: torch.device
    model: torch.nn.Module
    weights: Dict[str, torch.Tensor]
    splits: DataSplits
    best_round: Optional[dict] = None  # {round, val_top1, test_top1} of the best-validation round so far
    loaders: Dict[str, TensorLoader] = field(default_factory=dict)
    amp: str = "none"
    channels_last: bool = False
    step: Optional[TrainStep] = None
    struct: Optional[StructMode] = None
    # the metrics.jsonl records of the round under way, saved in its checkpoints (utils/history.py rebuilds
    # a lost or damaged metrics.jsonl from them); the Tracker appends to this list
    history: List[dict] = field(default_factory=list)
    dist: Distributed = SINGLE  # torchrun ranks (training/distributed.py); SINGLE: one process

    def __post_init__(self):
        spec, device, config = self.splits.spec, self.device, self.config
        shard = (self.dist.rank, self.dist.world_size)  # each rank: its part of every global batch
        # one device copy of the training images serves both the training and the calibration loader
        train = ImageSet(self.splits.train.images.to(device), self.splits.train.labels.to(device))
        self.loaders = {
            "train": TensorLoader(train, config.batch_size, spec.mean, spec.std, device, True, True, shard),
            "val": TensorLoader(self.splits.val, EVAL_BATCH, spec.mean, spec.std, device, False, shard=shard),
            "test": TensorLoader(self.splits.test, EVAL_BATCH, spec.mean, spec.std, device, False, shard=shard),
            # batches seen in training mode (BatchNorm recalibration) follow the training loader's drop_last;
            # every rank sees them whole (masks are computed from them on every rank)
            "calibration": TensorLoader(train, config.batch_size, spec.mean, spec.std, device, False, True),
        }
        check_batch_statistics(self.model, self.loaders["train"], config)

    def new_step(self) -> TrainStep:
        """A training step over the model's current parameters (fresh optimiser state)."""
        config, device = self.config, self.device
        return TrainStep(self.model, self.weights, device, self.amp, config.momentum, config.weight_decay,
                         self.struct is not None and self.struct.regularized, use_graph=config.cuda_graph,
                         channels_last=self.channels_last,
                         compile_model=config.compile == "on" or (config.compile == "auto" and device.type == "cuda"),
                         skip_nonfinite=config.nan_policy == "skip_batch", dist=self.dist)

    def layers_changed(self) -> None:
        """After a struct mode replaced or added layers (--struct lowrank / merge): the prunable weights
        and the training step follow the model's new parameters."""
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.weights = prunable_of(self.model, self.config)
        self.step = self.new_step()

    def adopt_shapes(self, state: Dict[str, torch.Tensor]) -> None:
        """Give the model the layers of a checkpoint's model `state` before it is checked and loaded
        (modes that change layers; a no-op for the others)."""
        if isinstance(self.struct, ShapeChangingMode) and self.struct.shape_model(self.model, state):
            self.layers_changed()

    def dense_plan(self) -> RoundPlan:
        ones = dense_masks(self.weights)
        return RoundPlan(train_masks=ones, final_masks=ones)

    def masks_from(self, payload: dict, key: str) -> Optional[Masks]:
        stored = payload.get(key)
        return None if stored is None else from_storage(stored, self.weights)

    def payload(self, kind: str, progress: RoundProgress, metrics=None, rewind: Optional[dict] = None) -> dict:
        plan = progress.plan
        record = {
            "format": checkpoint.FORMAT, "kind": kind, "round": progress.round, "epoch": progress.epoch,
            "epochs": self.config.epochs, "model": cpu_state(self.model),
            "masks": to_storage(plan.final_masks if kind == "round" else plan.train_masks),
            "config": self.config.to_dict(), "config_hash": self.config.config_hash(),
            "best": {"val_top1": progress.best_val, "epoch": progress.best_epoch,
                     "best_round": self.best_round,
                     "last_train_loss": progress.last_train_loss},
            "rng": capture_rng_state(), "rewind": rewind, "metrics": metrics or {}, "history": list(self.history),
            "lineage": checkpoint.lineage_record(self.config.config_hash(), progress.parent, progress.parent_sha256),
        }
        if kind == "epoch":
            record["final_masks"] = to_storage(plan.final_masks)
            record["penalty_masks"] = None if plan.penalty_masks is None else to_storage(plan.penalty_masks)
            record["optimizer"] = self.step.state_dict()
            # the loader position: the epoch's order and augmentation come from its seed, so a resume
            # continues epoch `epoch` at batch `batch`
            record["scheduler"] = {"epoch": progress.epoch, "steps_per_epoch": len(self.loaders["train"]),
                                   "batch": progress.batch}
            record["epoch_sums"] = progress.epoch_sums
            record["best_model"] = progress.best_model
        return record

    def restore(self, payload: dict) -> RoundProgress:
        """Load weights, masks and RNG from a checkpoint; returns the round it describes."""
        self.model.load_state_dict(payload["model"])
        restore_rng_state(payload["rng"])
        self.best_round = payload["best"].get("best_round")  # absent in checkpoints of earlier versions
        masks = self.masks_from(payload, "masks")
        self.history[:] = payload.get("history", []) if payload["kind"] == "epoch" else []
        if payload["kind"] == "round":
            return RoundProgress(round=payload["round"], epoch=payload["epoch"],
                                 plan=RoundPlan(train_masks=masks, final_masks=masks),
                                 best_val=payload["best"]["val_top1"], best_epoch=payload["best"]["epoch"])
        best_model = payload.get("best_model")
        if best_model is not None:
            best_model = {k: v.to(self.device) for k, v in best_model.items()}
        plan = RoundPlan(train_masks=masks, final_masks=self.masks_from(payload, "final_masks"),
                         penalty_masks=self.masks_from(payload, "penalty_masks"))
        lineage = payload["lineage"]
        return RoundProgress(round=payload["round"], epoch=payload["epoch"], plan=plan,
                             best_val=payload["best"]["val_top1"], best_epoch=payload["best"]["epoch"],
                             best_model=best_model, parent=lineage["parent"], parent_sha256=lineage["parent_sha256"],
                             last_train_loss=payload["best"]["last_train_loss"],
                             batch=payload.get("scheduler", {}).get("batch", 0), epoch_sums=payload.get("epoch_sums"))
