"""`<root>/<name>/sweep.json` (what the sweep is) and `jobs.json` (which scheduler job ran which cell).

sweep.json is a contract read by report_runs.py:
    {"name", "grid": {key: [values as given]}, "runner_flags": [str], "executor": str,
     "cells": [{"name", "values": {key: str}, "run_dir" (relative to the sweep folder), "command": [str]}]}
Re-running the same sweep re-uses it. A grid with the same keys and runner flags but other values extends
it: sweep.json then holds the union of the values (earlier ones first, new ones in the order given) and
every cell ever made (in the order of that union's cartesian product); cells keep their names and run
dirs. Other keys or other runner flags under the same name are refused, so two experiments never mix in
one folder. Both files are written atomically.
"""
import datetime
import itertools
import os
from typing import Dict, List, Optional

from sweeps import grid as grids
from sweeps.plan import Sweep
from utils import paths
from utils.errors import UsageError
from utils.jsonfile import read_json

ALLOWED = "extending a key's values is allowed, but the grid keys and runner flags must match"


def _read(path: str, what: str) -> Optional[dict]:
    """The JSON object in `path` (sweep.json or jobs.json: a `what`), None when there is none yet; UsageError
    naming the file when it is unreadable or not an object."""
    if not os.path.exists(path):
        return None
    try:
        return read_json(path, what, UsageError)
    except UsageError as exc:
        raise UsageError(f"{exc}; move it away or use another --name") from None


def read_existing(folder: str) -> Optional[dict]:
    """The sweep.json of the sweep folder `folder` (None when there is none yet); UsageError naming the file
    when it is unreadable, or naming the folder when that is a file."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{folder}: exists and is not a folder; choose another --root or --name")
    return _read(paths.sweep_file(folder), "sweep record")


def _stored_cells(stored: Optional[dict]) -> List[dict]:
    return [c for c in (stored or {}).get("cells", []) if isinstance(c, dict) and isinstance(c.get("name"), str)]


def _stored_grid(stored: Optional[dict]) -> grids.Grid:
    grid = (stored or {}).get("grid")
    return {k: list(v) for k, v in grid.items()} if isinstance(grid, dict) else {}


def align(grid: grids.Grid, stored: Optional[dict]) -> grids.Grid:
    """`grid` with its keys in sweep.json's order when both have the same keys (cell names follow the key
    order, so an extended sweep keeps its cells' names); otherwise unchanged (check_existing refuses it)."""
    order = list(_stored_grid(stored))
    return {key: grid[key] for key in order} if set(order) == set(grid) else grid


def known_values(stored: Optional[dict], grid: grids.Grid, runner_flags: List[str]) -> List[Dict[str, str]]:
    """The values of sweep.json's cells when `grid` and `runner_flags` may extend it (else []): plan.build
    refuses a new cell that repeats one of their experiments."""
    if stored is None or stored.get("runner_flags") != list(runner_flags) or list(_stored_grid(stored)) != list(grid):
        return []
    return [dict(c["values"]) for c in _stored_cells(stored) if isinstance(c.get("values"), dict)]


def check_existing(sweep: Sweep) -> Optional[dict]:
    """The stored record of this sweep (None when new). UsageError naming sweep.json when the name is
    already used with other runner flags or other grid keys (other values are allowed: they extend the
    sweep), or when a cell of this grid would take the name of a stored cell with other values."""
    path = paths.sweep_file(sweep.folder)
    stored = read_existing(sweep.folder)
    if stored is None:
        return None
    if stored.get("runner_flags") != sweep.runner_flags:
        raise UsageError(f"{path}: sweep {sweep.name!r} was made with runner flags {stored.get('runner_flags')}, "
                         f"not {sweep.runner_flags}; {ALLOWED}: use another --name (sweeps never mix in one folder)")
    if list(_stored_grid(stored)) != list(sweep.grid):
        raise UsageError(f"{path}: sweep {sweep.name!r} was made with the grid keys {list(_stored_grid(stored))}, "
                         f"not {list(sweep.grid)}; {ALLOWED}: use another --name (sweeps never mix in one folder)")
    by_name = {c["name"]: c.get("values") for c in _stored_cells(stored)}
    for cell in sweep.cells:
        if cell.name in by_name and by_name[cell.name] != cell.values:
            raise UsageError(f"{path}: cell {cell.name} of sweep {sweep.name!r} was made with the values "
                             f"{by_name[cell.name]}, not {cell.values}; write the values as before or use another "
                             f"--name")
    return stored


def new_cells(sweep: Sweep, stored: Optional[dict]) -> List[str]:
    """This grid's cells that sweep.json does not list yet (all of them for a new sweep)."""
    known = {c["name"] for c in _stored_cells(stored)}
    return [cell.name for cell in sweep.cells if cell.name not in known]


def left_out(sweep: Sweep, stored: Optional[dict]) -> List[str]:
    """sweep.json's cells that this grid does not make (kept in sweep.json, not run by this command)."""
    given = {cell.name for cell in sweep.cells}
    return [c["name"] for c in _stored_cells(stored) if c["name"] not in given]


def merged(sweep: Sweep, executor: str, stored: Optional[dict]) -> dict:
    """sweep.json's content after this command: for a new sweep its own record; else the stored record
    with the union of the grid values (stored first, then new ones in the order given), the stored cells
    (kept as written) plus this grid's new ones, ordered as the union grid's cartesian product, and
    `executor`."""
    record = sweep.record(executor)
    if stored is None:
        return record
    grid = _stored_grid(stored)
    for key, values in sweep.grid.items():
        grid[key] = grid.get(key, []) + [v for v in values if v not in grid.get(key, [])]
    order = {combo: index for index, combo in enumerate(itertools.product(*grid.values()))}

    def position(cell: dict) -> int:
        values = cell.get("values") if isinstance(cell.get("values"), dict) else {}
        return order.get(tuple(values.get(k) for k in grid), len(order))  # a hand-edited cell goes last
    known = {c["name"] for c in _stored_cells(stored)}
    cells = _stored_cells(stored) + [c for c in record["cells"] if c["name"] not in known]
    return dict(stored, grid=grid, executor=executor, cells=sorted(cells, key=position))


def write(sweep: Sweep, executor: str, stored: Optional[dict]) -> None:
    """Write sweep.json (`merged`), atomically; left untouched when nothing in it changes."""
    from utils.checkpoint import atomic_write_json
    record = merged(sweep, executor, stored)
    if record == stored:
        return
    os.makedirs(sweep.folder, exist_ok=True)
    atomic_write_json(paths.sweep_file(sweep.folder), record, indent=2)


def add_jobs(folder: str, executor: str, log_folder: str, jobs: List[dict]) -> None:
    """Append one submission ({"executor", "submitted", "log_folder", "jobs": [{"cell", "job_id"}]}) to
    jobs.json; earlier submissions are kept (a requeued or re-submitted cell keeps its history)."""
    from utils.checkpoint import atomic_write_json
    path = paths.jobs_file(folder)
    record = _read(path, "job record") or {"submissions": []}
    record.setdefault("submissions", []).append({
        "executor": executor, "submitted": datetime.datetime.now().isoformat(timespec="seconds"),
        "log_folder": log_folder, "jobs": jobs})
    atomic_write_json(path, record, indent=2)


def latest_jobs(folder: str) -> Dict[str, str]:
    """{cell name: job id of its latest submission} from jobs.json ({} when there is none)."""
    latest: Dict[str, str] = {}
    for submission in (_read(paths.jobs_file(folder), "job record") or {}).get("submissions", []):
        for job in submission.get("jobs", []):
            latest[job["cell"]] = str(job["job_id"])
    return latest
