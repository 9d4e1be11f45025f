"""Where a run starts: fresh, resumed from its own run dir, or branched from another run.

`check_run_dir` runs before any work (it only looks at files); `resolve` loads
and validates the checkpoint a run continues from. Neither writes anything, so
a rejected start leaves no trace.
"""
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

from data import resolve_val_size
from training import controls
from training.session import RoundProgress, Session
from utils import checkpoint, paths
from utils.config import CONTROLS, RunConfig, config_differences
from utils.errors import CheckpointError, UsageError
from utils.seeding import runtime_differences


@dataclass
class Start:
    progress: RoundProgress
    round_complete: bool
    optimizer_state: Optional[dict] = None
    rewind: Optional[dict] = None
    source: Optional[str] = None  # the checkpoint resumed or branched from
    branch_rewind_source: Optional[str] = None  # the parent's rewind file, copied in at start
    new_rewind: Optional[dict] = None  # a random_reinit branch's fresh init: its own rewind weights
    payload: Optional[dict] = None  # the checkpoint resumed from
    resumed: bool = False  # continues this run dir's own checkpoints (else: a fresh start or a branch)


def _has_checkpoints(directory: str) -> bool:
    return os.path.exists(paths.latest_checkpoint(directory)) or bool(paths.numbered_checkpoints(directory))


def _check_writable(directory: str) -> None:
    parent = directory
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    target = directory if os.path.exists(directory) else (parent or ".")
    if not os.path.isdir(target):
        raise UsageError(f"--save_dir {directory}: {target} exists and is not a directory")
    try:
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as exc:
        raise UsageError(f"--save_dir {directory}: not writable ({exc.strerror or exc})") from None


def check_run_dir(config: RunConfig, directory: str) -> None:
    _check_writable(directory)
    existing = _has_checkpoints(directory)
    if config.resume_from:
        if not os.path.isfile(config.resume_from):
            raise UsageError(f"--resume_from {config.resume_from}: no such file")
        if os.path.abspath(os.path.dirname(config.resume_from)) == os.path.abspath(directory):
            raise UsageError(f"--resume_from {config.resume_from}: a branch needs its own run dir; "
                             f"set --exp_name or --save_dir (or use --resume to continue this run)")
    if existing and not config.resume:
        raise UsageError(f"{directory} already holds checkpoints of a run; pass --resume to continue it, "
                         f"or choose another --exp_name / --save_dir")


def _check_same_experiment(path: str, payload: dict, config: RunConfig) -> None:
    saved = RunConfig.from_dict(payload["config"]).experiment_fields()
    differences = config_differences(saved, config.experiment_fields())
    if differences:
        raise UsageError(f"--resume: {path} was run with other settings ({'; '.join(differences[:4])}); "
                         f"pass the same flags, or branch with --resume_from")


def _resume(session: Session, path: str, payload: dict) -> Start:
    session.adopt_shapes(payload["model"])  # --struct lowrank / merge: the checkpoint's factorised layers, merger
    checkpoint.check_compatible(path, payload, session.model.state_dict(), session.config.to_dict())
    _check_same_experiment(path, payload, session.config)
    if payload.get("rewind"):
        verify_rewind(paths.rewind_weights(session.directory), payload["rewind"], f"--resume from {path}")
    _warn_runtime(payload, "--resume", "the resumed run", "an uninterrupted one")
    progress = session.restore(payload)
    return Start(progress=progress, round_complete=payload["kind"] == "round",
                 optimizer_state=payload.get("optimizer"), rewind=payload.get("rewind"), source=path, payload=payload,
                 resumed=True)


def _warn_runtime(payload: dict, flag: str, subject: str, reference: str) -> None:
    """One warning line per runtime setting (torch threads, deterministic kernels) that differs from the
    checkpoint's: floating-point reductions then run in another order, so results differ in the last bits
    and grow apart from there."""
    for difference in runtime_differences(payload["rng"]):
        print(f"warning: {flag}: {difference}, so {subject} is not bit-identical to {reference}", file=sys.stderr)


# Flags that define what a parent's weights are: a branch must use its parent's values (arch and dataset
# are checked with the weights' shapes in checkpoint.check_compatible). Every other flag applies to the
# rounds the branch runs itself. README "Resume and branch" lists the rules.
BRANCH_MUST_MATCH = {
    "seed": "initialisation and rewind weights",
    "val_size": "training/validation split (its weights were trained on the other one)",
    "struct": "pruning structure (its masks were made by that mode)",
    "vit_structured": "pruning structure (its masks were made by that mode)",
    "vit_prune_target": "pruning structure (its masks were made by that mode)",
}
LAYER_FLAGS = ("prune_classifier", "conv1")  # flags that choose which layers are prunable (--fc: prune_classifier)


def _flag_text(flag: str, value) -> str:
    if isinstance(value, bool):
        return f"--{flag}" if value else f"no --{flag}"
    return f"--{flag} {value}"


def _refuse_flag(path: str, flag: str, ours, theirs, what: str) -> None:
    raise CheckpointError(f"{_flag_text(flag, ours)}: {path} was made with {_flag_text(flag, theirs)}; a branch "
                          f"keeps its parent's {what}, so use the parent's setting or start a new run")


def _check_branch_flags(path: str, payload: dict, session: Session) -> None:
    """Refuse (one line naming the flag and the file) a branch flag its parent's checkpoint cannot honour;
    give layers the branch prunes but the parent kept dense (--prune_classifier) a dense mask to start from."""
    saved, ours = RunConfig.from_dict(payload["config"]).to_dict(), session.config.to_dict()  # legacy values filled
    for config in (saved, ours):  # the default split and the same size given explicitly are one split
        config["val_size"] = resolve_val_size(config["dataset"], config["val_size"])
    for flag, what in BRANCH_MUST_MATCH.items():
        if flag == "seed" and ours.get("branch") in controls.SEEDED:
            continue  # the seed draws the control's new init / random masks (and its data order)
        if flag in ours and saved.get(flag, ours[flag]) != ours[flag]:
            _refuse_flag(path, flag, ours[flag], saved.get(flag), what)
    regrown = sorted(set(payload["masks"]) - set(session.weights))
    if regrown:
        flag = next((f for f in LAYER_FLAGS if f in ours and saved.get(f, ours[f]) != ours[f]), "prune_classifier")
        _refuse_flag(path, flag, ours.get(flag), saved.get(flag), f"pruned {', '.join(regrown[:2])} (a branch "
                     f"cannot un-prune a layer)")
    newly_pruned = {name: torch.ones(tuple(w.shape), dtype=torch.bool) for name, w in session.weights.items()
                    if name not in payload["masks"]}
    payload["masks"] = {**payload["masks"], **newly_pruned}  # dense: pruned from the branch's next round on


def _branch(session: Session, path: str) -> Start:
    payload = checkpoint.load(path)
    if payload["kind"] != "round":
        raise CheckpointError(f"--resume_from {path}: an epoch-level checkpoint; branch from a numbered "
                              f"<round>checkpoint.pth.tar")
    session.adopt_shapes(payload["model"])
    checkpoint.check_compatible(path, payload, session.model.state_dict(), session.config.to_dict())
    _check_branch_flags(path, payload, session)
    _warn_runtime(payload, "--resume_from", "the branch", "its parent's round")
    progress = session.restore(payload)
    progress.parent, progress.parent_sha256 = os.path.abspath(path), checkpoint.sha256_of(path)
    rewind, rewind_source, kind = None, None, session.config.branch
    if session.config.prune_type != "pt" and kind != "random_reinit":  # random_reinit rewinds to its own init
        rewind = payload.get("rewind")
        if not rewind:
            raise CheckpointError(f"--resume_from {path}: its run saved no rewind weights; "
                                  f"branch with --prune_type pt")
        if rewind["prune_type"] != session.config.prune_type:
            _refuse_flag(path, "prune_type", session.config.prune_type, rewind["prune_type"], "rewind weights")
        if session.config.prune_type == "rewind_lt" and rewind["epoch"] != session.config.rewind_epoch:
            _refuse_flag(path, "rewind_epoch", session.config.rewind_epoch, rewind["epoch"],
                         f"rewind weights (epoch {rewind['epoch']} of its round 0)")
        rewind_source = os.path.join(os.path.dirname(path), rewind["path"])
        verify_rewind(rewind_source, rewind, f"--resume_from {path}")
    if kind in CONTROLS:
        if session.config.pruning_times <= payload["round"]:
            raise UsageError(f"--pruning_times {session.config.pruning_times}: the {kind} control re-trains round "
                             f"{payload['round']} of {path}, so it needs --pruning_times {payload['round'] + 1} "
                             f"or more (rounds are numbered from 0)")
        progress, new_rewind = controls.control_start(session, kind, payload, path, rewind_source)
        return Start(progress=progress, round_complete=False, rewind=rewind, source=path,
                     branch_rewind_source=rewind_source, new_rewind=new_rewind)
    return Start(progress=progress, round_complete=True, rewind=rewind, source=path,
                 branch_rewind_source=rewind_source)


def describe(start: Start, config: RunConfig) -> str:
    """The log line that says where a resumed or branched run goes on (epochs 1-based, as the epoch lines)."""
    p = start.progress
    if start.resumed and not start.round_complete:
        where = (f"round {p.round}, inside epoch {p.epoch + 1} at step {p.batch}" if p.batch else
                 f"round {p.round}, epoch {p.epoch + 1} (epochs 1-{p.epoch} done)" if p.epoch else
                 f"the start of round {p.round}")
        return f"resuming from {start.source}: {where}"
    if start.resumed:
        return f"resuming from {start.source}: round {p.round} is complete, next round {p.round + 1}"
    if config.branch in CONTROLS:
        return f"branching from {start.source} as a {config.branch} control: training its round {p.round} again"
    return f"branching from {start.source} (its round {p.round}): next round {p.round + 1}"


def verify_rewind(path: str, rewind: dict, context: str) -> None:
    """The rewind file a checkpoint names must exist with the sha256 recorded there; CheckpointError if not."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{context}: its rewind weights {path} are missing")
    if checkpoint.sha256_of(path) != rewind["sha256"]:
        raise CheckpointError(f"{path}: damaged or replaced, its sha256 differs from the one recorded in the "
                              f"checkpoints ({context}); the rewind weights cannot be rebuilt: restore the file "
                              f"or start the run again")


def _check_branch_origin(path: str, payload: dict, config: RunConfig) -> None:
    """`--resume --resume_from X` continues the branch of X made in this run dir, never another run."""
    origin = payload["config"].get("resume_from")
    if origin is None or os.path.abspath(origin) != os.path.abspath(config.resume_from):
        made = f"a branch of {origin}" if origin else "not a branch"
        raise UsageError(f"--resume_from {config.resume_from}: the run in {os.path.dirname(path)} is {made}; "
                         f"to continue it, pass --resume with its own flags")


def resolve(session: Session) -> Start:
    """Where this run starts. Raises CheckpointError/UsageError (one line) before anything is written."""
    config, directory = session.config, session.directory
    if config.resume:
        found = checkpoint.find_latest_valid(directory, log=lambda m: print(f"warning: {m}", file=sys.stderr))
        if found:
            if config.resume_from:
                _check_branch_origin(found[0], found[1], config)
            return _resume(session, *found)
        if _has_checkpoints(directory):
            raise CheckpointError(f"--resume: no usable checkpoint in {directory} (all are corrupt)")
        what = f"starting the branch from {config.resume_from}" if config.resume_from else \
            "starting a new run from round 0"
        print(f"--resume: no checkpoint in {directory} yet; {what}", file=sys.stderr)
    if config.resume_from:
        return _branch(session, config.resume_from)
    return Start(progress=RoundProgress(round=0, plan=session.dense_plan()), round_complete=False)


def install_branch_rewind(start: Start, directory: str) -> None:
    """Copy the parent run's rewind weights into the branch's own run dir."""
    if start.branch_rewind_source:
        target = paths.rewind_weights(directory)
        with open(start.branch_rewind_source, "rb") as f:
            checkpoint.atomic_write_bytes(target, f.read())
