"""`<root>/<name>/sweep.json` (what the sweep is) and `jobs.json` (which scheduler job ran which cell).

sweep.json is a contract read by report_runs.py:
    {"name", "grid": {key: [values as given]}, "runner_flags": [str], "executor": str,
     "cells": [{"name", "values": {key: str}, "run_dir" (relative to the sweep folder), "command": [str]}]}
Re-running the same sweep re-uses it; another grid or other runner flags under the same name are refused,
so two experiments never mix in one folder. Both files are written atomically.
"""
import datetime
import json
import os
from typing import Dict, List, Optional

from sweeps.plan import Sweep
from utils import paths
from utils.errors import UsageError



def _read(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable ({type(exc).__name__}); move it away or use another --name") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: not a sweep record; move it away or use another --name")
    return value


def _cells_of(record: dict) -> Dict[str, dict]:
    return {c.get("name"): c.get("values") for c in record.get("cells", []) if isinstance(c, dict)}


def check_existing(sweep: Sweep) -> Optional[dict]:
    """The stored record of this sweep (None when new); UsageError naming sweep.json when the name is already
    used by another grid or other runner flags. The order of the values does not matter, only the cells."""
    path = paths.sweep_file(sweep.folder)
    stored = _read(path)
    if stored is None:
        if os.path.exists(sweep.folder) and not os.path.isdir(sweep.folder):
            raise UsageError(f"{sweep.folder}: exists and is not a folder; choose another --root or --name")
        return None
    given = sweep.record("")
    if stored.get("runner_flags") != given["runner_flags"]:
        raise UsageError(f"{path}: sweep {sweep.name!r} was made with runner flags {stored.get('runner_flags')}, "
                         f"not {given['runner_flags']}; use another --name (sweeps never mix in one folder)")
    if _cells_of(stored) != _cells_of(given):
        raise UsageError(f"{path}: sweep {sweep.name!r} was made with the grid {stored.get('grid')}, not "
                         f"{given['grid']}; use another --name (sweeps never mix in one folder)")
    return stored


def write(sweep: Sweep, executor: str, stored: Optional[dict]) -> None:
    """Write sweep.json for a new sweep; for an existing one only the executor field may change."""
    from utils.checkpoint import atomic_write_text
    record = sweep.record(executor)
    if stored is not None:
        if stored.get("executor") == executor:
            return
        record = dict(stored, executor=executor)
    os.makedirs(sweep.folder, exist_ok=True)
    atomic_write_text(paths.sweep_file(sweep.folder), json.dumps(record, indent=2) + "\n")


def add_jobs(folder: str, executor: str, log_folder: str, jobs: List[dict]) -> None:
    """Append one submission ({"executor", "submitted", "log_folder", "jobs": [{"cell", "job_id"}]}) to
    jobs.json; earlier submissions are kept (a requeued or re-submitted cell keeps its history)."""
    from utils.checkpoint import atomic_write_text
    path = paths.jobs_file(folder)
    record = _read(path) or {"submissions": []}
    record.setdefault("submissions", []).append({
        "executor": executor, "submitted": datetime.datetime.now().isoformat(timespec="seconds"),
        "log_folder": log_folder, "jobs": jobs})
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def latest_jobs(folder: str) -> Dict[str, str]:
    """{cell name: job id of its latest submission} from jobs.json ({} when there is none)."""
    latest: Dict[str, str] = {}
    for submission in (_read(paths.jobs_file(folder)) or {}).get("submissions", []):
        for job in submission.get("jobs", []):
            latest[job["cell"]] = str(job["job_id"])
    return latest
