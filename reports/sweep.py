"""Sweep folders written by sweep.py: their sweep.json read back, one summary table per sweep.

sweep.json (the contract with sweeps/): {"name", "grid": {key: [values]}, "runner_flags", "executor",
"cells": [{"name", "values": {key: str}, "run_dir": path relative to the sweep folder, "command"}]}.
A table has one row per combination of the grid keys other than the seed (e.g. criteria x rate), in
the order of the cells; its seeds are aggregated (reports.series.stat), and columns are rounds.
"""
import os
from dataclasses import dataclass

from reports.runs import is_run_dir
from reports.series import make_series
from reports.tables import pivot_table
from utils import paths
from utils.errors import UsageError
from utils.jsonfile import read_json


@dataclass
class Sweep:
    folder: str
    name: str
    keys: list                          # the grid keys, in grid order
    cells: list                         # (values {key: str}, absolute run dir)


def is_seed_key(key: str) -> bool:
    return key.lstrip("-") == "seed"


def read_sweep(folder: str) -> Sweep:
    """The sweep recorded in `folder`/sweep.json. Raises UsageError naming the file when it is unreadable
    or lacks the keys report needs (grid: an object; cells: a list of {values: object, run_dir: str})."""
    path = paths.sweep_file(folder)
    record = read_json(path, "sweep record", UsageError)
    grid, cells = record.get("grid"), record.get("cells")
    valid = (isinstance(grid, dict) and isinstance(cells, list) and
             all(isinstance(c, dict) and isinstance(c.get("values"), dict) and isinstance(c.get("run_dir"), str)
                 for c in cells))
    if not valid:
        raise UsageError(f"{path}: not a sweep.json sweep.py wrote (needs a 'grid' object and 'cells' with values "
                         f"and run_dir)")
    return Sweep(os.path.abspath(folder), str(record.get("name") or os.path.basename(os.path.abspath(folder))),
                 list(grid), [(c["values"], os.path.abspath(os.path.join(folder, c["run_dir"]))) for c in cells])


def sweeps_under(inputs: list) -> list:
    """Every sweep folder given or below the given folders (run dirs themselves are not searched)."""
    found = []
    for given in inputs:
        for here, subdirs, _ in os.walk(given):
            if os.path.isfile(paths.sweep_file(here)):
                found.append(here)
            if is_run_dir(here):
                subdirs.clear()
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    unique = {os.path.realpath(folder): folder for folder in found}
    return [read_sweep(folder) for folder in sorted(unique.values())]


def sweep_table(sweep: Sweep, runs: list, spread: str = "std") -> str:
    """Rows: the grid's non-seed combinations; `seeds` says how many of a row's cells have finished rounds
    (e.g. 2/3 while one seed is still in round 0); columns: rounds, then the best-validation round."""
    settings = [key for key in sweep.keys if not is_seed_key(key)]
    by_dir = {os.path.realpath(run.directory): run for run in runs}
    rows = {}
    for values, directory in sweep.cells:
        rows.setdefault(tuple(str(values.get(key, "-")) for key in settings), []).append(
            by_dir.get(os.path.realpath(directory)))
    table = []
    for combination, members in rows.items():
        done = [run for run in members if run is not None]
        label = " ".join(f"{k}={v}" for k, v in zip(settings, combination))
        series = make_series(label, done, spread) if done else None
        table.append((list(combination), f"{len(done)}/{len(members)}", series))
    return pivot_table(settings or ["cell"], table if settings else [(["all"], s, x) for _, s, x in table])
