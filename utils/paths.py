"""Every artifact path of a run directory, in one place."""
import os
import re
from typing import Optional

from utils.config import RunConfig

ROUND_CHECKPOINT = re.compile(r"^(\d+)checkpoint\.pth\.tar$")


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


def lock_file(directory: str) -> str:
    return os.path.join(directory, ".lock")


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
