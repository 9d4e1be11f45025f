"""The lineage tree: runs as nodes, each branch hung under the run whose numbered checkpoint it started from.

Works on any objects with the Run interface of reports/runs.py (names(), origin, label, rounds, best(),
size(), is_token, control, directory), found through the `parent` of a branch's first round in
lineage.json (or its config's resume_from).
"""
import os
from utils import paths

# lottery-ticket controls (Frankle & Carbin 2019, sec. 2-4): config "branch" -> how tables, trees and legends say it
CONTROL_KINDS = {"random_reinit": "random reinit", "random_prune": "random prune", "retrain": "retrain"}


def norm_path(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def branch_points(runs: list) -> dict:
    """{branch run: (parent run, parent round or None)} for branches whose parent is in the report."""
    by_name = {name: run for run in runs for name in run.names()}
    points = {}
    for run in runs:
        parent = by_name.get(norm_path(os.path.dirname(run.origin))) if run.origin else None
        if parent is not None and parent is not run:
            points[run] = (parent, paths.round_index_of(run.origin))
    return points


def compact_rounds(numbers: list) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    spans = []
    for n in sorted(set(numbers)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def branch_kind(run) -> str:
    """'branch', or the control kind ('random reinit', ...) of a lottery-ticket control."""
    return CONTROL_KINDS.get(run.control, "branch") if run.control else "branch"


def walk_tree(runs: list) -> list:
    """[(run, line prefix)] depth first: each branch right under the run it started from."""
    points = branch_points(runs)
    children = {run: sorted((kid for kid in runs if points.get(kid, (None,))[0] is run),  # by branch round
                            key=lambda kid: (points[kid][1] is None, points[kid][1] or 0, kid.control or "",
                                             kid.directory))
                for run in runs}
    order, seen = [], set()

    def walk(run, first: str, rest: str) -> None:
        if run in seen:
            return
        seen.add(run)
        order.append((run, first))
        for i, kid in enumerate(children[run]):
            last, at = i == len(children[run]) - 1, points[kid][1]
            where = f"round {at}" if at is not None else os.path.basename(kid.origin)
            walk(kid, f"{rest}{'└── ' if last else '├── '}{branch_kind(kid)} at {where}: ",
                 rest + ("    " if last else "│   "))

    for run in runs:
        if run not in points:
            walk(run, "", "")
    for run in runs:  # only a (corrupt) cycle of branches leaves runs unvisited
        walk(run, "", "")
    return order


def lineage_tree(runs: list) -> str:
    """Runs as nodes; a branch hangs under the run it started from, marked with its kind and the round."""
    points, lines = branch_points(runs), []
    for run, prefix in walk_tree(runs):
        best, first, last = run.best(), run.size(run.rounds[0]), run.size(run.rounds[-1])
        kept = first if len(run.rounds) == 1 else f"{first}->{last}"
        chosen = (f"best val {best.val_top1:.2f} (test {best.test_top1:.2f}) @ {run.size(best)}" if best
                  else "no validation split")
        # a branch under its parent needs no path; one whose parent is not in the report does
        foreign = (f"  [{branch_kind(run) if run.control else 'branched'} from {run.origin}, not in this report]"
                   if run.origin and run not in points else "")
        lines.append(f"{prefix}{run.label}  rounds {compact_rounds([r.round for r in run.rounds])}  "
                     f"{'tokens' if run.is_token else 'remaining'} {kept.replace(' tokens', '')}  {chosen}  "
                     f"({run.directory}){foreign}")
    return "\n".join(lines)
