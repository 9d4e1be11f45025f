"""The report's plot: test top-1 of every round against what the round keeps.

Weight-pruning runs share a panel whose x is the remaining weights (%, log axis decreasing left to
right, as in IMP papers). `--struct token` runs keep every weight (100 %), so they get a panel of
their own whose x is the tokens kept per image (prefix + patch tokens, decreasing left to right).
A ring marks each run's best-validation round: the one the table calls best (never chosen on test).
"""
import io

from utils.reports import DEFAULT_TITLE, MARKERS, RoundRow, Run, branch_points

WEIGHTS_X = "remaining weights (%)"
TOKENS_X = "tokens kept per image (--struct token)"


def x_of(run: Run, row: RoundRow) -> float:
    """Where a round sits on its run's panel: tokens kept for a token run, else remaining weights (%)."""
    return row.tokens_kept if run.is_token else row.remaining_pct


def _draw_panel(axes, runs: list, colors: dict, points: dict, token: bool) -> None:
    """One panel: a line per run, dashed dense baselines, best-validation rings, dotted branch links."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    dense_runs = sum(any(r.round == 0 for r in run.rounds) for run in runs)
    for run in runs:
        color, marker = colors[run]
        rows = [r for r in run.rounds if x_of(run, r) > 0]  # a fully pruned round has no place on a log axis
        axes.plot([x_of(run, r) for r in rows], [r.test_top1 for r in rows], marker=marker, color=color,
                  label=run.label)
        for dense in (r for r in run.rounds if r.round == 0):
            name = "dense baseline" if dense_runs == 1 else f"dense baseline ({run.label})"
            axes.axhline(dense.test_top1, color=color, linestyle="--", linewidth=0.9, alpha=0.7, label=name)
        best = run.best()
        if best is not None and best in rows:
            axes.plot([x_of(run, best)], [best.test_top1], marker="o", markersize=14, markerfacecolor="none",
                      markeredgecolor=color, linestyle="none")
        parent, at = points.get(run, (None, None))
        start = next((r for r in parent.rounds if r.round == at), None) if parent in runs else None
        if start is not None and rows:  # a dotted link from the parent's round the branch started from
            axes.plot([x_of(parent, start), x_of(run, rows[0])], [start.test_top1, rows[0].test_top1],
                      linestyle=":", color=color)
    if not token:
        axes.set_xscale("log")
    axes.invert_xaxis()
    ticks = sorted({round(x_of(run, r), 2) for run in runs for r in run.rounds if x_of(run, r) > 0})
    if len(ticks) <= 12:  # label the actual levels when they fit
        axes.xaxis.set_major_locator(FixedLocator(ticks))
        axes.xaxis.set_minor_locator(NullLocator())
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    axes.set(xlabel=TOKENS_X if token else WEIGHTS_X, ylabel="test top-1 (%)")
    axes.grid(True, which="both", alpha=0.3)
    ring = Line2D([], [], marker="o", markersize=10, markerfacecolor="none", markeredgecolor="0.3",
                  linestyle="none", label="best-validation round")
    axes.legend(handles=axes.get_legend_handles_labels()[0] + [ring], fontsize="small", loc="best")


def accuracy_figure(runs: list, title: str = DEFAULT_TITLE):
    """A matplotlib Figure (Agg canvas, no pyplot: no global backend switch in the caller's process)
    with one panel for weight-pruning runs and one for token runs, each only when such runs exist."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(token, [run for run in runs if run.is_token == token]) for token in (False, True)]
    panels = [(token, members) for token, members in panels if members]
    figure = Figure(figsize=(8 * len(panels), 5), dpi=120)
    FigureCanvasAgg(figure)
    colors = {run: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, run in enumerate(runs)}
    points = branch_points(runs)
    for i, (token, members) in enumerate(panels):
        _draw_panel(figure.add_subplot(1, len(panels), i + 1), members, colors, points, token)
    if len(panels) == 1:
        figure.axes[0].set_title(title)
    else:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def accuracy_plot_png(runs: list, title: str = DEFAULT_TITLE) -> bytes:
    """accuracy_figure rendered to PNG bytes."""
    buffer = io.BytesIO()
    accuracy_figure(runs, title).savefig(buffer, format="png")
    return buffer.getvalue()
