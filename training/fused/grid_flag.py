"""`main_imp_fillback.py <flags> --fused_grid seed=1,2,3 [--fused_grid rate=0.2,0.3]`: a grid of runs, fused here.

The `--fused_grid` texts are sweep.py's `--grid` texts (sweeps/grid.py parses them) and the cells are its cells:
the cartesian product in the order the flags were given, each cell validated by the runner's own parser
(sweeps/plan.py) and given its own run dir `<parent>/<cell name>` (sweeps/grid.py `cell_name`), where the parent
is `--save_dir` or, without it, the runner's default run dir. Cells may differ in anything fused training keeps
per cell; a grid key that would make cells differ in a shared field (training/fused/cells.py SHARED_FIELDS:
--arch, --batch_size, ...) is refused. Every refusal is one line naming the flag, exit 2, before anything is
written. Then the cells train in THIS process through the LockstepDriver (training/fused/runner.py), the
code path of `python -m training.fused.run`. `--resume` goes to every cell; with it, a finished cell is skipped.
Exit code: 0 when every cell succeeded, else the highest cell code; one summary line per cell (docs/fused.md).
"""
import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from sweeps import cells as cellstates, grid as grids, plan
from utils import paths
from utils.config import RunConfig
from utils.errors import UsageError, os_error_line, run_cli_code

FLAG = "--fused_grid"
NOT_CELL_VALUES = ("save_dir", "resume")  # the grid's parent folder; applies to every cell


@dataclass(frozen=True)
class FusedCell:
    """One grid point: its sweeps/grid.py `name`, runner flags `argv` (with --save_dir <run_dir>), and state."""
    name: str
    argv: List[str]
    run_dir: str
    state: cellstates.CellState


def wants_fused_grid(argv: Sequence[str]) -> bool:
    """Whether a runner command line holds `--fused_grid` (as `--fused_grid X` or `--fused_grid=X`)."""
    return any(arg == FLAG or arg.startswith(FLAG + "=") for arg in argv)


def pull_flag(argv: Sequence[str], flag: str, takes_value: bool = True) -> Tuple[List[str], List[str]]:
    """(the values of `flag` in `argv` in order, `argv` without it): `--flag V` or `--flag=V`; an on/off flag
    gives "" per occurrence. UsageError naming the flag when its value is missing (the next word a flag), as
    argparse says."""
    found: List[str] = []
    rest: List[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if takes_value and arg.startswith(flag + "="):
            found.append(arg[len(flag) + 1:])
        elif arg == flag:
            if takes_value:
                if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                    raise UsageError(f"{flag}: expected a value")
                index += 1
                found.append(argv[index])
            else:
                found.append("")
        else:
            rest.append(arg)
        index += 1
    return found, rest


def _renamed(exc: UsageError) -> UsageError:
    """sweeps/'s message, naming --fused_grid where it says --grid."""
    return UsageError(re.sub(r"--grid\b", FLAG, str(exc)))


def _build(grid: grids.Grid, flags: List[str], parent: str) -> plan.Sweep:
    """sweeps/plan.py's validated cells under `parent` (UsageError naming --fused_grid, --save_dir or the flag)."""
    folder = os.path.normpath(parent)
    try:
        plan.check_name(os.path.basename(folder))
    except UsageError:
        raise UsageError(f"--save_dir {parent}: with {FLAG} it is the cells' parent folder; its name may use "
                         f"letters, digits and . _ + - only") from None
    try:
        return plan.build(grid, flags, os.path.dirname(folder) or os.curdir, os.path.basename(folder))
    except UsageError as exc:
        raise _renamed(exc) from None


def _default_parent(grid: grids.Grid, flags: List[str]) -> str:
    """The runner's default run dir of these flags (<dataset>_<struct>_output[_<exp_name>]). No grid key can
    change it: dataset and struct are shared fields, and cells differing only in exp_name are one experiment."""
    from utils.cli import parse_config
    probe = _build(grid, flags, "fused-grid")  # validation only: writes nothing
    config = parse_config(probe.cells[0].command[2:])
    return paths.run_dir(dataclasses.replace(config, save_dir=None))


def shared_refusal(key: str, values: Sequence[str], difference: str) -> UsageError:
    """The one line refusing grid key `key` whose values make cells differ in a shared field (`difference`,
    e.g. "--batch_size 32 vs 64")."""
    return UsageError(f"{FLAG} {key}={','.join(values)}: cells would differ in {difference}, which fused cells "
                      f"share (training/fused/cells.py SHARED_FIELDS); run such a grid with sweep.py --executor "
                      f"fused, which groups the cells")


def check_shared_keys(grid: grids.Grid) -> None:
    """UsageError for a grid key that IS a field fused cells share, given two values: before the sweep checks
    (which would first object to, e.g., the same flag also given to the runner), so the real reason comes first."""
    from training.fused.cells import SHARED_FIELDS
    for key, values in grid.items():
        if key in SHARED_FIELDS and len(set(values)) > 1:
            raise shared_refusal(key, values, f"--{key} {values[0]} vs {values[1]}")


def check_shared(sweep: plan.Sweep, configs: Sequence[RunConfig]) -> None:
    """UsageError naming the --fused_grid whose values make cells differ in a field fused cells share.
    In a cartesian product, the cell with one key changed from the first cell exists for every value."""
    from training.fused.cells import differences
    by_values = {tuple(cell.values.items()): config for cell, config in zip(sweep.cells, configs)}
    first = sweep.cells[0].values
    for key, values in sweep.grid.items():
        for value in values:
            other = by_values[tuple({**first, key: value}.items())]
            changed = differences(configs[0], other)
            if changed:
                raise shared_refusal(key, values, changed[0])


@dataclass(frozen=True)
class FusedGrid:
    """The checked grid: `parent` folder of the cells' run dirs, `cells` in grid order, `resume` given."""
    parent: str
    cells: List[FusedCell]
    resume: bool


def plan_cells(argv: Sequence[str]) -> FusedGrid:
    """The grid of a runner command line with --fused_grid, everything checked before anything is written;
    UsageError (one line naming the flag or cell) otherwise."""
    from training.fused.cells import route_problem, unfusable
    from training.start import check_run_dir
    from utils.cli import parse_config
    texts, flags = pull_flag(list(argv), FLAG)
    save_dirs, flags = pull_flag(flags, "--save_dir")
    resumes, flags = pull_flag(flags, "--resume", takes_value=False)
    try:
        grid = grids.parse_grid(texts)
    except UsageError as exc:
        raise _renamed(exc) from None
    for key in NOT_CELL_VALUES:
        if key in grid:
            raise UsageError(f"{FLAG} {key}={','.join(grid[key])}: --{key} is not a cell value (--save_dir is "
                             f"the cells' parent folder, --resume applies to every cell)")
    check_shared_keys(grid)
    if save_dirs:
        paths.check_text_flags({"save_dir": save_dirs[-1]})
    parent = save_dirs[-1] if save_dirs else _default_parent(grid, flags)
    sweep = _build(grid, flags, parent)
    # sweeps/grid.py's cell command ends in `--save_dir <run dir> --resume`; --resume only when given here
    argvs = [cell.command[2:-1] + (["--resume"] if resumes else []) for cell in sweep.cells]
    configs = [parse_config(cell_argv) for cell_argv in argvs]
    check_shared(sweep, configs)
    cells = []
    for cell, cell_argv, config in zip(sweep.cells, argvs, configs):
        why = unfusable(config) or route_problem(config)  # --struct lowrank / merge / token; a route
        if why:
            raise UsageError(f"{FLAG} (cell {cell.name}): {why}")
        state = cellstates.cell_state(cell.run_dir, cell.pruning_times)
        if state.state == cellstates.LOCKED:
            raise UsageError(f"cell {cell.name}: {cell.run_dir} is {state.note}")
        if not (resumes and state.state == cellstates.FINISHED):
            check_run_dir(config, cell.run_dir)  # checkpoints there without --resume: refused
        cells.append(FusedCell(cell.name, cell_argv, cell.run_dir, state))
    return FusedGrid(parent, cells, bool(resumes))


def run_grid(grid: FusedGrid) -> int:
    """Train the cells (but those finished, with --resume) in one LockstepDriver; a summary line per cell;
    returns the exit code."""
    from training.fused.runner import LockstepDriver
    todo = [cell for cell in grid.cells if not (grid.resume and cell.state.state == cellstates.FINISHED)]
    print(f"{FLAG}: {len(grid.cells)} cells under {grid.parent}, {len(todo)} to train fused in this process",
          flush=True)
    driver = LockstepDriver([c.argv for c in todo], [c.name for c in todo])
    codes = driver.run() if todo else []
    by_name = dict(zip((c.name for c in todo), codes))
    for cell in grid.cells:
        if cell.name in by_name:
            print(f"cell {cell.name}: exit code {by_name[cell.name]}; run dir {cell.run_dir}", flush=True)
        else:
            print(f"cell {cell.name}: finished earlier ({len(cell.state.rounds)} rounds), skipped; "
                  f"run dir {cell.run_dir}", flush=True)
    return driver.exit_code(codes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The runner's entry when `--fused_grid` is given: 0 every cell done, 2 bad input (nothing written), else
    the highest cell code."""
    return run_cli_code(lambda: run_grid(plan_cells(sys.argv[1:] if argv is None else argv)),
                        expected=[(OSError, os_error_line())])
