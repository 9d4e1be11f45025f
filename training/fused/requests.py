"""The requests a fused cell's thread posts to the lockstep driver (training/fused/runner.py): one epoch of
training, or one evaluation or BatchNorm recalibration after an epoch trained there. The driver groups waiting
requests by `key` (position, then fusion key) and fills in `result` or `error`."""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from training.fused.cells import fusion_key
from training.loop import EpochResult

if TYPE_CHECKING:  # the runner imports this module
    from training.fused.runner import FusedCellRunner


@dataclass
class EpochRequest:
    """One cell's epoch, posted by its thread: batches `first`.. of its training loader, `schedule(i)` ->
    (lr, lambda) of batch i, `carried` (images, skipped batches) before `first`; the driver fills `result`
    (or `error`, raised in the cell's thread)."""
    cell: int
    runner: "FusedCellRunner"
    position: Tuple[int, int, int]  # round, epoch (0-based), first batch
    schedule: Callable[[int], Tuple[float, float]]
    carried: Tuple[int, int]
    result: Optional[EpochResult] = None
    error: Optional[BaseException] = None

    @property
    def key(self) -> tuple:
        return ("train", self.position, fusion_key(self.runner.config))


@dataclass
class EvalRequest:
    """One cell's evaluation of its `split` loader, posted by its thread after an epoch trained here: the
    driver evaluates the group's cells as one fused forward (training/fused/evaluate.py) and fills `result`
    (or `error`; it leaves `result` None for a group of one, which the cell then evaluates as a plain run).
    position: (round, epoch, batches of the epoch, evaluations since it) -- after the epoch's training requests
    (round, epoch, first batch), before the next epoch's."""
    cell: int
    runner: "FusedCellRunner"
    position: Tuple[int, int, int, int]
    split: str
    result: Optional[EpochResult] = None
    error: Optional[BaseException] = None

    @property
    def key(self) -> tuple:
        return ("eval", self.position, self.split, fusion_key(self.runner.config))


@dataclass
class RecalibrationRequest(EvalRequest):
    """One cell's BatchNorm recalibration of its current (sparse-view) weights on its calibration batches,
    posted like an evaluation (its `position` counts among the evaluations after the epoch); the driver
    recomputes the group's statistics in one fused forward, writes them into each cell's model and sets
    `result` True (None for a group of one, or where the fused model holds no BatchNorm module — no BatchNorm at
    all, or the streams route's stacked statistics: the cell recalibrates as a plain run)."""
    split: str = "calibration"
    result: Optional[bool] = None

    @property
    def key(self) -> tuple:
        return ("recalibrate", self.position, fusion_key(self.runner.config))
