"""The state of a cell from the plain files of its run dir (no checkpoint is loaded).

finished     lineage.json lists every round 0 .. pruning_times-1 and each listed round's numbered
             checkpoint exists: the runner would say "nothing to run" (it writes the numbered
             checkpoint first and the lineage entry right after, so a kill between the two leaves
             the cell interrupted and the resume completes the entry).
locked       another process holds the run dir's lock (utils/lock.py), or a lock from another host
             that this host cannot check: the cell is skipped with a note.
interrupted  the run dir exists but is not finished: `--resume` continues it (or starts round 0 when
             it holds no checkpoint yet).
new          no run dir yet.
"""
import fcntl
import os
import socket
from dataclasses import dataclass
from typing import List, Optional

from utils import paths
from utils.lock import describe, read_holder

FINISHED, INTERRUPTED, NEW, LOCKED = "finished", "interrupted", "new", "locked"


@dataclass(frozen=True)
class CellState:
    """`rounds`: finished rounds (lineage entries with their checkpoint); `best`: the lineage entry with the
    highest val top-1 (ties: the later round), as the runner selects, or None; `note`: why it is locked."""
    state: str
    rounds: List[int]
    best: Optional[dict] = None
    note: str = ""


def lock_holder(directory: str) -> Optional[str]:
    """A description of the process that holds `directory`'s run lock, or None when nobody does.

    A shared, non-blocking flock probe: it fails exactly while a runner holds its exclusive flock (the kernel
    drops that when the runner dies, even by SIGKILL, so a stale lock file is not 'locked'). A lock file
    written by another host is reported as locked, as the runner itself refuses it.
    """
    path = paths.lock_file(directory)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return describe(read_holder(path))
    finally:
        os.close(fd)  # also drops our probe
    holder = read_holder(path)
    if holder and holder.get("host") not in (None, socket.gethostname()):
        return f"a lock from another host: {describe(holder)}"
    return None


def finished_rounds(directory: str) -> List[dict]:
    """lineage.json's round entries whose numbered checkpoint exists ([] when unreadable: the runner repairs it)."""
    from utils.checkpoint import CheckpointError, read_lineage
    try:
        rounds = read_lineage(directory).get("rounds", [])
    except CheckpointError:
        return []
    return [r for r in rounds if isinstance(r, dict) and isinstance(r.get("round"), int)
            and os.path.isfile(paths.round_checkpoint(directory, r["round"]))]


def best_round(rounds: List[dict]) -> Optional[dict]:
    """The entry with the highest val_top1 (ties: the later, sparser round); None without validation numbers."""
    scored = [r for r in rounds if isinstance(r.get("val_top1"), (int, float)) and r["val_top1"] >= 0]
    return max(scored, key=lambda r: (r["val_top1"], r["round"])) if scored else None


def cell_state(directory: str, pruning_times: int) -> CellState:
    """The state of the run dir `directory` of a cell whose runner does rounds 0 .. pruning_times-1."""
    if not os.path.isdir(directory):
        return CellState(NEW, [])
    rounds = finished_rounds(directory)
    numbers = sorted(r["round"] for r in rounds)
    best = best_round(rounds)
    holder = lock_holder(directory)
    if holder is not None:
        return CellState(LOCKED, numbers, best, f"in use by {holder}")
    # every round from the first recorded one (0, or a branch's parent round + 1) to the last asked for
    done = bool(numbers) and set(range(numbers[0], pruning_times)) <= set(numbers)
    return CellState(FINISHED if done else INTERRUPTED, numbers, best)
