"""Where a run reports: console, a human log.txt, metrics.jsonl and wandb.

wandb is optional: a missing package disables it with one warning, `--no_wandb` (or the
disabled mode) silently; it runs offline unless `--wandb_mode` says otherwise, and secrets come
from the environment only (WANDB_API_KEY), never from code.

metrics.jsonl is the record of truth; wandb mirrors it exactly once, in one run:
record i of metrics.jsonl is logged at wandb step i once a checkpoint covers it
(`commit()`: a resume never truncates it away), and `wandb_state.json` in the
run dir keeps the run id and how many records wandb was given (written
atomically after each log). A resumed run (`resume="allow"`, same id) first
replays the records wandb has not been given, then logs on. A record logged
twice (a kill between the log and the state write) lands on the same step with
the same values, so wandb keeps one. Offline, each process writes its own
`wandb/offline-run-*` folder under that id; `wandb sync` uploads them into the
one run.
"""
import hashlib
import json
import os
import secrets
import sys
import time
from typing import List, Optional

from utils import paths
from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.config import RunConfig

ROUND_COLUMNS = (("round", 5), ("epochs", 6), ("train_loss", 10), ("val_top1", 8), ("test_top1", 9),
                 ("remaining%", 10), ("best_round", 10), ("checkpoint", 0))


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
    return any(r.get("type") == "round" and r.get("round") == round_index for r in read_records(directory))


def read_records(directory: str) -> List[dict]:
    """The complete records of metrics.jsonl, in order (a line cut by a crash is left out)."""
    path = paths.metrics_file(directory)
    if not os.path.exists(path):
        return []
    records = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_wandb_state(directory: str) -> Optional[dict]:
    """{"run_id", "logged"} from wandb_state.json, or None when absent or unreadable."""
    try:
        with open(paths.wandb_state_file(directory)) as f:
            state = json.load(f)
        return state if isinstance(state.get("run_id"), str) and isinstance(state.get("logged"), int) else None
    except (OSError, ValueError, AttributeError):
        return None


def wandb_row(record: dict) -> dict:
    """The numeric fields of a metrics record, named `<type>/<field>` for wandb."""
    return {f"{record['type']}/{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    def __init__(self, directory: str, config: RunConfig, resuming: bool, history: Optional[List[dict]] = None):
        """`history`: a list the epoch records are appended to (Session.history, saved in checkpoints)."""
        self.directory, self.config = directory, config
        self.history = [] if history is None else history
        existing = read_records(directory)
        self.records = len(existing)  # metrics.jsonl index of the next record
        self.log_handle = open(paths.log_file(directory), "a", buffering=1)
        self.metrics_handle = open(paths.metrics_file(directory), "a", buffering=1)
        self.wandb, self.wandb_id, self.wandb_logged = None, None, 0
        self.pending: List[dict] = []  # records written but not yet covered by a checkpoint
        if not config.no_wandb:
            self.wandb = self._start_wandb(resuming, existing)
        self._header_printed = False

    def _start_wandb(self, resuming: bool, existing: List[dict]):
        if "disabled" in (self.config.wandb_mode, os.environ.get("WANDB_MODE")):
            return None  # wandb would accept and drop every call: nothing to mirror, nothing to record
        try:
            import wandb
        except ImportError:
            self.warn("wandb is not installed: logging to metrics.jsonl and log.txt only")
            return None
        state = read_wandb_state(self.directory) if resuming else None
        if state is not None:
            self.wandb_id, self.wandb_logged = state["run_id"], min(state["logged"], self.records)
        elif resuming and self.records:  # a run dir from before wandb_state.json: its id came from the path
            self.wandb_id = hashlib.sha256(os.path.abspath(self.directory).encode()).hexdigest()[:12]
        else:
            self.wandb_id = secrets.token_hex(6)
        try:
            run = wandb.init(project=self.config.wandb_project, name=run_name(self.config), id=self.wandb_id,
                             resume="allow", mode=self.config.wandb_mode, dir=self.directory,
                             config=dict(self.config.to_dict(), struct_head=self.config.vit_structured))
        except Exception as exc:  # a tracking failure must not lose the run
            self.warn(f"wandb could not start ({type(exc).__name__}: {exc}); continuing without it")
            return None
        self._save_wandb_state()
        pending = existing[self.wandb_logged:]
        if pending:
            self.info(f"wandb: replaying {len(pending)} record(s) of metrics.jsonl it has not been given")
        for record in pending:  # the resume point's checkpoint covers them
            self._log_wandb(run, self.wandb_logged, record)
        return run

    def _save_wandb_state(self) -> None:
        atomic_write_text(paths.wandb_state_file(self.directory),
                          json.dumps({"run_id": self.wandb_id, "logged": self.wandb_logged}) + "\n")

    def _log_wandb(self, run, index: int, record: dict) -> None:
        run.log(wandb_row(record), step=index)
        self.wandb_logged = index + 1
        self._save_wandb_state()

    def info(self, message: str) -> None:
        print(message, flush=True)
        self.log_handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)
        self.log_handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} warning: {message}\n")

    def _write(self, record: dict) -> None:
        self.metrics_handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.metrics_handle.flush()
        self.records += 1
        if self.wandb is not None:
            self.pending.append(record)

    def commit(self) -> None:
        """Send wandb the records written so far: call once a checkpoint covers them."""
        if self.wandb is not None:
            for record in self.pending:
                self._log_wandb(self.wandb, self.wandb_logged, record)
            self.pending.clear()

    def epoch(self, record: dict) -> None:
        record = {"type": "epoch", **record}
        self._write(record)
        self.history.append(record)

    def round(self, record: dict) -> None:
        self._write({"type": "round", **record})
        if not self._header_printed:
            self.info("  ".join(name.rjust(width) for name, width in ROUND_COLUMNS))
            self._header_printed = True
        val = record["val_top1"]
        cells = [str(record["round"]), str(record["epochs"]), f"{record['train_loss']:.4f}",
                 "-" if val is None or val < 0 else f"{val:.2f}", f"{record['test_top1']:.2f}",
                 f"{record['remaining_pct']:.2f}", _best_round_cell(record.get("best_round")), record["checkpoint"]]
        self.info("  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, ROUND_COLUMNS)))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        self.log_handle.close()
        self.metrics_handle.close()


class RankTracker:
    """The Tracker of a torchrun rank other than 0 (training/distributed.py): rank 0 reports for the run, so
    this one writes no file and prints nothing but warnings, tagged with its rank."""

    def __init__(self, rank: int):
        self.rank = rank

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        print(f"warning: [rank {self.rank}] {message}", file=sys.stderr, flush=True)

    def epoch(self, record: dict) -> None:
        pass

    def round(self, record: dict) -> None:
        pass

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


def _best_round_cell(best) -> str:
    """`<round>:<test top-1>` of the best-validation round so far; `-` without a validation split."""
    return "-" if not best else f"{best['round']}:{best['test_top1']:.2f}"


def progress(iterable, total: int, description: str, enabled: bool):
    """A tqdm bar on an interactive terminal; the plain iterable otherwise."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)


def write_config(directory: str, config: RunConfig) -> None:
    record = {"config": config.to_dict(), "config_hash": config.config_hash()}
    atomic_write_json(paths.config_file(directory), record, indent=2, sort_keys=True)

