"""The epochs of a round, for RoundRunner: train one epoch (resuming mid-epoch), check its numbers,
save a mid-epoch checkpoint when a stop request arrives.

Kept out of rounds.py so that file stays about rounds; `EpochTraining` is a mixin that reads the
runner's session, config, tracker, stop request and rewind reference. Under torchrun it is also where
the ranks meet: masks and weights compared at a round's start, the stop agreed at every step
boundary, BatchNorm statistics shared after every epoch, and files written by rank 0 only (`save`).
"""
import itertools
import os
import time
from typing import Optional, Tuple

from training.loop import EpochResult, step_line, train_epoch
from training.session import RoundProgress
from utils import checkpoint, paths
from utils.errors import NumericalError
from utils.interrupts import Interrupted
from utils.seeding import derived_seed
from utils.tracking import progress as progress_bar

STREAM_TRAIN = 1


class EpochTraining:
    def save(self, path: str, payload: dict) -> Optional[str]:
        """checkpoint.save on the writing rank (the only process without torchrun): the sha256 of the file;
        None on the other ranks, which write nothing."""
        if not self.session.dist.is_writer:
            return None
        return checkpoint.save(path, payload)

    def agree_on_round(self, progress: RoundProgress) -> None:
        """Under torchrun, before a round trains: rank 0's masks on every rank, checksums compared and logged."""
        session = self.session
        session.dist.agree_on_round(progress.round, progress.plan, session.weights, session.model, self.tracker.info)

    def train_epoch(self, progress: RoundProgress, epoch: int, schedule) -> Tuple[EpochResult, int]:
        """Train epoch `epoch` (0-based) -- from the saved batch when a stop interrupted it -- and return
        its result and the images trained in this process. A stop request ends it at the next step
        boundary: a mid-epoch checkpoint is saved and Interrupted raised."""
        loader = self.session.loaders["train"]
        first, carried = self.start_epoch(progress, epoch)
        result = self.train_batches(progress, epoch, schedule, first, carried)
        self.session.dist.broadcast_buffers(self.session.model)  # per-rank BatchNorm statistics (CPU): rank 0's
        if result.stopped_at is not None:
            self.save_mid_epoch(progress, epoch, result, len(loader))
        return result, result.samples - carried[0]

    def start_epoch(self, progress: RoundProgress, epoch: int) -> Tuple[int, Tuple[int, int]]:
        """Seed the training loader's order for epoch `epoch` and, for an epoch a stop interrupted, put its
        running sums back in the step; returns (first batch, (images trained, batches skipped) before it)."""
        session, config, step = self.session, self.config, self.session.step
        session.loaders["train"].set_epoch_seed(derived_seed(config.seed, STREAM_TRAIN, progress.round, epoch))
        first, carried = 0, (0, 0)
        if epoch == progress.epoch and progress.batch:
            first, sums = progress.batch, progress.epoch_sums
            step.load_counters(sums["counters"])
            carried = (sums["seen"], sums["skipped"])
        progress.batch, progress.epoch_sums = 0, None
        return first, carried

    def train_batches(self, progress: RoundProgress, epoch: int, schedule, first: int,
                      carried: Tuple[int, int]) -> EpochResult:
        """The epoch's batches from `first` on through this run's own step (training/fused/runner.py
        overrides it: there the fused group trains them)."""
        session, config, step = self.session, self.config, self.session.step
        loader = session.loaders["train"]
        steps, started = len(loader), time.time()
        remaining = itertools.islice(loader, first, None)  # the skipped batches are drawn, so the order holds
        batches = progress_bar(remaining, steps - first, f"round {progress.round} epoch {epoch + 1}/{config.epochs}",
                               config.progress and session.dist.is_writer)

        def report(done: int, seen: int) -> None:  # no progress bar: a line every --print_freq steps
            rate = (seen - carried[0]) / max(time.time() - started, 1e-9)
            self.tracker.info(step_line(progress.round, epoch + 1, config.epochs, done, steps,
                                        step.running_loss_sum() / max(seen, 1), rate))

        return train_epoch(session.model, step, batches, schedule, first, carried,
                           stop=self.stop.at_step_boundary, report=report,
                           report_every=config.print_freq if batches is remaining else 0)

    def save_mid_epoch(self, progress: RoundProgress, epoch: int, result: EpochResult, steps: int) -> None:
        """Save the stopped epoch's position and running sums to latest.pth.tar, then raise Interrupted
        (NumericalError instead when the epoch already went non-finite: that state is not worth keeping)."""
        counters = self.session.step.counters_state()
        self.session.dist.check_same("stop position (round, epoch, step)", (progress.round, epoch + 1,
                                                                            result.stopped_at), self.tracker.info)
        bad = int(counters["first_bad"])
        if bad >= 0:
            result.bad_step = bad
        self.check_numerics(progress, epoch, result, progress.plan.penalty_masks is not None)
        progress.batch = result.stopped_at
        progress.epoch_sums = {"counters": counters, "seen": result.samples, "skipped": result.skipped}
        path = paths.latest_checkpoint(self.session.directory)
        self.save(path, self.session.payload("epoch", progress, rewind=self.rewind))
        self.tracker.commit()  # the epoch records this checkpoint covers can no longer be truncated: to wandb
        self.tracker.info(f"saved round {progress.round} epoch {epoch + 1} at step {result.stopped_at}/{steps} "
                          f"to {path}")
        raise Interrupted(self.stop.signum, path)

    def check_numerics(self, progress: RoundProgress, epoch: int, result: EpochResult, regularized: bool) -> None:
        """NumericalError (exit 3) naming round, epoch and the last good checkpoint when the epoch's loss
        or weights are not finite, or skip_batch skipped half of its batches or more (a model that no
        longer gives a finite loss, even with finite weights): such a state is never saved."""
        where = f"round {progress.round} epoch {epoch + 1}"
        keep = (f"stopped without saving this epoch (last good checkpoint: {self.last_good_checkpoint(progress)}); "
                f"lower --lr{' or --reg_granularity_prune' if regularized else ''}")
        if result.bad_step is not None:
            raise NumericalError(f"{where} step {result.bad_step}: the loss is not finite; {keep}, "
                                 f"or pass --nan_policy skip_batch")
        broken = checkpoint.non_finite_tensors(self.session.model.state_dict().items())
        if broken:
            total = sum(1 for t in self.session.model.state_dict().values() if t.is_floating_point())
            raise NumericalError(f"{where}: {len(broken)} of {total} weight tensors are not finite "
                                 f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}) after "
                                 f"{result.skipped} skipped batches; {keep}")
        steps = len(self.session.loaders["train"])
        if result.stopped_at is None and 2 * result.skipped >= steps:
            raise NumericalError(f"{where}: --nan_policy skip_batch skipped {result.skipped} of {steps} batches "
                                 f"for a non-finite loss: the weights no longer give one; {keep}")

    def last_good_checkpoint(self, progress: RoundProgress) -> str:
        latest = paths.latest_checkpoint(self.session.directory)
        if os.path.exists(latest):
            return latest
        return progress.parent or "none yet"
