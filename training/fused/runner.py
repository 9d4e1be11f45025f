"""The lockstep driver: several runs, each an ordinary RoundRunner, whose epochs train as one fused model.

Every cell runs the plain runner's own code (`utils.cli.main` -> `training.rounds.run`): its run dir,
lock, checkpoints, lineage, metrics, struct mode, rewinding, pruning at each round's end, validation and
error handling are those of a separate run. Only the batches of an epoch are handed over: the cell's
`train_batches` posts an `EpochRequest` (its round, epoch, first batch, lr / lambda schedule) and waits.
When every cell waits, the driver takes the requests at the earliest position (round, epoch, first batch)
with one fusion key (training/fused/cells.py), copies those cells' weights, masks, momentum and running
sums into a FusedTrainStep (training/fused/step.py), trains the epoch with each cell's own loader (its
seed's order and augmentation) and schedule, and copies everything back (training/fused/transfer.py): the
cells stay the source of truth, so a checkpoint is exactly what a separate run would save, and `--resume` of
one cell alone works. The cells' validations after the epoch (and tests after the round) are posted the same
way (`EvalRequest`) and run as one fused forward (training/fused/evaluate.py), as are the BatchNorm
recalibrations of RSST's sparse view before them (`RecalibrationRequest`).

Cells run in threads that take turns (one at a time, in cell order; the fused epoch runs in the main
thread), so the process-wide RNG, `seed_everything` and the printed lines follow one deterministic
order. A cell that fails (non-finite loss: exit 3) or finishes leaves; the next epoch fuses the remaining
cells anew (its weights never reach the others: grouped convolutions, wide BatchNorms and batched
matmuls keep cells apart). Cells at different positions (a resume after a kill between two cells'
saves) train apart until they meet. SIGTERM / Ctrl-C stop every cell at the same step; each saves its
mid-epoch checkpoint. HFTA (Wang et al., MLSys 2021) is the method; docs/fused.md the user's guide.
"""
import functools
import itertools
import os
import sys
import threading
import time
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from training.fused.clock import PhaseClock
from training.fused.console import CellStream
from training.fused.requests import CellRequest, EpochRequest, EvalRequest, RecalibrationRequest
from training.fused.fuse import fuse_models
from training.fused.evaluate import evaluate_cells, recalibrate_cells
from training.fused.layout import conv_layout_summary, tune_conv_layouts
from training.fused.step import FusedTrainStep
from training.fused.transfer import load_group, store_group
from training.loop import EpochResult, step_line, tracked_batchnorms
from training.rounds import BN_RECALIBRATION_BATCHES, RoundRunner
from training.step import autocast
from utils.interrupts import StopRequest
from utils.tracking import progress as progress_bar


NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # what a recalibration changes


class FusedCellRunner(RoundRunner):
    """A RoundRunner whose epochs the driver trains; everything else is the plain runner's. The stop
    request is the driver's (signals reach the main thread only)."""

    def __init__(self, session, struct, tracker, rewind, stop, driver: "LockstepDriver", cell: int):
        super().__init__(session, struct, tracker, rewind, driver.stop)
        self.driver, self.cell = driver, cell
        self.trained: Optional[Tuple[int, int, int]] = None  # (round, epoch, batches) last trained here
        self.evaluations = 0  # evaluate() calls since then

    def train_batches(self, progress, epoch, schedule, first, carried) -> EpochResult:
        self.trained, self.evaluations = (progress.round, epoch, len(self.session.loaders["train"])), 0
        return self.driver.post(EpochRequest(self.cell, self, (progress.round, epoch, first), schedule, carried))

    def evaluate(self, split: str) -> float:
        """Top-1 (%) on `split`: after an epoch trained in this process, with the group's cells as one fused
        forward; else (a resumed run whose round ends before any training here) as a plain run."""
        if self.trained is None:
            return super().evaluate(split)
        result = self.driver.post(EvalRequest(self.cell, self, self._next_position(), split))
        return super().evaluate(split) if result is None else result.accuracy  # None: a group of one

    def recalibrate_norms(self) -> None:
        """BatchNorm statistics of the current (sparse-view) weights: after an epoch trained in this process,
        with the group's cells as one fused forward; else as a plain run."""
        if self.trained is None or self.driver.post(RecalibrationRequest(self.cell, self,
                                                                         self._next_position())) is None:
            super().recalibrate_norms()

    def _next_position(self) -> Tuple[int, int, int, int]:
        """Position of the next evaluation or recalibration after the epoch trained here."""
        self.evaluations += 1
        return (*self.trained, self.evaluations - 1)


# The Triton conv kernels (training/fused/triton_conv.py) are timed by benchmarks.fused_speed --conv_layout tuned
# but not yet by the runner: their GPU speed has not been measured, and their first compilation adds start-up time.
RUNNER_EXCLUDED_LAYOUTS = ("triton",)


class LockstepDriver:
    """Runs the cells `argvs` (each a main_imp_fillback.py argument list) together; `run()` returns their
    exit codes, as main_imp_fillback.py would have exited with each (0 done, 2 bad input, 3 non-finite
    loss, 128 + signal when stopped). `labels`: names for the printed lines (default: run dir names)."""

    def __init__(self, argvs: Sequence[Sequence[str]], labels: Optional[Sequence[str]] = None):
        self.argvs = [list(a) for a in argvs]
        self.labels = list(labels) if labels else [f"cell {i}" for i in range(len(argvs))]
        self.idents: Dict[int, str] = {}  # thread -> the cell label its printed lines start with (CellStream)
        self.stop = StopRequest()
        self.codes: List[Optional[int]] = [None] * len(argvs)
        self.requests: Dict[int, CellRequest] = {}
        self.turn = [threading.Event() for _ in argvs]
        self.back = threading.Event()
        self.fused: Dict[Tuple[int, ...], Tuple[object, FusedTrainStep]] = {}
        self.clock = PhaseClock()  # where the group's time goes, printed when the run ends

    # ---- the cells' side ------------------------------------------------------------------
    def post(self, request: CellRequest):
        """Called in a cell's thread: post the request, hand the turn back, wait for its result (returned)."""
        self.requests[request.cell] = request
        self._wait_for_turn(request.cell, hand_back=True)
        if request.error is not None:
            raise request.error
        return request.result

    def _wait_for_turn(self, cell: int, hand_back: bool) -> None:
        if hand_back:
            self.back.set()
        self.turn[cell].wait()
        self.turn[cell].clear()

    def _cell_main(self, cell: int) -> None:
        from training import rounds
        from utils.cli import main as runner_main
        self._wait_for_turn(cell, hand_back=False)
        runner_class = functools.partial(FusedCellRunner, driver=self, cell=cell)
        try:
            self.codes[cell] = runner_main(self.argvs[cell], run=lambda config: rounds.run(config, runner_class))
        except BaseException:  # noqa: BLE001 - an unexpected failure ends this cell only
            traceback.print_exc()
            self.codes[cell] = 1
        finally:
            self.requests.pop(cell, None)
            self.back.set()

    def _give_turn(self, cell: int) -> None:
        """Let cell `cell` run until it posts its next epoch or ends."""
        self.back.clear()
        self.turn[cell].set()
        self.back.wait()

    # ---- the driver's side ----------------------------------------------------------------------
    def run(self) -> List[int]:
        # every cell its own wandb run in this one process (wandb >= 0.19.10; an older wandb refuses the value,
        # and each Tracker then warns and logs to metrics.jsonl only)
        set_here = "WANDB_REINIT" not in os.environ
        os.environ.setdefault("WANDB_REINIT", "create_new")
        threads = [threading.Thread(target=self._cell_main, args=(i,), name=f"cell-{i}", daemon=True)
                   for i in range(len(self.argvs))]
        saved = sys.stdout, sys.stderr
        idents = self.idents
        sys.stdout, sys.stderr = CellStream(saved[0], idents), CellStream(saved[1], idents)
        try:
            with self.stop:
                for cell, thread in enumerate(threads):
                    thread.start()
                    idents[thread.ident] = self.labels[cell]
                    self._give_turn(cell)
                while self.requests:
                    group = self._next_group()
                    self._train_group(group)
                    with self.clock.phase("cells"):
                        for request in group:
                            del self.requests[request.cell]
                            self._give_turn(request.cell)
        finally:
            sys.stdout, sys.stderr = saved
            if set_here:
                os.environ.pop("WANDB_REINIT", None)
        if self.clock.summary():
            print(self.clock.summary(), flush=True)
        for thread in threads:
            thread.join()
        return [1 if code is None else code for code in self.codes]

    def exit_code(self, codes: Sequence[int]) -> int:
        """The group's exit code from `run()`'s codes: 0 when every cell succeeded; 128 + signal when a stop
        signal ended it; else the highest cell code (3 non-finite loss > 2 bad input > 1 error)."""
        if all(code == 0 for code in codes):
            return 0
        if self.stop.signum is not None:
            return 128 + self.stop.signum
        return max(codes)

    def _next_group(self) -> List[CellRequest]:
        """The waiting requests of the earliest position that share the lowest waiting cell's fusion key."""
        ordered = sorted(self.requests.values(), key=lambda r: (r.position, r.cell))
        key = ordered[0].key
        return [r for r in ordered if r.key == key]

    def _train_group(self, group: List[CellRequest]) -> None:
        try:
            if isinstance(group[0], RecalibrationRequest):
                with self.clock.phase("evaluation"):
                    self._recalibrate_group(group)
                return
            if isinstance(group[0], EvalRequest):
                with self.clock.phase("evaluation"):
                    self._evaluate_group(group)
                return
            fused, step = self._fused_for(group)
            with self.clock.phase("copies"):
                load_group(fused, step, group)
            with self.clock.phase("steps"):
                stopped, seen = self._train_epoch(fused, step, group)
            with self.clock.phase("copies"):
                store_group(fused, step, group, stopped, seen)
        except Exception as exc:  # noqa: BLE001 - raised in each cell's thread: every cell exits with its line
            for request in group:
                request.error = exc

    def _evaluate_group(self, group: List[EvalRequest]) -> None:
        """The cells' `split` evaluations as one fused forward of their current (e.g. sparse-view) weights: in the
        group's training fused model when there is one (the next epoch loads the cells into it again), else in a
        fused copy made for it. A group of one gets no result: its cell evaluates as a plain run."""
        if len(group) == 1:
            return
        sessions = [r.runner.session for r in group]
        fused = self._fused_copy(sessions, tuple(r.cell for r in group))
        results = evaluate_cells(fused, [s.loaders[r.split] for s, r in zip(sessions, group)], sessions[0].device,
                                 sessions[0].amp)
        for request, result in zip(group, results):
            request.result = result

    def _recalibrate_group(self, group: List[RecalibrationRequest]) -> None:
        """The cells' BatchNorm recalibrations (training.rounds.RoundRunner.recalibrate_norms: their current
        weights, BN_RECALIBRATION_BATCHES of each cell's calibration batches) as one fused forward, the
        statistics written back into each cell's model. A group of one, or a fused model without BatchNorm
        modules (the streams route), gets no result: each cell recalibrates as a plain run."""
        sessions = [r.runner.session for r in group]
        if len(group) == 1 or not tracked_batchnorms(sessions[0].model):
            return  # a group of one, or nothing to recalibrate (each cell's own call returns at once)
        fused = self._fused_copy(sessions, tuple(r.cell for r in group))
        if not recalibrate_cells(fused, [r.runner.calibration_batches(BN_RECALIBRATION_BATCHES) for r in group],
                                 sessions[0].device, sessions[0].amp):
            return  # no BatchNorm module in the fused model (the streams route stacks the statistics): each alone
        for request, session, state in zip(group, sessions, fused.unfuse()):
            statistics = {name: value for name, value in state.items() if name.rsplit(".", 1)[-1] in NORM_STATISTICS}
            session.model.load_state_dict(statistics, strict=False)  # the weights are the cell's own already
            request.result = True

    def _fused_copy(self, sessions, cells: Tuple[int, ...]):
        """A fused model holding the cells' current state dicts: the group's training one when there is one
        (the next epoch loads the cells into it again), else one made for it."""
        if cells in self.fused:
            fused = self.fused[cells][0]
            fused.load_cells([s.model.state_dict() for s in sessions])
            return fused
        fused = fuse_models([s.model for s in sessions], sessions[0].config.fused_route)
        if sessions[0].channels_last:
            fused.to_channels_last()
        return fused

    def _fused_for(self, group: List[EpochRequest]) -> Tuple[object, FusedTrainStep]:
        """The fused model and step of these cells (kept while the same cells train together: the step's
        CUDA graph is captured once)."""
        cells = tuple(r.cell for r in group)
        for key in [k for k in self.fused if k != cells and set(k) & set(cells)]:
            del self.fused[key]  # a cell left or joined: fuse anew
        if cells not in self.fused:
            sessions = [r.runner.session for r in group]
            first, config = sessions[0], sessions[0].config
            for session in sessions:  # train mode, as train_epoch sets it (cells that met mid-run may differ)
                session.model.train()
            compiled = first.step.forward is not first.model  # the cells' own steps compile (--compile)
            fused = fuse_models([s.model for s in sessions], config.fused_route, compiled=compiled)
            if first.channels_last:  # the convs laid out as the cells' own models (grouped, streams)
                fused.to_channels_last()
            layouts = self._tune_layouts(fused, first, len(group)) if first.channels_last else ""
            step = FusedTrainStep(fused, first.step.masked_names, first.device, first.amp, config.momentum,
                                  [s.config.weight_decay for s in sessions], first.step.regularized,
                                  use_graph=config.cuda_graph,
                                  # streams: eager inside the graph (torch.compile of per-cell stream switches untested)
                                  compile_model=compiled and fused.route != "streams",
                                  skip_nonfinite=config.nan_policy == "skip_batch")
            step.log = group[0].runner.tracker.info
            self.fused[cells] = (fused, step)
            for request in group:
                others = ", ".join(self.labels[r.cell] for r in group if r is not request)
                self._say(request, f"fused with {others} on the {fused.route} route (--fused_route "
                                   f"{config.fused_route}){layouts}")
        return self.fused[cells]

    @staticmethod
    def _tune_layouts(fused, first, cells: int) -> str:
        """Each grouped conv computes in its faster layout (training/fused/layout.py), timed on a batch shaped as
        the step's before the step captures its graph; returns the choice for the cells' logs ("" where the tuner
        does not apply: the CPU, routes without grouped convs)."""
        loader = first.loaders["train"]
        images = fused.stack_images([torch.zeros(loader.batch_size, *loader.images.shape[1:], device=first.device)
                                     for _ in range(cells)])
        with autocast(first.device, first.amp):
            chosen = tune_conv_layouts(fused, images, exclude=RUNNER_EXCLUDED_LAYOUTS)
        if not chosen:
            return ""
        return "; grouped convs: " + conv_layout_summary(chosen)

    def _train_epoch(self, fused, step: FusedTrainStep, group: List[EpochRequest]) -> Tuple[Optional[int], int]:
        """The group's batches from the shared first one on; returns (batches done when a stop ended the
        epoch, or None; images each cell trained)."""
        first_request, (round_index, epoch, first) = group[0], group[0].position
        config = first_request.runner.config
        loaders = [r.runner.session.loaders["train"] for r in group]
        steps = len(loaders[0])
        batches = zip(*(itertools.islice(loader, first, None) for loader in loaders))  # skipped ones drawn too
        shown = progress_bar(batches, steps - first, f"fused x{len(group)} round {round_index} epoch "
                             f"{epoch + 1}/{config.epochs}", config.progress)
        fused.train()
        seen, started = 0, time.time()
        for index, cell_batches in enumerate(shown, first):
            images = fused.stack_images([b[0] for b in cell_batches])
            labels = torch.stack([b[1] for b in cell_batches])
            rates, lambdas = zip(*(r.schedule(index) for r in group))
            step(images, labels, rates, lambdas)
            seen += labels.shape[1]
            if shown is batches and config.print_freq and (index + 1) % config.print_freq == 0:
                self._report(step, group, index + 1, steps, seen, time.time() - started)
            if self.stop.at_step_boundary():
                return index + 1, seen
        return None, seen

    def _say(self, request: EpochRequest, line: str) -> None:
        """`line` into the request's cell log, printed with the cell's `[label]` (from this, the driver's thread)."""
        me = threading.get_ident()
        self.idents[me] = self.labels[request.cell]
        try:
            request.runner.tracker.info(line)
        finally:
            self.idents.pop(me, None)

    def _report(self, step: FusedTrainStep, group: List[EpochRequest], done: int, steps: int, seen: int,
                seconds: float) -> None:
        skipped = step.skipped.tolist()
        for request, loss_sum, skips in zip(group, step.running_loss_sum(), skipped):
            round_index, epoch, _ = request.position
            total = request.carried[0] + seen - skips * request.runner.config.batch_size
            self._say(request, step_line(round_index, epoch + 1, request.runner.config.epochs, done, steps,
                                         loss_sum / max(total, 1), seen / max(seconds, 1e-9)))


def run_cells(argvs: Sequence[Sequence[str]], labels: Optional[Sequence[str]] = None) -> List[int]:
    """Train the runs `argvs` (main_imp_fillback.py argument lists) fused; their exit codes, in order."""
    return LockstepDriver(argvs, labels).run()
