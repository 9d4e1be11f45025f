"""`--executor fused`: compatible cells trained together, up to `--fuse N` in one process (docs/fused.md).

Cells whose runner configs share training/fused/cells.py's SHARED_FIELDS (arch, batch size, epochs, rounds,
struct, ...) form groups of at most N; each group is one `python -m training.fused.run` process that
trains its cells as one fused model, each cell in its own run dir exactly as a separate run would leave
it. A group of one, and a cell fused training cannot take (--struct lowrank / merge / token), runs as a
plain runner process. The processes are the local pool's (sweeps/local.py:
--parallel at a time, one GPU each, SIGTERM forwarded so every cell saves and `--resume` continues it).
A group's output goes to logs/<group>.log; each member's own log gets a line naming it.
"""
import json
import os
import sys
from typing import Dict, List, Optional

from sweeps.executors import EXECUTORS, REPO, open_log
from sweeps.local import LocalPool
from sweeps.plan import Cell, Sweep
from utils.checkpoint import atomic_write_json
from utils.errors import UsageError

DEFAULT_FUSE = 8


def group_name(members: List[Cell]) -> str:
    """`fused-<first cell>-and-<k>-more` (k = the group's other cells): its log and cells file name."""
    return f"fused-{members[0].name}-and-{len(members) - 1}-more"


@EXECUTORS.register("fused")
class FusedPool(LocalPool):
    waits = True

    @classmethod
    def add_arguments(cls, parser) -> None:
        group = parser.add_argument_group("fused executor")
        group.add_argument("--fuse", type=int, default=DEFAULT_FUSE,
                           help=f"most cells trained together in one process (default {DEFAULT_FUSE}); "
                           f"--parallel such processes at a time")

    def __init__(self, options):
        super().__init__(options)
        if options.fuse < 1:
            raise UsageError(f"--fuse {options.fuse}: must be at least 1")
        self.fuse = options.fuse
        self.groups: Dict[str, List[Cell]] = {}

    def plan_groups(self, todo: List[Cell]) -> List[List[Cell]]:
        """The cells in fused groups (a cell fused training cannot take: a group of its own)."""
        from training.fused.cells import group_cells, route_problem, unfusable
        from utils.cli import parse_config
        configs = [parse_config(cell.command[2:]) for cell in todo]  # sweeps/plan.py validated them
        for cell, config in zip(todo, configs):
            problem = route_problem(config)
            if problem:
                raise UsageError(f"cell {cell.name}: {problem}")
        alone = [i for i, config in enumerate(configs) if unfusable(config)]
        fusable = [i for i in range(len(todo)) if i not in alone]
        grouped = group_cells([configs[i] for i in fusable], self.fuse)
        return [[todo[fusable[k]] for k in group] for group in grouped] + [[todo[i]] for i in alone]

    def launch(self, sweep: Sweep, todo: List[Cell], states: Dict[str, str]) -> Dict[str, object]:
        jobs, job_states = [], {}
        for members in self.plan_groups(todo):
            if len(members) == 1:
                jobs.append(members[0])
                job_states[members[0].name] = states[members[0].name]
                continue
            name = group_name(members)
            folder = os.path.join(sweep.folder, "fused")
            os.makedirs(folder, exist_ok=True)
            cells_file, results_file = os.path.join(folder, f"{name}.json"), os.path.join(folder, f"{name}.results.json")
            atomic_write_json(cells_file, {"cells": [m.command[2:] for m in members]}, indent=1)
            if os.path.exists(results_file):
                os.remove(results_file)  # an earlier launch's: never read as this one's
            command = [sys.executable, "-m", "training.fused.run", "--cells", cells_file, "--results", results_file]
            self.groups[name] = members
            jobs.append(Cell(name, {}, command, sweep.folder, members[0].pruning_times))
            job_states[name] = "+".join(sorted({states[m.name] for m in members}))
        results = super().launch(sweep, jobs, job_states)
        return self.member_results(sweep, results)

    def member_results(self, sweep: Sweep, results: Dict[str, object]) -> Dict[str, object]:
        """{cell name: exit code}: a group's cells get their own codes from its results file (else the group's)."""
        out = {}
        for name, code in results.items():
            members = self.groups.get(name)
            if members is None:
                out[name] = code
                continue
            per_dir = self.read_results(os.path.join(sweep.folder, "fused", f"{name}.results.json"))
            for member in members:
                out[member.name] = per_dir.get(os.path.abspath(member.run_dir), code)
        return out

    @staticmethod
    def read_results(path: str) -> Dict[str, int]:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def start(self, sweep: Sweep, cell: Cell, slot: int, state: str):
        members: Optional[List[Cell]] = self.groups.get(cell.name)
        if members is None:
            return super().start(sweep, cell, slot, state)
        for member in members:
            open_log(sweep, member, f"fused group {cell.name}: log {sweep.log_file(cell)}").close()
        path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        return self.spawn(sweep, cell, slot, cell.command, "fused", state, details=f", {len(members)} cells",
                          listing=f"{', '.join(m.name for m in members)}; ", env={"PYTHONPATH": path})
