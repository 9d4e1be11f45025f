"""The executor registry and what every executor shares: a cell's argv, environment and log file.

An executor is a class registered under its `--executor` name with
    add_arguments(parser)          its own flags (class method; may add none)
    __init__(options)              the parsed flags; raise UsageError for a bad one (nothing launched yet)
    launch(sweep, todo, states)    run or submit the cells `todo` (`states`: cell name -> state before);
                                   returns {cell name: exit code (int), None (never started), or a text:
                                   a job id (submitted, not waited for) or a failure}
    waits                          False when launch returns before the cells finish (then the sweep
                                   exits 0 once everything is submitted)
Adding one is one new module and one import in sweeps/cli.py (local.py, fused.py: several cells in one
process, slurm.py).
"""
import datetime
import os
import shlex
import socket
import sys
from typing import IO, List

from sweeps.plan import Cell, Sweep
from utils.registry import Registry

EXECUTORS: Registry = Registry("executor", "--executor")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runner_argv(cell: Cell) -> List[str]:
    """The command to launch: this Python and the runner file of this checkout, then the cell's flags
    (sweep.json keeps the portable `python main_imp_fillback.py ...` form)."""
    return [sys.executable, os.path.join(REPO, cell.command[1]), *cell.command[2:]]


def child_env(extra: dict) -> dict:
    """The environment of a runner child: ours, unbuffered output (logs stream), plus `extra`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def write_log_header(log: IO[bytes], what: str) -> None:
    """A cell log's start line: `=== <time> <host> <what>` (each start or requeue of the cell adds one)."""
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    log.write(f"=== {stamp} {socket.gethostname()} {what}\n".encode())
    log.flush()


def open_log(sweep: Sweep, cell: Cell, how: str) -> IO[bytes]:
    """The cell's log file, opened for appending, after a header line saying when, where and how it starts."""
    path = sweep.log_file(cell)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log = open(path, "ab")
    write_log_header(log, f"sweep {sweep.name}, {how}: {shlex.join(cell.command)}")
    return log
