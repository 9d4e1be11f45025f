"""Side-by-side table of clip_benchmark results with and without anchor token pruning (SPEC section 4).

Reads the result JSON files written by clip_prune.py (clip_benchmark's
"metrics" plus our "token_pruning" section) and prints one column per file.

    python -m tokens.report baseline.json pruned.json
"""
import argparse
import json
import os
from typing import List, Optional

METRICS = ("acc1", "acc5", "mean_per_class_recall")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if len(set(value)) > 2 else run_lengths(value)
    return str(value)


def run_lengths(values: list) -> str:
    """[65, 17, 17, 17] -> '65x1 17x3': short enough for a table cell."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append(f"{values[start]}x{i - start}")
            start = i
    return " ".join(out)


def rows(results: List[dict]) -> List[List[str]]:
    table = []
    for key in METRICS:
        table.append([key] + [_fmt(r.get("metrics", {}).get(key)) for r in results])
    stats = [r.get("token_pruning", {}) for r in results]
    table.append(["pruning"] + [("on k=%s m=%s a=%s" % (s["k_anchors"], s["top_m"], s["alpha"])) if s.get("enabled")
                                else "off" for s in stats])
    table.append(["images/s (image encoder, steady state)"] + [_fmt(s.get("images_per_s"), 1) for s in stats])
    table.append(["images/s (all batches, warm-up included)"] + [_fmt(s.get("overall_images_per_s"), 1) for s in stats])
    table.append(["warm-up batches / s"] + [_warmup(s) for s in stats])
    table.append(["tokens per block"] + [_fmt(s.get("tokens_per_block")) for s in stats])
    table.append(["mean tokens per block"] + [_fmt(s.get("mean_tokens_per_block"), 1) for s in stats])
    base = stats[0].get("images_per_s") if stats else None
    table.append(["speed vs first column (steady state)"] + [_speedup(base, s.get("images_per_s")) for s in stats])
    return table


def _warmup(stats: dict) -> str:
    """'2 / 0.538': the first batches and those that captured a scoring graph (tokens/stats.py)."""
    if stats.get("warmup_batches") is None:
        return "-"
    return f"{stats['warmup_batches']} / {stats['warmup_seconds']:.3f}"


def _speedup(base: Optional[float], value: Optional[float]) -> str:
    return f"{value / base:.2f}x" if base and value else "-"


def render(paths: List[str]) -> str:
    results = []
    for path in paths:
        with open(path) as handle:
            results.append(json.load(handle))
    header = [""] + [os.path.splitext(os.path.basename(p))[0] for p in paths]
    table = [header] + rows(results)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compare clip_prune.py result files side by side")
    parser.add_argument("results", nargs="+", help="result JSON files; the first is the reference for speed")
    args = parser.parse_args(argv)
    print(render(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
