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

from training.session import RoundProgress, Session
from utils import checkpoint, paths
from utils.config import RunConfig, config_differences
from utils.errors import CheckpointError, UsageError


@dataclass
class Start:
    progress: RoundProgress
    round_complete: bool
    optimizer_state: Optional[dict] = None
    rewind: Optional[dict] = None
    source: Optional[str] = None  # the checkpoint resumed or branched from
    branch_rewind_source: Optional[str] = None  # the parent's rewind file, copied in at start
    payload: Optional[dict] = None  # the checkpoint resumed from


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
    checkpoint.check_compatible(path, payload, session.model.state_dict(), session.config.to_dict())
    _check_same_experiment(path, payload, session.config)
    progress = session.restore(payload)
    return Start(progress=progress, round_complete=payload["kind"] == "round",
                 optimizer_state=payload.get("optimizer"), rewind=payload.get("rewind"), source=path, payload=payload)


def _branch(session: Session, path: str) -> Start:
    payload = checkpoint.load(path)
    if payload["kind"] != "round":
        raise CheckpointError(f"--resume_from {path}: an epoch-level checkpoint; branch from a numbered "
                              f"<round>checkpoint.pth.tar")
    checkpoint.check_compatible(path, payload, session.model.state_dict(), session.config.to_dict())
    progress = session.restore(payload)
    progress.parent, progress.parent_sha256 = os.path.abspath(path), checkpoint.sha256_of(path)
    rewind, rewind_source = None, None
    if session.config.prune_type != "pt":
        rewind = payload.get("rewind")
        if not rewind:
            raise CheckpointError(f"--resume_from {path}: its run saved no rewind weights; "
                                  f"branch with --prune_type pt")
        if rewind["prune_type"] != session.config.prune_type:
            raise CheckpointError(f"--resume_from {path}: its rewind weights are for --prune_type "
                                  f"{rewind['prune_type']}, this run uses {session.config.prune_type}")
        rewind_source = os.path.join(os.path.dirname(path), rewind["path"])
        if not os.path.isfile(rewind_source) or checkpoint.sha256_of(rewind_source) != rewind["sha256"]:
            raise CheckpointError(f"--resume_from {path}: rewind weights {rewind_source} are missing or changed")
    return Start(progress=progress, round_complete=True, rewind=rewind, source=path,
                 branch_rewind_source=rewind_source)


def resolve(session: Session) -> Start:
    config, directory = session.config, session.directory
    if config.resume:
        found = checkpoint.find_latest_valid(directory, log=lambda m: print(f"warning: {m}", file=sys.stderr))
        if found:
            return _resume(session, *found)
        if _has_checkpoints(directory):
            raise CheckpointError(f"--resume: no usable checkpoint in {directory} (all are corrupt)")
        print(f"--resume: no checkpoint in {directory} yet; starting from round 0", file=sys.stderr)
    if config.resume_from:
        return _branch(session, config.resume_from)
    return Start(progress=RoundProgress(round=0, plan=session.dense_plan()), round_complete=False)


def install_branch_rewind(start: Start, directory: str) -> None:
    """Copy the parent run's rewind weights into the branch's own run dir."""
    if start.branch_rewind_source:
        target = paths.rewind_weights(directory)
        with open(start.branch_rewind_source, "rb") as f:
            checkpoint.atomic_write_bytes(target, f.read())
