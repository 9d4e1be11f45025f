"""The requests a fused cell's thread posts to the lockstep driver (training/fused/runner.py): one epoch of
training, or one evaluation or BatchNorm recalibration after an epoch trained there. The driver groups waiting
requests by `key` (kind, position, then fusion key) and fills in `result` or `error`."""
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

from training.fused.cells import fusion_key
from training.loop import EpochResult

if TYPE_CHECKING:  # the runner imports this module
    from training.fused.runner import FusedCellRunner


@dataclass
class CellRequest(ABC):
    """What every request holds: the posting `cell` (its index in the group), its `runner`, its `position` in
    the cell's run (ordered: the driver serves the earliest first), and the driver's answer: `result`, or
    `error` (raised in the cell's thread)."""
    cell: int
    runner: "FusedCellRunner"
    position: tuple
    result: Any = field(default=None, kw_only=True)
    error: Optional[BaseException] = field(default=None, kw_only=True)

    @property
    @abstractmethod
    def key(self) -> tuple:
        """Requests with equal keys are served together, as one fused call."""


@dataclass
class EpochRequest(CellRequest):
    """One cell's epoch, posted by its thread: `position` (round, epoch (0-based), first batch), batches `first`..
    of its training loader, `schedule(i)` -> (lr, lambda) of batch i, `carried` (images, skipped batches) before
    `first`; the driver sets `result` to the cell's EpochResult."""
    schedule: Callable[[int], Tuple[float, float]]
    carried: Tuple[int, int]
    result: Optional[EpochResult] = field(default=None, kw_only=True)

    @property
    def key(self) -> tuple:
        return ("train", self.position, fusion_key(self.runner.config))


@dataclass
class EvalRequest(CellRequest):
    """One cell's evaluation of its `split` loader, posted by its thread after an epoch trained here: the
    driver evaluates the group's cells as one fused forward (training/fused/evaluate.py) and fills `result`
    (it leaves `result` None for a group of one, which the cell then evaluates as a plain run).
    position: (round, epoch, batches of the epoch, evaluations since it) -- after the epoch's training requests
    (round, epoch, first batch), before the next epoch's."""
    split: str
    result: Optional[EpochResult] = field(default=None, kw_only=True)

    @property
    def key(self) -> tuple:
        return ("eval", self.position, self.split, fusion_key(self.runner.config))


@dataclass
class RecalibrationRequest(CellRequest):
    """One cell's BatchNorm recalibration of its current (sparse-view) weights on its calibration batches,
    posted like an evaluation (its `position` counts among the evaluations after the epoch); the driver
    recomputes the group's statistics in one fused forward, writes them into each cell's model and sets
    `result` True (None for a group of one, or where the fused model holds no BatchNorm module — no BatchNorm at
    all, or the streams route's stacked statistics: the cell recalibrates as a plain run)."""
    result: Optional[bool] = field(default=None, kw_only=True)

    @property
    def key(self) -> tuple:
        return ("recalibrate", self.position, fusion_key(self.runner.config))
