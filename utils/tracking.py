"""Where a run reports: console, a human log.txt, metrics.jsonl and wandb.

wandb is optional: `--no_wandb` or a missing package disables it with one
warning; it runs offline unless `--wandb_mode` says otherwise, and secrets come
from the environment only (WANDB_API_KEY), never from code.
"""
import hashlib
import json
import os
import sys
import time

from utils import paths
from utils.checkpoint import atomic_write_text
from utils.config import RunConfig

ROUND_COLUMNS = (("round", 5), ("epochs", 6), ("train_loss", 10), ("val_top1", 8), ("test_top1", 9),
                 ("remaining%", 10), ("best_test", 9), ("checkpoint", 0))


def run_name(config: RunConfig) -> str:
    head = "_head" if config.vit_structured else ""
    return f"{config.struct}{head}_{config.arch}_{config.dataset}_rate{config.rate}_{config.criteria}"


def truncate_metrics(directory: str, round_index: int, epoch: int, round_complete: bool) -> None:
    """Drop records written after the state a run resumes from, so metrics are not duplicated."""
    path = paths.metrics_file(directory)
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            r = record.get("round", -1)
            if record.get("type") == "round":
                keep = r < round_index or (r == round_index and round_complete)
            else:
                keep = (r, record.get("epoch", 0)) <= (round_index, epoch)
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))


def has_round_record(directory: str, round_index: int) -> bool:
    path = paths.metrics_file(directory)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("type") == "round" and record.get("round") == round_index:
                return True
    return False


class Tracker:
    def __init__(self, directory: str, config: RunConfig, resuming: bool):
        self.directory, self.config = directory, config
        self.log_handle = open(paths.log_file(directory), "a", buffering=1)
        self.metrics_handle = open(paths.metrics_file(directory), "a", buffering=1)
        self.wandb = None
        if not config.no_wandb:
            self.wandb = self._start_wandb(resuming)
        self._header_printed = False

    def _start_wandb(self, resuming: bool):
        try:
            import wandb
        except ImportError:
            self.warn("wandb is not installed: logging to metrics.jsonl and log.txt only")
            return None
        run_id = hashlib.sha256(os.path.abspath(self.directory).encode()).hexdigest()[:12]
        try:
            return wandb.init(project=self.config.wandb_project, name=run_name(self.config), id=run_id,
                              resume="allow" if resuming else None, mode=self.config.wandb_mode,
                              dir=self.directory, reinit=True,
                              config=dict(self.config.to_dict(), struct_head=self.config.vit_structured))
        except Exception as exc:  # a tracking failure must not lose the run
            self.warn(f"wandb could not start ({type(exc).__name__}: {exc}); continuing without it")
            return None

    def info(self, message: str) -> None:
        print(message, flush=True)
        self.log_handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)
        self.log_handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} warning: {message}\n")

    def _write(self, record: dict) -> None:
        self.metrics_handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.metrics_handle.flush()
        if self.wandb is not None:
            prefix = record["type"]
            self.wandb.log({f"{prefix}/{k}": v for k, v in record.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def epoch(self, record: dict) -> None:
        self._write({"type": "epoch", **record})

    def round(self, record: dict) -> None:
        self._write({"type": "round", **record})
        if not self._header_printed:
            self.info("  ".join(name.rjust(width) for name, width in ROUND_COLUMNS))
            self._header_printed = True
        val = record["val_top1"]
        cells = [str(record["round"]), str(record["epochs"]), f"{record['train_loss']:.4f}",
                 "-" if val is None or val < 0 else f"{val:.2f}", f"{record['test_top1']:.2f}",
                 f"{record['remaining_pct']:.2f}", f"{record['best_test_top1']:.2f}", record["checkpoint"]]
        self.info("  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, ROUND_COLUMNS)))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        self.log_handle.close()
        self.metrics_handle.close()


def progress(iterable, total: int, description: str, enabled: bool):
    """A tqdm bar on an interactive terminal; the plain iterable otherwise."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)


def write_config(directory: str, config: RunConfig) -> None:
    record = {"config": config.to_dict(), "config_hash": config.config_hash()}
    atomic_write_text(paths.config_file(directory), json.dumps(record, indent=2, sort_keys=True) + "\n")

