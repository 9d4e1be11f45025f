"""sweep.py's command line: grid -> validated cells -> sweep.json -> skip / resume / launch -> table.

    python sweep.py --grid criteria=remain,magnitude,l1 --grid rate=0.2,0.3 --grid seed=1,2 \\
        [--name NAME] [--root runs] [--executor local|fused|slurm|submitit_local] [--parallel N] [--fuse N] \\
        [--dry_run] -- <runner flags>

Exit codes: 0 every cell finished (or, for slurm / submitit_local without --wait, every job submitted),
1 some cell did not finish, 2 bad input (one line naming the flag; nothing launched or written),
130 interrupted while submitting.
"""
import shlex
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from sweeps import cells as cellstates, grid as grids, plan, record, summary
from sweeps import fused, local, slurm  # noqa: F401  (register the executors)
from sweeps.executors import EXECUTORS
from utils.errors import UsageError, os_error_line, run_cli_code

LAUNCHED = (cellstates.NEW, cellstates.INTERRUPTED)


def build_parser():
    from utils.cli import OneLineParser
    parser = OneLineParser(prog="sweep.py", usage="python sweep.py --grid KEY=V1,V2 [--grid ...] [options] "
                           "-- <main_imp_fillback.py flags>",
                           description="Run a grid of main_imp_fillback.py experiments: finished cells are "
                           "skipped, interrupted ones resumed (docs/sweep.md).")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a runner flag and its values (repeat for a cartesian product; on/off flags: "
                        "true,false; a value with commas: write it with spaces)")
    parser.add_argument("--name", default=None, help="the sweep's folder under --root (default sweep-<grid keys>)")
    parser.add_argument("--root", default="runs", help="where sweeps live (default ./runs)")
    parser.add_argument("--executor", default="local", help=f"one of {', '.join(EXECUTORS.names())} (default local)")
    parser.add_argument("--dry_run", action="store_true", help="print the cells, their state and commands; "
                        "write and launch nothing")
    for name in EXECUTORS.names():
        EXECUTORS[name].add_arguments(parser)
    return parser


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(sweep flags, runner flags): the runner's come after the first `--`."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def report_changes(sweep: plan.Sweep, stored: Optional[dict]) -> None:
    """One line each when this grid extends sweep.json (new cells) or leaves some of its cells out."""
    if stored is None:
        return
    added, dropped = record.new_cells(sweep, stored), record.left_out(sweep, stored)
    if added:
        print(f"sweep {sweep.name}: this grid adds {summary.plural(len(added), 'new cell')} to sweep.json "
              f"(its grid values become the union)", flush=True)
    if dropped:
        shown = ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        print(f"sweep {sweep.name}: {summary.plural(len(dropped), 'cell')} of sweep.json not in this grid "
              f"({shown}): kept in sweep.json, not run now", flush=True)


def sweep_main(argv: Sequence[str]) -> int:
    own, runner_flags = split_argv(argv)
    options = build_parser().parse_args(own)
    executor = EXECUTORS[options.executor](options)
    if not options.grid:
        raise UsageError("--grid: give at least one, e.g. --grid rate=0.2,0.3")
    grid = grids.parse_grid(options.grid)
    name = options.name or plan.default_name(grid)
    plan.check_name(name)
    stored = record.read_existing(plan.sweep_folder(options.root, name))
    grid = record.align(grid, stored)  # an extended sweep keeps its key order, hence its cell names
    sweep = plan.build(grid, runner_flags, options.root, name, known=record.known_values(stored, grid, runner_flags))
    stored = record.check_existing(sweep)
    before = {cell.name: cellstates.cell_state(cell.run_dir, cell.pruning_times) for cell in sweep.cells}
    print(f"sweep {sweep.name}: {summary.plural(len(sweep.cells), 'cell')} ({summary.counts(before)}) in "
          f"{sweep.folder}", flush=True)
    report_changes(sweep, stored)
    if options.dry_run:
        for cell in sweep.cells:
            print(f"{cell.name} [{before[cell.name].state}]: {shlex.join(cell.command)}")
        return 0
    for cell in sweep.cells:
        state = before[cell.name]
        if state.state == cellstates.FINISHED:
            print(f"skip {cell.name}: finished ({summary.rounds_text(state.rounds, cell.pruning_times)} rounds)")
        elif state.state == cellstates.LOCKED:
            print(f"skip {cell.name}: {state.note}")
    record.write(sweep, options.executor, stored)
    todo = [cell for cell in sweep.cells if before[cell.name].state in LAUNCHED]
    results: Dict[str, object] = executor.launch(sweep, todo, {c.name: before[c.name].state for c in todo}) \
        if todo else {}
    after = {cell.name: cellstates.cell_state(cell.run_dir, cell.pruning_times) for cell in sweep.cells}
    rows = [summary.row(cell, before[cell.name], results.get(cell.name), after[cell.name]) for cell in sweep.cells]
    print(summary.table(rows), flush=True)
    if todo and not getattr(executor, "waits", True):
        submitted = sum(1 for v in results.values() if isinstance(v, str) and v.startswith("job "))
        print(f"{summary.plural(submitted, 'job')} submitted (jobs.json lists them); the same command again shows "
              f"the table and submits only cells neither finished nor queued")
        return 0
    unfinished = [name for name, state in after.items() if state.state != cellstates.FINISHED]
    print(f"sweep {sweep.name}: {summary.counts(after)}", flush=True)
    return 1 if unfinished else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli_code(lambda: sweep_main(sys.argv[1:] if argv is None else argv),
                        expected=[(OSError, os_error_line()), (KeyboardInterrupt, lambda exc: ("interrupted", 130))])
