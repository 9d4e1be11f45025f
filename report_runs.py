#!/usr/bin/env python
"""Report on finished rounds: accuracy-vs-remaining plot, markdown table and lineage tree.

    python report_runs.py RUN_DIR [RUN_DIR ...] [--out report] [--title TITLE]

A RUN_DIR may also be a folder of run dirs (e.g. a sweep's output). Writes
<out>/accuracy_vs_remaining.png (needs matplotlib: without it, a warning and no plot) and
<out>/report.md and prints the table and tree. "best" is the round with the best validation
top-1 (its test top-1 shown beside it); --struct token runs are plotted against tokens kept.
Bad input exits with code 2 and one line naming the path.
"""
import argparse
import importlib.util
import os
import sys

from utils import reports
from utils.errors import UsageError

PLOT_NAME = "accuracy_vs_remaining.png"
REPORT_NAME = "report.md"


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Turn run dirs into an accuracy-vs-remaining-weights plot, "
                                                 "a markdown table and the lineage tree of runs/branches.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs, or folders holding run dirs")
    parser.add_argument("--out", default="report", help="where to write the plot and report.md (default ./report)")
    parser.add_argument("--title", default=reports.DEFAULT_TITLE, help="title of the plot and the report")
    return parser.parse_args(argv)


def have_matplotlib() -> bool:
    """matplotlib is an extra (pip install '.[reports]'): without it the table and tree still come out."""
    return importlib.util.find_spec("matplotlib") is not None


def write_report(runs: list, out: str, title: str) -> tuple:
    """Writes the plot (when matplotlib is installed) and report.md atomically, so a reader never sees
    half a PNG; returns (table, tree, the files written)."""
    # the runner's atomic writer (fsync, umask) lives beside torch.save: import it only once there is
    # something to write, so a mistyped path fails in a blink instead of after loading torch
    from utils.checkpoint import atomic_write_bytes, atomic_write_text
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out}: --out exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{out}: cannot create the output directory ({exc.strerror})") from None
    table, tree = reports.markdown_table(runs), reports.lineage_tree(runs)
    written, image = [], ""
    if have_matplotlib():
        atomic_write_bytes(os.path.join(out, PLOT_NAME), reports.accuracy_plot_png(runs, title))
        written, image = [PLOT_NAME], f"![{title}]({PLOT_NAME})\n\n"
    document = f"# {title}\n\n{image}## Rounds\n\n{table}\n\n## Lineage\n\n```\n{tree}\n```\n"
    atomic_write_text(os.path.join(out, REPORT_NAME), document)
    return table, tree, written + [REPORT_NAME]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs, warnings = reports.load_runs(args.run_dirs)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if not have_matplotlib():
            print(f"warning: matplotlib is not installed: no {PLOT_NAME} (pip install matplotlib, "
                  f"or pip install '.[reports]')", file=sys.stderr)
        table, tree, written = write_report(runs, args.out, args.title)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table)
    print()
    print(tree)
    print(f"\nwrote {' and '.join(os.path.join(args.out, name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
