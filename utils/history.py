"""Rebuild a run's lineage.json and metrics.jsonl from its checkpoints when they are lost or damaged.

Every round checkpoint holds its round's lineage record, its round record (`metrics`) and its epoch
records (`history`); latest.pth.tar holds the epoch records of the round under way. So a resumed run
whose lineage.json is truncated or deleted, or whose metrics.jsonl lost records, gets them back (with
a warning naming the file); only rounds whose checkpoints are themselves unusable stay lost, and the
warning says which.
"""
import json
import os
from typing import Callable, Dict, List, Optional

from utils import checkpoint, paths
from utils.errors import CheckpointError
from utils.tracking import read_records


def _round_payloads(directory: str, rounds: List[int], warn: Callable[[str], None]) -> Dict[int, dict]:
    loaded = {}
    for index in rounds:
        path = paths.round_checkpoint(directory, index)
        try:
            loaded[index] = checkpoint.load(path)
        except CheckpointError as exc:
            warn(f"cannot rebuild round {index}'s history: {exc}")
    return loaded


def repair_lineage(directory: str, rounds: List[int], header: dict, warn: Callable[[str], None]) -> None:
    """Make lineage.json hold an entry for each round in `rounds` (the run dir's numbered checkpoints)."""
    path = paths.lineage_file(directory)
    try:
        lineage = checkpoint.read_lineage(directory)
        reason = "is missing" if not os.path.exists(path) else "lacks rounds"
    except CheckpointError as exc:
        lineage, reason = {"rounds": []}, f"is unreadable ({exc})"
    have = {entry.get("round") for entry in lineage["rounds"] if isinstance(entry, dict)}
    missing = [index for index in rounds if index not in have]
    if not missing:
        return
    rebuilt = _round_payloads(directory, missing, warn)
    entries = [e for e in lineage["rounds"] if isinstance(e, dict) and e.get("round") not in rebuilt]
    for index, payload in rebuilt.items():
        sha = checkpoint.sha256_of(paths.round_checkpoint(directory, index))
        entries.append(checkpoint.lineage_entry(payload, sha))
    lineage.update(header)
    lineage["rounds"] = sorted(entries, key=lambda e: e["round"])
    checkpoint.atomic_write_json(path, lineage, indent=2)
    warn(f"{path} {reason}: rebuilt round(s) {', '.join(map(str, sorted(rebuilt)))} from the round checkpoints")


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def repair_metrics(directory: str, rounds: List[int], current: Optional[dict], warn: Callable[[str], None],
                   pending: Optional[int] = None) -> None:
    """Make metrics.jsonl hold, in order, each finished round's epoch records and round record, then the
    epoch records of the round under way (`current`: the epoch checkpoint resumed from, or None).

    A round whose records in the file are complete keeps them; others come from the checkpoints.
    `pending`: a finished round whose round record the caller is about to write (a run killed between
    its checkpoint and its record), so its epoch records alone are complete.
    Call after utils.tracking.truncate_metrics has dropped the records past the resume point.
    """
    records = read_records(directory)
    by_round: Dict[int, List[dict]] = {}
    for record in records:
        by_round.setdefault(record.get("round"), []).append(record)

    def complete(index: int, epochs: int, with_round_record: bool) -> bool:
        have = by_round.get(index, [])
        epoch_numbers = sorted(r.get("epoch") for r in have if r.get("type") == "epoch")
        round_records = [r for r in have if r.get("type") == "round"]
        return epoch_numbers == list(range(1, epochs + 1)) and len(round_records) == int(with_round_record)

    rebuilt, lost, out = [], [], []
    payloads = {}
    for index in rounds:
        saved = by_round.get(index, [])
        round_record = next((r for r in saved if r.get("type") == "round"), None)
        epochs = sum(r.get("type") == "epoch" for r in saved)
        if round_record is not None and complete(index, round_record.get("epochs", -1), True) or \
                round_record is None and index == pending and epochs and complete(index, epochs, False):
            out += saved
            continue
        payloads.update(_round_payloads(directory, [index], warn))
        if index not in payloads:
            out += saved
            lost.append(index)
            continue
        payload = payloads[index]
        history = payload.get("history")
        if history is None:  # a checkpoint written before epoch records were saved in it
            history, lost = [r for r in saved if r.get("type") == "epoch"], lost + [index]
        out += history + [{"type": "round", **payload["metrics"]}]
        rebuilt.append(index)
    if current is not None:
        index, epochs = current["round"], current["epoch"]
        if complete(index, epochs, False):
            out += by_round.get(index, [])  # a mid-epoch save in the round's first epoch has none yet
        else:
            out += current.get("history", [])
            rebuilt.append(index)
    if [_line(r) for r in out] == [_line(r) for r in records]:
        return
    checkpoint.atomic_write_text(paths.metrics_file(directory), "".join(_line(r) for r in out))
    note = f"; round(s) {', '.join(map(str, lost))} have unusable checkpoints or no saved epochs" if lost else ""
    warn(f"{paths.metrics_file(directory)} lacked records: rebuilt round(s) "
         f"{', '.join(map(str, rebuilt)) or 'none'} from the checkpoints{note}")
