#!/usr/bin/env python
"""Report on finished rounds: accuracy plots, markdown tables, a CSV and the lineage tree.

    python report_runs.py RUN_DIR [RUN_DIR ...] [--out report] [--title TITLE]
                          [--x remaining,flops,throughput] [--spread std|range]

A RUN_DIR may also be a folder of run dirs (e.g. a sweep's output; its sweep.json gives one table per
sweep). Writes, into --out: accuracy_vs_<x>.png per --x (needs matplotlib: without it, a warning and
no plot), rounds.csv and report.md, and prints the table and tree. Seeds of one experiment are
aggregated (mean ± std, or min-max with --spread range). "best" is the round with the best validation
top-1 (its test top-1 beside it). Bad input exits with code 2 and one line naming the path or flag,
before anything is written.
"""
import argparse
import importlib.util
import os
import sys

from reports import lineage, plot, sweep, tables
from reports.runs import load_runs
from reports.series import SPREADS, group_series
from reports.xaxes import X_AXES
from utils.errors import UsageError, run_cli

REPORT_NAME = "report.md"
CSV_NAME = "rounds.csv"


def plot_name(x: str) -> str:
    return f"accuracy_vs_{x}.png"


PLOT_NAME = plot_name("remaining")


def x_axes(text: str) -> list:
    """'remaining,flops' -> ['remaining', 'flops'] (argparse turns the ValueError into a usage error, exit 2)."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",")))
    unknown = [name for name in names if name not in X_AXES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: not an x axis (choose from {', '.join(X_AXES)})")
    return names


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Turn run dirs into accuracy plots (vs remaining weights, FLOPs "
                                                 "or measured throughput), markdown tables, a CSV of every round "
                                                 "and the lineage tree of runs/branches.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs, or folders holding run dirs")
    parser.add_argument("--out", default="report", help="where to write the plots, rounds.csv and report.md "
                                                        "(default ./report)")
    parser.add_argument("--title", default=None, help="title of the plots and the report (default: 'Accuracy vs "
                                                      "remaining weights', or the first --x's)")
    parser.add_argument("--x", type=x_axes, default=["remaining"], metavar="X[,X...]",
                        help=f"x axes, comma-separated, one plot each: {', '.join(X_AXES)} (remaining weights %%, "
                             f"FLOPs per image from the round records, throughput measured by export_compact.py); "
                             f"default remaining")
    parser.add_argument("--spread", choices=SPREADS, default="std",
                        help="band and ± of seeds of one experiment: sample std (default) or min-max range")
    return parser.parse_args(argv)


def have_matplotlib() -> bool:
    """matplotlib is an extra (pip install '.[reports]'): without it the tables and tree still come out."""
    return importlib.util.find_spec("matplotlib") is not None


def gather(args) -> dict:
    """Everything the report says, read and checked before anything is written; UsageError names what is bad."""
    runs, warnings = load_runs(args.run_dirs)
    sweeps = sweep.sweeps_under(args.run_dirs)
    series, notes, caveats = group_series(runs, args.spread), [], []
    for x in args.x:
        if not plot.panels(series, x):
            raise UsageError(f"--x {x}: nothing to plot, {X_AXES[x].missing or 'no round keeps anything'}")
        notes += plot.left_out(series, x)
        caveats += plot.mixed_settings(series, x)
    return {"runs": runs, "warnings": warnings, "sweeps": sweeps, "notes": notes, "caveats": caveats, "xs": args.x,
            "table": tables.markdown_table(runs, args.spread), "tree": lineage.lineage_tree(runs)}


def document(report: dict, title: str, images: list, spread: str) -> str:
    """report.md: plots (and what they leave out), one table per sweep (or a summary), rounds, lineage."""
    parts = [f"# {title or X_AXES[report['xs'][0]].title}\n"]
    parts += [f"![{title or X_AXES[x].title}]({plot_name(x)})\n" for x in images]
    parts += [f"**Warning:** {caveat}\n" for caveat in report["caveats"]]
    if report["notes"]:
        parts.append("Not in the plots:\n\n" + "".join(f"- {note}\n" for note in report["notes"]))
    for found in report["sweeps"]:
        parts.append(f"## Sweep {found.name}\n\n{sweep.sweep_table(found, report['runs'], spread)}\n")
    if not report["sweeps"] and len(group_series(report["runs"], spread)) > 1:
        parts.append(f"## Summary\n\n{tables.summary_table(report['runs'], spread)}\n")
    parts.append(f"## Rounds\n\n{report['table']}\n\nEvery round as CSV: [{CSV_NAME}]({CSV_NAME})\n")
    parts.append(f"## Lineage\n\n```\n{report['tree']}\n```\n")
    return "\n".join(parts)


def write_report(report: dict, out: str, title: str, spread: str) -> list:
    """Writes the plots (when matplotlib is installed), rounds.csv and report.md, each atomically (a reader
    never sees half a PNG); returns the names written."""
    # the runner's atomic writer (fsync, umask) lives beside torch.save: import it only once there is
    # something to write, so a mistyped path fails in a blink instead of after loading torch
    from utils.checkpoint import atomic_write_bytes, atomic_write_text
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out}: --out exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{out}: cannot create the output directory ({exc.strerror})") from None
    images = report["xs"] if have_matplotlib() else []
    for x in images:
        atomic_write_bytes(os.path.join(out, plot_name(x)), plot.accuracy_plot_png(report["runs"], title, x, spread))
    atomic_write_text(os.path.join(out, CSV_NAME), tables.csv_text(report["runs"]))
    atomic_write_text(os.path.join(out, REPORT_NAME), document(report, title, images, spread))
    return [plot_name(x) for x in images] + [CSV_NAME, REPORT_NAME]


def main(argv=None) -> int:
    args = parse_args(argv)

    def work() -> tuple:
        report = gather(args)
        for warning in report["warnings"] + report["notes"] + report["caveats"]:
            print(f"warning: {warning}", file=sys.stderr)
        if not have_matplotlib():
            print(f"warning: matplotlib is not installed: no {PLOT_NAME} (pip install matplotlib, "
                  f"or pip install '.[reports]')", file=sys.stderr)
        return report, write_report(report, args.out, args.title, args.spread)

    def show(result: tuple) -> None:
        report, written = result
        print(f"{report['table']}\n\n{report['tree']}")
        print(f"\nwrote {', '.join(os.path.join(args.out, name) for name in written)}")

    return run_cli(work, show)


if __name__ == "__main__":
    sys.exit(main())
