"""A sweep's cells, validated with the runner's own parser before anything is launched or written.

Every cell's full command is parsed by `utils.cli.parse_config` (the parser and checks the runner itself
applies), so a bad grid key or value is refused with one line naming the --grid, and no cell can fail
later on a flag the sweep could have checked. Two cells whose parsed configs are one experiment (e.g.
rate=0.2,0.20) are refused too.
"""
import argparse
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from sweeps import grid as grids
from utils.errors import UsageError

SET_BY_SWEEP = ("save_dir", "resume")  # every cell gets --save_dir <sweep>/<cell> --resume
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class Cell:
    """One grid point: `values` {grid key: value as given}; `command` the runner command (sweep.json's);
    `run_dir` its --save_dir; `pruning_times` the rounds the runner must finish (0 .. pruning_times-1)."""
    name: str
    values: Dict[str, str]
    command: List[str]
    run_dir: str
    pruning_times: int


@dataclass(frozen=True)
class Sweep:
    """A named grid under `folder` (= <root>/<name>), its runner flags and cells in grid order."""
    name: str
    folder: str
    grid: grids.Grid
    runner_flags: List[str]
    cells: List[Cell]

    def log_file(self, cell: Cell) -> str:
        """Where a cell's runner output goes (appended on every launch: nothing earlier is lost)."""
        return os.path.join(self.folder, "logs", f"{cell.name}.log")

    def record(self, executor: str) -> dict:
        """sweep.json's content (a contract read by report_runs.py: keep the keys)."""
        return {"name": self.name, "grid": {k: list(v) for k, v in self.grid.items()},
                "runner_flags": list(self.runner_flags), "executor": executor,
                "cells": [{"name": c.name, "values": dict(c.values), "run_dir": c.name, "command": list(c.command)}
                          for c in self.cells]}


def check_name(name: str) -> None:
    if not _NAME.match(name) or name in (".", ".."):
        raise UsageError(f"--name {name!r}: use letters, digits and . _ + - (it names a folder under --root)")


def sweep_folder(root: str, name: str) -> str:
    """<root>/<name>: where a sweep's sweep.json, logs and cells live."""
    return os.path.join(os.path.normpath(root), name)


def default_name(grid: grids.Grid) -> str:
    """`sweep-criteria-rate-seed`: the grid's keys, so two sweeps over other keys do not collide."""
    return "-".join(["sweep", *grid])


def _runner_options() -> Dict[str, argparse.Action]:
    from utils.cli import build_parser
    return {option[2:]: action for action in build_parser()._actions
            for option in action.option_strings if option.startswith("--")}


def _check_keys(grid: grids.Grid, runner_flags: Sequence[str], options: Dict[str, argparse.Action]) -> List[str]:
    """UsageError for a grid key that is no runner flag, is set by the sweep, repeats another key's flag or is
    also in the runner flags; returns the boolean (store_true) keys."""
    from utils.cli import given_flags
    for flag in SET_BY_SWEEP:
        if f"--{flag}" in runner_flags:
            raise UsageError(f"runner flags: --{flag} is set by sweep.py for every cell "
                             f"(--save_dir <root>/<name>/<cell> --resume); drop it")
    try:
        given = given_flags(list(runner_flags))
    except UsageError as exc:
        raise UsageError(f"runner flags: {exc}") from None
    booleans, dests = [], {}
    for key in grid:
        action = options.get(key)
        if action is None or isinstance(action, argparse._HelpAction):
            close = difflib.get_close_matches(key, list(options), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"{grids.grid_text(key, grid)}: --{key} is not a flag of {grids.RUNNER}{hint}")
        if action.dest in SET_BY_SWEEP:
            raise UsageError(f"{grids.grid_text(key, grid)}: --{key} is set by sweep.py for every cell")
        if action.dest in dests:
            raise UsageError(f"{grids.grid_text(key, grid)}: the same flag as --grid {dests[action.dest]}")
        if action.dest in given:
            raise UsageError(f"{grids.grid_text(key, grid)}: --{key} is also in the runner flags; give it in "
                             f"one place")
        dests[action.dest] = key
        if isinstance(action, argparse._StoreTrueAction):
            booleans.append(key)
            for value in grid[key]:
                grids.value_flags({key: value}, booleans)  # true / false only
    return booleans


def _blame(message: str, values: Dict[str, str], grid: grids.Grid, name: str) -> str:
    """Name the --grid whose flag the runner's message mentions, else the runner flags."""
    if message.startswith("--grid "):
        return message
    for key in values:
        if re.search(rf"--{re.escape(key)}\b", message):
            return f"{grids.grid_text(key, grid)} (cell {name}): {message}"
    return f"runner flags (cell {name}): {message}"


def _experiment(config):
    """The experiment a RunConfig describes: the config less where it is written (save_dir) and its label
    (exp_name), so two cells that differ only there run the same experiment."""
    return dataclasses.replace(config, save_dir=None, exp_name="")


def _same_experiment(grid: grids.Grid, first: Dict[str, str], second: Dict[str, str], where: str) -> UsageError:
    """The one-line refusal of two cells (`first` made earlier) whose runner configs are equal."""
    keys = [key for key in second if first.get(key) != second[key]] or list(second)
    shown = lambda values: ", ".join(f"{k}={values.get(k)}" for k in keys)  # noqa: E731
    return UsageError(f"{grids.grid_text(keys[0], grid)}: {shown(second)} gives the same runner config as "
                      f"{shown(first)} (cell {grids.cell_name(first)}{where}), so one experiment would run twice; "
                      f"drop one of the values")


def _known_experiments(known: Sequence[Dict[str, str]], points: Sequence[Dict[str, str]],
                       runner_flags: Sequence[str], booleans: Sequence[str]) -> List[Tuple[object, Dict[str, str]]]:
    """(experiment, values) of the cells of an earlier grid (sweep.json) that this grid does not repeat; a cell
    the runner's parser now refuses is left out (it cannot equal a valid one)."""
    from utils.cli import parse_config
    found = []
    for values in known:
        if values in points:
            continue
        try:
            command = grids.cell_command(runner_flags, values, "-", booleans)
            found.append((_experiment(parse_config(command[2:])), dict(values)))
        except UsageError:
            continue
    return found


def build(grid: grids.Grid, runner_flags: Sequence[str], root: str, name: str,
          known: Sequence[Dict[str, str]] = ()) -> Sweep:
    """Validate and expand a sweep; UsageError (one line naming the --grid, --name or runner flags) before
    anything is launched or written. Two cells whose parsed runner configs are equal but for save_dir and
    exp_name (e.g. rate=0.2,0.20) are refused, also against `known`: the values of cells an earlier grid
    of this sweep made (sweep.json), when this grid extends it."""
    from utils.cli import parse_config
    check_name(name)
    booleans = _check_keys(grid, runner_flags, _runner_options())
    points = grids.expand(grid)
    grids.check_unique_names(points)
    folder = sweep_folder(root, name)
    seen = {experiment: (values, " of sweep.json")
            for experiment, values in _known_experiments(known, points, runner_flags, booleans)}
    cells = []
    for values in points:
        cell_name = grids.cell_name(values)
        run_dir = os.path.join(folder, cell_name)
        try:
            command = grids.cell_command(runner_flags, values, run_dir, booleans)
            config = parse_config(command[2:])
        except UsageError as exc:
            raise UsageError(_blame(str(exc), values, grid, cell_name)) from None
        experiment = _experiment(config)
        if experiment in seen:
            first, where = seen[experiment]
            raise _same_experiment(grid, first, values, where)
        seen[experiment] = (values, "")
        cells.append(Cell(cell_name, values, command, run_dir, config.pruning_times))
    return Sweep(name, folder, grid, list(runner_flags), cells)
