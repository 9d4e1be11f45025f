"""Files of a low-rank training run, all under `<results_dir>/<arch>/`:

    best_model.pt                   lowrank.models.save_trained (the lowest validation MSE)
    history.json                    one record per epoch, appended across --resume runs
    train_val_loss_comparison.png   train and validation MSE per epoch (log scale)
    log/logs_<timestamp>/           config.json, training.log, effective_rank.jsonl (AdaLoRA with the
                                    allocator: one record per step), summary.json
"""
import datetime
import json
import os
from typing import List, Optional

from utils.checkpoint import atomic_write_json

BEST_MODEL, HISTORY, PLOT = "best_model.pt", "history.json", "train_val_loss_comparison.png"


def arch_dir(results_dir: str, arch: str) -> str:
    return os.path.join(results_dir, arch)


def read_history(directory: str) -> List[dict]:
    """history.json of `directory` (a list of epoch records), [] when there is none.
    Raises ValueError naming the file when it is not a JSON list."""
    path = os.path.join(directory, HISTORY)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable history ({type(exc).__name__})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: not a list of epoch records")
    return records


def write_history(directory: str, records: List[dict]) -> None:
    atomic_write_json(os.path.join(directory, HISTORY), records, indent=1)


def plot_losses(directory: str, records: List[dict]) -> str:
    """Write train_val_loss_comparison.png (train and validation MSE per epoch); returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(directory, PLOT)
    epochs = [r["epoch"] for r in records]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(epochs, [r["train_mse"] for r in records], marker="o", label="train MSE")
    axis.plot(epochs, [r["val_mse"] for r in records], marker="s", label="validation MSE")
    axis.set_xlabel("epoch")
    axis.set_ylabel("reconstruction MSE")
    if all(r["train_mse"] > 0 and r["val_mse"] > 0 for r in records):
        axis.set_yscale("log")
    axis.set_title(os.path.basename(os.path.normpath(directory)))
    axis.legend()
    figure.tight_layout()
    tmp = os.path.join(directory, ".tmp-" + PLOT)
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, path)
    return path


class RunLog:
    """log/logs_<timestamp>/ of one run: the config, a line log, per-step ranks and the summary."""

    def __init__(self, directory: str, config: dict):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
        base = os.path.join(directory, "log", f"logs_{stamp}")
        self.path, number = base, 1
        while os.path.exists(self.path):  # two runs within one second
            number += 1
            self.path = f"{base}_{number}"
        os.makedirs(self.path)
        atomic_write_json(os.path.join(self.path, "config.json"), config, indent=1)
        self._lines = open(os.path.join(self.path, "training.log"), "a")
        self._ranks: Optional[object] = None

    def line(self, text: str) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
        self._lines.write(f"{stamp} {text}\n")
        self._lines.flush()

    def rank(self, step: int, rank: int) -> None:
        """Append {step, effective_rank} to effective_rank.jsonl."""
        if self._ranks is None:
            self._ranks = open(os.path.join(self.path, "effective_rank.jsonl"), "a")
        self._ranks.write(json.dumps({"step": step, "effective_rank": rank}) + "\n")

    def summary(self, record: dict) -> None:
        atomic_write_json(os.path.join(self.path, "summary.json"), record, indent=1)

    def close(self) -> None:
        for handle in (self._lines, self._ranks):
            if handle is not None:
                handle.close()
