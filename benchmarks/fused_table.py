"""benchmarks/fused_speed.py's rows as a table, issue 15's targets, and the large-batch reference.

A row: {arch, batch_size, cells, one_run_img_s, fused_img_s, fused_speedup, processes_img_s, ...}; with
--big_batch also big_batch_img_s (one plain run at cells * batch_size images per step) and
fused_vs_big_batch (fused img/s over it: 1.0 means fusing N cells trains as fast as one run given the same
images per step, the most that putting more images into each step can explain).
"""
from typing import Dict, List

TARGETS = {"res20s": (128, 8, 5.0), "vit_tiny": (128, 8, 3.0)}  # arch: (batch, cells, speedup), issue 15


def add_big_batch(row: dict, big: Dict[str, object]) -> None:
    """Into `row`: the one-run-at-N*B measurement `big` ({img_s} or {error}) and the fused rate's ratio to it."""
    if "img_s" in big:
        row["big_batch_img_s"] = big["img_s"]
        if row.get("fused_img_s"):
            row["fused_vs_big_batch"] = row["fused_img_s"] / big["img_s"]
    elif "error" in big:
        row["big_batch_error"] = big["error"]


def table(rows: List[dict]) -> str:
    """The rows as aligned text; the large-batch columns only when some row has them."""
    head = ["arch", "batch", "N", "fused img/s", "vs one run", "N processes img/s", "vs one run",
            "peak MiB/cell", "one run img/s"]
    big = any("big_batch_img_s" in r or "big_batch_error" in r for r in rows)
    if big:
        head += ["one run at N*batch img/s", "fused vs it"]
    body = []
    for r in rows:
        def rate(key, error_key):
            return f"{r[key]:,.0f}" if key in r else r.get(error_key, "-")[:60]

        def ratio(key):
            return f"{r[key]:.2f}x" if key in r else "-"
        line = [r["arch"], str(r["batch_size"]), str(r["cells"]), rate("fused_img_s", "fused_error"),
                ratio("fused_speedup"), rate("processes_img_s", "processes_error"), ratio("processes_speedup"),
                f"{r['fused_peak_mib_per_cell']:.0f}" if "fused_peak_mib_per_cell" in r else "-",
                rate("one_run_img_s", "one_run_error")]
        if big:
            line += [rate("big_batch_img_s", "big_batch_error"), ratio("fused_vs_big_batch")]
        body.append(line)
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body)


def targets(rows: List[dict]) -> List[dict]:
    """Issue 15's targets among the measured rows: {arch, batch_size, cells, target, speedup, met}."""
    out = []
    for arch, (batch, cells, goal) in TARGETS.items():
        for r in rows:
            if (r["arch"], r["batch_size"], r["cells"]) == (arch, batch, cells):
                speedup = r.get("fused_speedup")
                out.append({"arch": arch, "batch_size": batch, "cells": cells, "target": goal, "speedup": speedup,
                            "met": speedup is not None and speedup >= goal})
    return out
