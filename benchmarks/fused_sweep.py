"""The end-to-end number of issue 15: a sweep's wall-clock training hours, fused vs one run at a time.

A sweep of C cells (3 criteria x 2 rates = 6), each R rounds of E epochs of I images, extrapolated from
the measured images/s (benchmarks/fused_speed.py). Training time only: evaluation, pruning and
checkpoints between epochs are left out (each well under 5 % of an epoch for res20s, see
benchmarks/results/epoch_speed_h100.json), so the real hours are somewhat longer for every plan alike.
"""
import math
from typing import Dict, List


def sweep_hours(one_img_s: float, group_img_s: Dict[int, float], cells: int, rounds: int,
                epochs_per_round: int, images_per_epoch: int) -> Dict[str, object]:
    """Hours to train `cells` cells one at a time (at `one_img_s` images/s) and in groups of up to N
    cells, for each N of `group_img_s` (N -> aggregate images/s of N cells trained together).

    Groups run one after another: ceil(cells / N) groups, each charged the time of a full N-cell group
    (rounds * epochs * images per cell at group_img_s[N] / N images/s per cell), an upper bound when
    the last group is smaller. Returns {"one_at_a_time_hours", "grouped_hours": {N: hours}}.
    Raises ValueError for a rate or count that is not positive.
    """
    if min([one_img_s, *group_img_s.values()]) <= 0 or min(cells, rounds, epochs_per_round, images_per_epoch) < 1:
        raise ValueError("sweep_hours: rates and counts must be positive")
    per_cell = rounds * epochs_per_round * images_per_epoch
    grouped = {n: math.ceil(cells / n) * per_cell * n / rate / 3600 for n, rate in sorted(group_img_s.items())}
    return {"one_at_a_time_hours": cells * per_cell / one_img_s / 3600, "grouped_hours": grouped}


def faster_or_slower(ratio: float) -> str:
    """'2.50x faster' for a time ratio (one at a time / fused) of at least 1, '1.25x slower' below."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def best(hours: Dict[int, float]):
    """(N, hours) of the fastest plan, or (None, None) for none."""
    return min(hours.items(), key=lambda item: item[1]) if hours else (None, None)


def sweep_estimates(rows: List[dict], args) -> Dict[str, object]:
    """The estimate per measured batch size of res20s (else of the first arch), from benchmark rows
    ({arch, batch_size, cells, one_run_img_s, fused_img_s, processes_img_s}); plus printable lines."""
    arch = "res20s" if "res20s" in args.archs else args.archs[0]
    shape = {"arch": arch, "cells": args.sweep_cells, "rounds": args.rounds,
             "epochs_per_round": args.epochs_per_round, "images_per_epoch": args.images_per_epoch}
    estimates, lines = [], []
    for batch in args.batch_sizes:
        mine = [r for r in rows if r["arch"] == arch and r["batch_size"] == batch]
        one = next((r["one_run_img_s"] for r in mine if "one_run_img_s" in r), None)
        if one is None:
            estimates.append({"batch_size": batch, "error": "the one-run rate was not measured"})
            continue
        counts = {k: v for k, v in shape.items() if k != "arch"}
        fused = sweep_hours(one, {r["cells"]: r["fused_img_s"] for r in mine if "fused_img_s" in r}, **counts)
        processes = sweep_hours(one, {1: one, **{r["cells"]: r["processes_img_s"] for r in mine
                                                 if "processes_img_s" in r}}, **counts)
        n_fused, h_fused = best(fused["grouped_hours"])
        n_procs, h_procs = best(processes["grouped_hours"])
        single = fused["one_at_a_time_hours"]
        estimates.append({"batch_size": batch, "one_at_a_time_hours": single,
                          "fused_hours_by_group": fused["grouped_hours"],
                          "processes_hours_by_group": processes["grouped_hours"],
                          "best_fused_group": n_fused, "best_fused_hours": h_fused,
                          "best_processes_group": n_procs, "best_processes_hours": h_procs,
                          "fused_speedup": single / h_fused if h_fused else None})
        line = (f"sweep estimate, {arch} batch {batch} ({args.sweep_cells} cells x {args.rounds} rounds x "
                f"{args.epochs_per_round} epochs x {args.images_per_epoch:,} images, training only): "
                f"one at a time {single:.2f} h")
        if h_fused:
            line += f"; fused, groups of up to {n_fused}: {h_fused:.2f} h ({faster_or_slower(single / h_fused)})"
        line += f"; concurrent processes, up to {n_procs}: {h_procs:.2f} h"
        lines.append(line)
    return {**shape, "estimates": estimates, "lines": lines}
