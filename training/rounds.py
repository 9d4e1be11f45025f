"""The iterative prune -> rewind -> retrain loop: the only place that knows about rounds.

Round 0 trains the dense model. Round k >= 1 asks the struct mode for a plan
from the trained weights of round k-1, rewinds the survivors (`--prune_type`),
and retrains with a fresh optimiser and LR schedule. Every epoch may write
`latest.pth.tar`; every round writes `<k>checkpoint.pth.tar`,
`<k>model_best.pth.tar` and a lineage.json entry. All writes are atomic, so a
run killed at any point resumes from its last complete state.
"""
import contextlib
import os
import sys
import time
from typing import Optional, Tuple

import torch

import data
from compact import structured_cost
from models import create_model
from pruners import create_struct
from pruners.base import PruneContext, RoundPlan
from pruners.masks import apply_masks, layer_sparsity, remaining_fraction
from pruners.reshaping import ShapeChangingMode
from training import distributed, start as starting
from training.epochs import EpochTraining
from training.loop import epoch_line, evaluate, recalibrate_batchnorm
from training.optim import effective_warmup, lr_at
from training.step import resolve_amp
from training.session import RoundProgress, Session, cpu_state, device_state, prunable_of
from utils import checkpoint, history, paths, provenance
from utils.interrupts import Interrupted, StopRequest
from utils.seeding import seed_everything
from utils.tracking import RankTracker, Tracker, has_round_record, truncate_metrics, write_config

BN_RECALIBRATION_BATCHES = 20


class RoundRunner(EpochTraining):
    def __init__(self, session: Session, struct, tracker: Tracker, rewind: Optional[dict],
                 stop: Optional[StopRequest] = None):
        self.session, self.struct, self.tracker, self.rewind = session, struct, tracker, rewind
        self.config = session.config
        self.stop = stop or StopRequest()
        self.last_save = 0.0
        self.completed: Optional[Tuple[str, str]] = None  # (path, sha256) of the last round this run recorded

    # ---- the loop -------------------------------------------------------------------------
    def run(self, progress: RoundProgress, round_complete: bool, optimizer_state: Optional[dict] = None) -> None:
        if round_complete:
            if progress.round + 1 >= self.config.pruning_times:
                self.tracker.info(f"all {self.config.pruning_times} rounds are done in {self.session.directory}; "
                                  f"nothing to run (raise --pruning_times to continue)")
                return
            progress = self.begin_round(progress.round + 1, progress.plan.final_masks, *self.round_parent(progress))
        while True:
            self.train_round(progress, optimizer_state)
            optimizer_state = None
            finished = self.end_round(progress)
            if progress.round + 1 >= self.config.pruning_times:
                return
            if self.stop.requested:
                raise Interrupted(self.stop.signum, paths.round_checkpoint(self.session.directory, progress.round))
            progress = self.begin_round(progress.round + 1, finished.final_masks, *self.round_parent(progress))

    def round_parent(self, progress: RoundProgress) -> Tuple[str, str]:
        if self.completed is not None:
            return self.completed
        return progress.parent, progress.parent_sha256  # branch start: the parent lives in another run

    def begin_round(self, round_index: int, masks, parent: Optional[str], parent_sha: Optional[str]) -> RoundProgress:
        session = self.session
        if round_index == 0:
            plan = session.dense_plan()
        else:
            ctx = PruneContext(model=session.model, weights=session.weights, config=self.config,
                               round_index=round_index, calibration_batches=self.calibration_batches,
                               log=self.tracker.info)
            plan = self.struct.plan_round(ctx, masks)
            self.rewind_weights()
            if isinstance(self.struct, ShapeChangingMode):  # layers replaced or added: train all of their weights
                session.layers_changed()
                plan = session.dense_plan()
        apply_masks(session.weights, plan.train_masks)
        if plan.penalty_masks is not None:
            self.tracker.info(
                f"round {round_index}: {self.struct.describe()} regularises the weights to be pruned toward zero "
                f"and zeroes them only at the round's end, so the measured sparsity reads "
                f"{100 * (1 - remaining_fraction(plan.train_masks)):.2f}% during the round and "
                f"{100 * (1 - remaining_fraction(plan.final_masks)):.2f}% after it")
        return RoundProgress(round=round_index, plan=plan, parent=parent, parent_sha256=parent_sha)

    def rewind_weights(self) -> None:
        if self.config.prune_type == "pt":
            return
        saved = checkpoint.load_file(paths.rewind_weights(self.session.directory))
        self.session.model.load_state_dict(saved["model"])

    def calibration_batches(self, count: Optional[int] = None):
        loader = self.session.loaders["calibration"]
        for index, batch in enumerate(loader):
            if index >= (count or self.config.criteria_batches):
                return
            yield batch

    # ---- one round --------------------------------------------------------------------------
    def train_round(self, progress: RoundProgress, optimizer_state: Optional[dict]) -> None:
        session, config = self.session, self.config
        self.struct.configure_model(session.model, progress.round, self.tracker.info)
        plan, step = progress.plan, session.step
        self.agree_on_round(progress)  # torchrun: rank 0's masks on every rank, checksums compared
        if self.struct.changes_forward:
            step.reset_graph()  # the model runs differently this round: capture it anew
        step.start_round(plan)
        if optimizer_state is not None:
            step.load_state_dict(optimizer_state)
        steps, warmup, milestones = len(session.loaders["train"]), effective_warmup(config), config.milestones()
        total_steps = steps * config.epochs
        regularized = plan.penalty_masks is not None
        durations = []
        for epoch in range(progress.epoch, config.epochs):
            started = time.time()

            def schedule(index: int, epoch=epoch) -> Tuple[float, float]:
                reg = self.struct.reg_lambda((epoch * steps + index) / total_steps) if regularized else 0.0
                return lr_at(config.lr, epoch, index, steps, warmup, milestones), reg

            result, trained = self.train_epoch(progress, epoch, schedule)
            train_seconds = time.time() - started
            self.check_numerics(progress, epoch, result, regularized)
            val, state = self.validate(plan, progress.best_val)
            progress.epoch = epoch + 1
            if state is not None:
                progress.best_val, progress.best_epoch, progress.best_model = val, progress.epoch, state
            elapsed = time.time() - started
            durations.append(elapsed)
            record = {
                "round": progress.round, "epoch": progress.epoch, "lr": schedule(steps - 1)[0],
                "train_loss": result.loss, "train_top1": result.accuracy, "val_top1": val,
                "reg_lambda": schedule(steps - 1)[1], "penalized_l2": step.penalized_norm(),
                "remaining_pct": self.remaining_pct(plan.train_masks), "epoch_seconds": elapsed,
                "skipped_batches": result.skipped, "train_seconds": train_seconds,
                "images_per_second": trained / max(train_seconds, 1e-9)}
            self.tracker.epoch(record)
            eta = sum(durations) / len(durations) * (config.epochs - progress.epoch)
            self.tracker.info(epoch_line(record, config.epochs, eta))
            if progress.round == 0 and config.prune_type == "rewind_lt" and progress.epoch == config.rewind_epoch:
                self.save_rewind(progress.epoch)
            progress.last_train_loss = result.loss
            self.maybe_save_epoch(progress)
            if self.stop.requested and progress.epoch < config.epochs:
                raise Interrupted(self.stop.signum, paths.latest_checkpoint(session.directory))

    def remaining_pct(self, masks) -> float:
        if isinstance(self.struct, ShapeChangingMode):  # weights removed by changing layers, not by masks
            return self.struct.remaining_pct(masks)
        return 100 * remaining_fraction(masks)

    def validate(self, plan: RoundPlan, best_so_far: Optional[float]) -> Tuple[Optional[float], Optional[dict]]:
        """Validation accuracy of the weights the round will end with, and their state when it beats
        `best_so_far` (always without a validation split: the last epoch is kept)."""
        session = self.session
        with self.sparse_view(plan):
            val = self.evaluate("val") if len(session.splits.val) else None
            improved = val is None or val > best_so_far
            state = device_state(session.model) if improved else None
        return val, state

    @contextlib.contextmanager
    def sparse_view(self, plan: RoundPlan):
        """The model as the round will end: final masks applied and, where they zero weights that were
        still training (RSST), BatchNorm statistics recomputed for them; restored on exit."""
        session = self.session
        if plan.penalty_masks is None:
            yield
            return
        saved = device_state(session.model)
        self.make_sparse(plan)
        try:
            yield
        finally:
            session.model.load_state_dict(saved)

    def make_sparse(self, plan: RoundPlan) -> None:
        apply_masks(self.session.weights, plan.final_masks)
        if plan.penalty_masks is not None:
            self.recalibrate_norms()

    def recalibrate_norms(self) -> None:
        """BatchNorm running statistics of the model's current weights, recomputed over
        BN_RECALIBRATION_BATCHES calibration batches (training.loop.recalibrate_batchnorm)."""
        with self.session.dist.unsynced_batchnorm(self.session.model):  # every rank sees these batches whole
            recalibrate_batchnorm(self.session.model, self.calibration_batches(BN_RECALIBRATION_BATCHES),
                                  self.session.amp, self.session.channels_last)

    def evaluate(self, split: str) -> float:
        session = self.session
        return evaluate(session.model, session.loaders[split], session.device, session.amp,
                        session.channels_last, session.dist).accuracy

    def maybe_save_epoch(self, progress: RoundProgress) -> None:
        interval = self.config.checkpoint_interval
        if progress.epoch == self.config.epochs:
            return  # the round checkpoint follows at once
        if interval > 0 and time.time() - self.last_save < interval and not self.stop.requested:
            return
        self.save(paths.latest_checkpoint(self.session.directory),
                  self.session.payload("epoch", progress, rewind=self.rewind))
        self.last_save = time.time()
        self.tracker.commit()  # the records this checkpoint covers can no longer be truncated: to wandb

    def save_rewind(self, epoch: int, state: Optional[dict] = None) -> None:
        """Save the model's weights now (or `state`, a CPU state dict) as this run's rewind point."""
        path = paths.rewind_weights(self.session.directory)
        sha = self.save(path, {"kind": "rewind", "prune_type": self.config.prune_type, "epoch": epoch,
                               "model": state if state is not None else cpu_state(self.session.model)})
        self.rewind = {"path": os.path.basename(path), "sha256": sha, "prune_type": self.config.prune_type,
                       "epoch": epoch}

    # ---- round end --------------------------------------------------------------------------
    def end_round(self, progress: RoundProgress) -> RoundPlan:
        session, plan, directory = self.session, progress.plan, self.session.directory
        self.make_sparse(plan)
        final_state = cpu_state(session.model)
        if progress.best_model is not None:
            session.model.load_state_dict(progress.best_model)
        test = self.evaluate("test")
        best_model = cpu_state(session.model)
        session.model.load_state_dict(final_state)
        self.update_best_round(progress.round, progress.best_val, test)
        ckpt_path = paths.round_checkpoint(directory, progress.round)
        metrics = {"round": progress.round, "epochs": progress.epoch, "val_top1": progress.best_val,
                   "best_epoch": progress.best_epoch, "test_top1": test,
                   "train_loss": progress.last_train_loss,
                   "remaining_pct": self.remaining_pct(plan.final_masks),
                   "best_round": session.best_round, "checkpoint": ckpt_path,
                   "layer_sparsity": layer_sparsity(plan.final_masks), **self.flops_metrics(plan.final_masks),
                   **self.struct.round_metrics()}
        payload = session.payload("round", progress, metrics=metrics, rewind=self.rewind)
        # the best file goes first: once the numbered checkpoint exists, the round is complete
        self.save(paths.round_best(directory, progress.round), dict(payload, model=best_model))
        sha = self.save(ckpt_path, payload)
        self.record_round(payload, sha)
        return plan

    def flops_metrics(self, masks) -> dict:
        """{"flops_per_image", "parameters"} of the model with the heads / channels / neurons its masks remove
        taken out (compact.structured_cost; the dense counts for element-wise masks) for the modes that mask
        weights; {} for the others (they report their own) or when counting fails: a round is never lost
        to a metric, the failure is logged instead."""
        if not self.struct.masks_weights:
            return {}
        image_shape = tuple(self.session.splits.test.images.shape[1:])
        try:
            return structured_cost(self.session.model, masks, image_shape)
        except Exception as exc:  # noqa: BLE001 - any failure of the counter: log it, keep the round
            self.tracker.warn(f"round FLOPs not counted ({type(exc).__name__}: {exc})")
            return {}

    def update_best_round(self, round_index: int, val: Optional[float], test: float) -> None:
        """Model selection across rounds is on validation too: the best round is the one with the
        highest val top-1 (ties: the later, sparser round); its test top-1 is reported beside it."""
        best = self.session.best_round
        if val is not None and val >= 0 and (best is None or val >= best["val_top1"]):
            self.session.best_round = {"round": round_index, "val_top1": val, "test_top1": test}

    def record_round(self, payload: dict, sha: str) -> None:
        """The round-end bookkeeping of a saved round: lineage.json entry, round record, removal of the
        round's latest.pth.tar. Idempotent, so a resume after a kill between the checkpoint and any of
        these (the last round's too) completes them."""
        directory, writer = self.session.directory, self.session.dist.is_writer
        if writer:
            checkpoint.record_round(directory, checkpoint.lineage_entry(payload, sha), header=lineage_header(
                self.config, directory))
        if not has_round_record(directory, payload["round"]):
            self.tracker.round(payload["metrics"])
        self.tracker.commit()
        self.session.history.clear()
        if writer:
            checkpoint.remove_quietly([paths.latest_checkpoint(directory)])
        self.completed = (paths.round_checkpoint(directory, payload["round"]), sha)


def lineage_header(config, directory: str) -> dict:
    header = {"config_hash": config.config_hash(), "run_dir": os.path.abspath(directory)}
    if config.resume_from:  # a branch: what kind (README "Lottery-ticket controls") and of which checkpoint
        header["branch"] = {"kind": config.branch or "continue", "from": config.resume_from}
    return header


def repair_history(begin: "starting.Start", config, directory: str, warn) -> None:
    """Rebuild lineage.json / metrics.jsonl records a resumed run lost, from its checkpoints."""
    p = begin.progress
    rounds = [index for index in map(paths.round_index_of, paths.numbered_checkpoints(directory))
              if index < p.round or (index == p.round and begin.round_complete)][::-1]
    history.repair_lineage(directory, rounds, lineage_header(config, directory), warn)
    history.repair_metrics(directory, rounds, None if begin.round_complete else begin.payload, warn,
                           pending=p.round if begin.round_complete else None)


def prepare_run_dir(begin: "starting.Start", config, directory: str) -> None:
    """The run dir's files before the first round trains: the branch's rewind weights, metrics.jsonl cut
    back to the checkpoint resumed from, config.json, provenance.json, lost history rebuilt."""
    os.makedirs(directory, exist_ok=True)
    starting.install_branch_rewind(begin, directory)
    if begin.resumed:
        p = begin.progress
        truncate_metrics(directory, p.round, p.epoch, begin.round_complete)
    else:  # a fresh start or a branch: records of an attempt that saved no checkpoint go
        truncate_metrics(directory, -1, 0, False)
    write_config(directory, config)
    provenance.record_start(directory)
    if begin.resumed:
        repair_history(begin, config, directory, lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))


def wants_channels_last(choice: str, model: torch.nn.Module, device: torch.device) -> bool:
    """auto: NHWC on CUDA when convolutions hold most of the weights (convnets, not a ViT's patch stem)."""
    if choice != "auto":
        return choice == "on"
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    total = sum(p.numel() for p in model.parameters())
    return device.type == "cuda" and conv > total / 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(config, runner_class=None) -> str:
    """Run (or resume, or branch) an experiment; returns its run directory. Under torchrun every rank calls it
    (training/distributed.py): rank 0 takes the lock and writes, the others only read. `runner_class`: a
    callable with RoundRunner's signature (default RoundRunner; training/fused/runner.py passes one whose
    epochs the fused group trains)."""
    directory = paths.run_dir(config)
    # one run per run dir, taken (by rank 0, the only writer) before anything reads or writes it
    with distributed.process_group(config) as ranks, distributed.writer_lock(ranks, directory):
        return _run_locked(config, directory, ranks, runner_class or RoundRunner)


def _run_locked(config, directory: str, ranks: distributed.Distributed = distributed.SINGLE,
                runner_class=None) -> str:
    starting.check_run_dir(config, directory)
    if ranks.is_writer:
        checkpoint.remove_partial_writes(directory)
    device = distributed.rank_device(config.device, ranks, resolve_device)
    seed_everything(config.seed, config.deterministic)
    model = ranks.prepare_model(create_model(config.arch, data.DATASETS[config.dataset].num_classes).to(device))
    struct = create_struct(config)
    struct.check_model(model)
    splits = ranks.rank_zero_first(lambda: data.load(config.dataset, config.data, config.val_size))
    weights = prunable_of(model, config)
    channels_last = wants_channels_last(config.channels_last, model, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    session = Session(config=config, directory=directory, device=device, model=model, weights=weights,
                      splits=splits, amp=resolve_amp(config.amp, device), channels_last=channels_last, struct=struct,
                      dist=ranks)
    session.step = session.new_step()
    begin = starting.resolve(session)
    p = begin.progress  # every rank starts from the same state, and has read it before rank 0 writes
    ranks.check_same("start (checkpoint, round, epoch, step)", (begin.source, p.round, p.epoch, p.batch))
    if ranks.is_writer:
        prepare_run_dir(begin, config, directory)
    tracker = Tracker(directory, config, resuming=begin.resumed, history=session.history) if ranks.is_writer \
        else RankTracker(ranks.rank)
    try:
        stop = ranks.stop_request(log=tracker.info)
        tracker.info(f"run dir {directory}: {config.arch} on {config.dataset}, struct {struct.describe()}, "
                     f"rate {config.rate}, {config.pruning_times} rounds x {config.epochs} epochs, device {device}")
        if begin.source:
            tracker.info(starting.describe(begin, config))
        runner = (runner_class or RoundRunner)(session, struct, tracker, begin.rewind, stop)
        if begin.new_rewind is not None:  # a random_reinit control: its fresh init is its rewind point
            runner.save_rewind(0, begin.new_rewind)
        if begin.resumed and begin.round_complete:
            runner.record_round(begin.payload, checkpoint.sha256_of(begin.source))
        if begin.source is None and (config.prune_type == "lt" or
                                     (config.prune_type == "rewind_lt" and config.rewind_epoch == 0)):
            runner.save_rewind(0)
            begin.progress.parent = paths.rewind_weights(directory)
            begin.progress.parent_sha256 = runner.rewind["sha256"]
        with stop:
            runner.run(begin.progress, begin.round_complete, begin.optimizer_state)
    finally:
        tracker.close()
    return directory
