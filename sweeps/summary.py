"""The end-of-sweep table: one row per cell, from its state before, its launch result and its lineage.json."""
from typing import Dict, List

from sweeps.cells import CellState
from sweeps.plan import Cell

HEADER = ("cell", "before", "exit", "rounds", "best round", "best val", "test")


def plural(count: int, noun: str) -> str:
    """`1 cell`, `2 cells`, `0 cells`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _number(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def rounds_text(rounds: List[int], pruning_times: int) -> str:
    """`done/planned` for a cell's finished round numbers: planned are the rounds from its first recorded one
    (0, or a branch's parent round + 1) to pruning_times - 1, as sweeps.cells counts a cell finished; rounds
    past the plan (a run dir trained further by hand) show as `+N`. `[0, 1, 2]` of 2 -> `2/2 +1`."""
    first = rounds[0] if rounds else 0
    done = sum(1 for r in rounds if r < pruning_times)
    extra = len(rounds) - done
    return f"{done}/{max(pruning_times - first, 0)}" + (f" +{extra}" if extra else "")


def row(cell: Cell, before: CellState, result, after: CellState) -> tuple:
    """`result`: an exit code, a text (a job id, a failure), None (never started) or 'skipped' for a cell
    that was not launched; best = the round with the best val top-1, its test top-1 beside it."""
    if before.state in ("finished", "locked"):
        shown = "skipped"
    else:
        shown = "not started" if result is None else str(result)
    best = after.best or {}
    return (cell.name, before.state, shown, rounds_text(after.rounds, cell.pruning_times),
            str(best.get("round", "-")), _number(best.get("val_top1")), _number(best.get("test_top1")))


def table(rows: List[tuple]) -> str:
    """Plain aligned columns (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(r[i])) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = []
    for r in [HEADER, *rows]:
        cells = [str(v).ljust(widths[0]) if i == 0 else str(v).rjust(widths[i]) for i, v in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def counts(states: Dict[str, CellState]) -> str:
    """`2 finished, 1 interrupted, 1 new` (states in a fixed order, zeros left out)."""
    order = ("finished", "interrupted", "new", "locked")
    tally = {s: sum(1 for st in states.values() if st.state == s) for s in order}
    return ", ".join(f"{n} {s}" for s, n in tally.items() if n) or "no cells"
