"""Where a fused group's wall time goes: the lockstep driver's phases (training steps, the copies around them,
fused evaluation) and the time the cells spend in their own code between epochs (validation bookkeeping,
metrics, checkpoints, pruning at round ends), summed over a run and printed at its end.

Kernels run asynchronously, so each phase boundary waits for the GPU (one `torch.cuda.synchronize` per phase,
a few per epoch): the work a phase queued is charged to that phase, not to the next one that happens to wait.
"""
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Iterator

import torch

PHASES = ("steps", "copies", "evaluation", "cells")
LABELS = {"steps": "training steps", "copies": "cell <-> fused copies", "evaluation": "fused evaluation",
          "cells": "the cells' own code between epochs"}


class PhaseClock:
    """Wall seconds per phase name (any of PHASES); `phase(name)` times a block, `summary()` one line."""

    def __init__(self):
        self.seconds: Dict[str, float] = defaultdict(float)

    @staticmethod
    def _wait_for_device() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's wall seconds (device work it queued included) to `name`; ValueError for an unknown
        name."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}: one of {PHASES}")
        self._wait_for_device()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._wait_for_device()
            self.seconds[name] += time.perf_counter() - started

    def summary(self) -> str:
        """'fused driver time: 12.31 s training steps (80.1 %), ...' over the phases timed so far ('' if none)."""
        total = sum(self.seconds.values())
        if total <= 0:
            return ""
        parts = [f"{self.seconds[name]:.2f} s {LABELS[name]} ({100 * self.seconds[name] / total:.1f} %)"
                 for name in PHASES if name in self.seconds]
        return "fused driver time: " + ", ".join(parts)
