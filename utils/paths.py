"""Every artifact path of a run directory, in one place."""
import os
import re
from typing import Optional

from utils.config import RunConfig
from utils.errors import UsageError

ROUND_CHECKPOINT = re.compile(r"^(\d+)checkpoint\.pth\.tar$")


PATH_FLAGS = ("data", "save_dir", "resume_from")  # may not be empty when given
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"


def check_text_flags(values: dict) -> None:
    """Every string flag must be printable UTF-8 text on one line; path flags non-empty; --exp_name a
    plain name, so a run dir stays under the working directory. Raises UsageError naming the flag."""
    for flag, value in values.items():
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"--{flag} {ascii(value)}: not valid UTF-8") from None
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise UsageError(f"--{flag} {ascii(value)}: contains a newline or another control character")
        if flag in PATH_FLAGS and not value:
            raise UsageError(f"--{flag}: empty path" + (" (leave the flag out for the default run dir)"
                                                       if flag == "save_dir" else ""))
    name = values.get("exp_name") or ""
    if "/" in name or name in (".", "..") or name.startswith("-"):
        raise UsageError(f"--exp_name {name}: must be a plain name (no '/', not '.' or '..'); "
                         f"use --save_dir to put a run elsewhere")
    project = values.get("wandb_project")
    if project is not None and (not project or any(ch in WANDB_PROJECT_FORBIDDEN for ch in project)):
        raise UsageError(f"--wandb_project {project!r}: must be non-empty and free of {WANDB_PROJECT_FORBIDDEN}")


def run_dir(config: RunConfig) -> str:
    if config.save_dir:
        return config.save_dir
    base = f"{config.dataset}_{config.struct}_output"
    return f"{base}_{config.exp_name}" if config.exp_name else base


def round_checkpoint(directory: str, round_index: int) -> str:
    return os.path.join(directory, f"{round_index}checkpoint.pth.tar")


def round_best(directory: str, round_index: int) -> str:
    return os.path.join(directory, f"{round_index}model_best.pth.tar")


def latest_checkpoint(directory: str) -> str:
    return os.path.join(directory, "latest.pth.tar")


def rewind_weights(directory: str) -> str:
    return os.path.join(directory, "rewind.pth.tar")


def lineage_file(directory: str) -> str:
    return os.path.join(directory, "lineage.json")


def metrics_file(directory: str) -> str:
    return os.path.join(directory, "metrics.jsonl")


def log_file(directory: str) -> str:
    return os.path.join(directory, "log.txt")


def config_file(directory: str) -> str:
    return os.path.join(directory, "config.json")


def wandb_state_file(directory: str) -> str:
    return os.path.join(directory, "wandb_state.json")


def provenance_file(directory: str) -> str:
    """One record per process that started or resumed the run (utils/provenance.py)."""
    return os.path.join(directory, "provenance.json")


def lock_file(directory: str) -> str:
    return os.path.join(directory, ".lock")


def compact_round_report(directory: str, round_index: int) -> str:
    """export_compact.py's measurements of round k (params, FLOPs, latency, throughput per variant)."""
    return os.path.join(directory, "compact", f"round_{round_index}.json")


def sweep_file(folder: str) -> str:
    """sweep.py's record of a sweep folder: its grid and its cells' run dirs."""
    return os.path.join(folder, "sweep.json")


def jobs_file(folder: str) -> str:
    """sweep.py's record of which scheduler job ran which cell of a sweep folder."""
    return os.path.join(folder, "jobs.json")


def round_index_of(path: str) -> Optional[int]:
    match = ROUND_CHECKPOINT.match(os.path.basename(path))
    return int(match.group(1)) if match else None


def numbered_checkpoints(directory: str) -> list:
    """Numbered round checkpoints of a run dir, newest round first."""
    if not os.path.isdir(directory):
        return []
    found = [(round_index_of(name), name) for name in os.listdir(directory)]
    return [os.path.join(directory, name) for index, name in sorted(
        (pair for pair in found if pair[0] is not None), reverse=True)]
