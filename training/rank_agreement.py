"""What torchrun ranks must agree on, and how they check it: round masks, start point, stop step.

Every rank of a data-parallel run (training/distributed.py) holds the whole model and must stay
identical to the others; a rank that drifts would train another model without anyone noticing. So:

- masks: every rank computes the round's masks from identical weights; rank 0's are broadcast and the
  sha256 of the masks and weights of every rank are compared at every round's start (logged by rank 0;
  a difference stops the run, `RankMismatch`, exit 3). `agree_on_round`.
- start and stop positions: gathered from every rank and compared (`check_same`).
- stops: SIGTERM / SIGINT are agreed at step boundaries (a max all-reduce of the signal number on a CPU
  group), so every rank stops after the same step and rank 0 saves (`AgreedStopRequest`).

The functions take the process group (`training.distributed.Distributed`, or anything with its
`broadcast_tensors` / `gather` / `agree_on_signal`) as their first argument; `Distributed`'s methods of
the same names call them.
"""
import signal
import time
from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from utils.checkpoint import content_digest
from utils.errors import NumericalError
from utils.interrupts import StopRequest

if TYPE_CHECKING:
    from training.distributed import Distributed

CHECKSUM_CHARS = 16  # of a sha256 hex digest, in log lines
REPEAT_WINDOW_S = 2.0  # a second signal this soon after the first is the same stop (torchrun forwards its own)


class RankMismatch(NumericalError):
    """Ranks that must hold identical state (masks, weights, start point, stop step) do not."""


def checksum(tensors: Dict[str, torch.Tensor]) -> str:
    """First CHECKSUM_CHARS hex digits of the sha256 of named tensors (dtype, shape and bytes, any device)."""
    return content_digest(dict(tensors))[:CHECKSUM_CHARS]


def masks_checksum(mask_sets: Sequence[Dict[str, torch.Tensor]]) -> str:
    """The checksum of a round's mask sets (train, final[, penalty]) as `agree_on_round` logs it."""
    return checksum({f"{i}/{name}": mask for i, masks in enumerate(mask_sets) for name, mask in masks.items()})


def compare_ranks(what: str, values: Sequence) -> Optional[str]:
    """None when every rank's value equals rank 0's, else one line naming the ranks that differ."""
    differing = [rank for rank, value in enumerate(values) if value != values[0]]
    if not differing:
        return None
    shown = ", ".join(f"rank {rank} {values[rank]}" for rank in differing[:3])
    return f"{what} differ between ranks: rank 0 {values[0]}, {shown}"


def rank_line(what: str, values: Sequence[str]) -> str:
    """`masks sha256 rank0=... rank1=...`: every rank's checksum on one log line."""
    return f"{what} " + " ".join(f"rank{rank}={value}" for rank, value in enumerate(values))


def check_same(group: "Distributed", what: str, value, log: Optional[Callable[[str], None]] = None) -> list:
    """Gather `value` (picklable) from every rank of `group`; RankMismatch (on every rank) when they differ,
    else `log` the agreed value (when several ranks). Returns every rank's value, in rank order."""
    values = group.gather(value)
    problem = compare_ranks(what, values)
    if problem:
        raise RankMismatch(problem)
    if group.enabled and log is not None:
        log(f"{what} agree on all {group.world_size} ranks: {values[0]}")
    return values


def agree_on_round(group: "Distributed", round_index: int, plan, weights: Dict[str, torch.Tensor],
                   model: nn.Module, log: Callable[[str], None]) -> None:
    """At a round's start: rank 0's masks (`plan`'s train / final / penalty masks, {name: tensor}) to every
    rank (in place, the train masks applied to `weights`), then every rank's checksums of the masks it
    computed itself, of the broadcast ones and of its model state; rank 0 logs them all. RankMismatch when
    the broadcast masks or the weights differ; a rank whose own masks differed (a nondeterministic
    criterion) is reported and trains with rank 0's. Nothing happens for one process."""
    if not group.enabled:
        return
    mask_sets = [m for m in (plan.train_masks, plan.final_masks, plan.penalty_masks) if m is not None]
    own = masks_checksum(mask_sets)
    group.broadcast_tensors([masks[name] for masks in mask_sets for name in sorted(masks)])
    with torch.no_grad():
        for name, mask in plan.train_masks.items():
            weights[name].mul_(mask)
    shared = masks_checksum(mask_sets)
    state = checksum(model.state_dict())
    values = group.gather((own, shared, state))
    owns, shareds, states = (list(column) for column in zip(*values))
    log(f"round {round_index} on {group.world_size} ranks: {rank_line('masks sha256', owns)}; "
        f"{rank_line('weights sha256', states)}")
    problem = compare_ranks(f"round {round_index}: masks after the broadcast", shareds) or \
        compare_ranks(f"round {round_index}: weights (sha256)", states)
    if problem:
        raise RankMismatch(f"{problem}; the ranks no longer train one model")
    if compare_ranks("", owns):
        log(f"round {round_index}: ranks computed different masks ({rank_line('sha256', owns)}); "
            f"all train with rank 0's")


class AgreedStopRequest(StopRequest):
    """A StopRequest that every rank answers alike: a signal is only recorded by the handler, and becomes
    `requested` on every rank at the same step boundary (`at_step_boundary`, one CPU all-reduce per step
    through `group.agree_on_signal`). torchrun forwards a SIGTERM / SIGINT it receives to its workers,
    which may have received it already (Slurm and Ctrl-C signal the whole process group): a repeat within
    REPEAT_WINDOW_S is the same stop."""

    def __init__(self, group: "Distributed", log: Callable[[str], None] = print):
        super().__init__(log=log)
        self.group = group
        self.received: Optional[int] = None
        self.received_at = 0.0

    def _handle(self, signum, _frame):
        if self.received is not None:
            if time.monotonic() - self.received_at < REPEAT_WINDOW_S:
                return
            signal.signal(signum, signal.SIG_DFL)  # asked again later: stop now
            signal.raise_signal(signum)
        self.received, self.received_at = signum, time.monotonic()

    def at_step_boundary(self) -> bool:
        if self.signum is None:
            self.signum = self.group.agree_on_signal(self.received)
        return self.requested
