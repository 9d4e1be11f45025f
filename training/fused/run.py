"""The fused group's process: `python -m training.fused.run --cells CELLS.json [--results RESULTS.json]`.

CELLS.json: {"cells": [[<main_imp_fillback.py flags>], ...]}, one flag list per run (sweep.py's fused
executor writes it). Every run is validated with the runner's own parser before any work starts; a bad
one, a run fused training cannot take (training/fused/cells.py `unfusable`) or two runs in one run dir
are refused with one line naming the cell (exit 2, nothing written). Then the runs train together
(training/fused/runner.py). One line per cell at the end: `cell <run dir>: exit code N`; RESULTS.json
(written atomically) maps each run dir to its exit code. Exit code: 0 when every cell finished, 128 +
signal when a signal stopped them, else the highest cell code (LockstepDriver.exit_code).
"""
import os
import sys
from typing import List, Optional, Sequence

from utils import paths
from utils.checkpoint import atomic_write_json
from utils.cli import OneLineParser
from utils.errors import UsageError, os_error_line, run_cli_code
from utils.jsonfile import read_json


def read_cells(path: str) -> List[List[str]]:
    """The flag lists of CELLS.json; UsageError naming --cells for a missing or malformed file."""
    try:
        cells = read_json(path, 'fused cells file ({"cells": [[flags...], ...]})', UsageError).get("cells")
    except UsageError as exc:
        raise UsageError(f"--cells {exc}") from None
    if not isinstance(cells, list) or not cells or not all(
            isinstance(c, list) and all(isinstance(a, str) for a in c) for c in cells):
        raise UsageError(f"--cells {path}: \"cells\" must be a non-empty list of flag lists (strings)")
    return cells


def check_cells(cells: Sequence[Sequence[str]]) -> List[str]:
    """Each cell's run dir, after the runner's parser accepted its flags; UsageError naming the cell if not."""
    from training.fused.cells import route_problem, unfusable
    from utils.cli import parse_config
    directories: List[str] = []
    for index, argv in enumerate(cells):
        try:
            config = parse_config(list(argv))
        except UsageError as exc:
            raise UsageError(f"cell {index}: {exc}") from None
        directory = os.path.abspath(paths.run_dir(config))
        why = unfusable(config) or route_problem(config)
        if why:
            raise UsageError(f"cell {index} ({directory}): {why}")
        if directory in directories:
            raise UsageError(f"cell {index}: the same run dir as cell {directories.index(directory)} ({directory})")
        directories.append(directory)
    return directories


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(prog="python -m training.fused.run",
                                     description="Train several main_imp_fillback.py runs as one fused model.")
    parser.add_argument("--cells", required=True, help="JSON file: {\"cells\": [[runner flags], ...]}")
    parser.add_argument("--results", default=None, help="JSON file to write {run dir: exit code} to")
    def work() -> int:
        from training.fused.runner import LockstepDriver
        options = parser.parse_args(argv)
        cells = read_cells(options.cells)
        directories = check_cells(cells)
        driver = LockstepDriver(cells, [os.path.basename(d) for d in directories])
        codes = driver.run()
        for directory, code in zip(directories, codes):
            print(f"cell {directory}: exit code {code}", flush=True)
        if options.results:
            atomic_write_json(options.results, dict(zip(directories, codes)), indent=1)
        return driver.exit_code(codes)

    return run_cli_code(work, expected=[(OSError, os_error_line())])


if __name__ == "__main__":
    sys.exit(main())
