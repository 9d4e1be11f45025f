"""The report's plot: test top-1 of every round against what the round keeps, costs or runs at.

One panel per (arch, dataset) (and, on the remaining-weights view, one per (arch, dataset) of
`--struct token` runs, whose x is tokens kept); x from reports/xaxes.py with fixed ticks. Seeds of one
experiment are one line (their mean) in a band (± std or min-max); a lottery-ticket control
(random reinit / random prune / retrain) is drawn in its ticket's colour with its own line style; a
dotted link joins a branch to the parent round it started from; a ring marks each line's
best-validation round (never chosen on test); one dashed grey dense baseline per panel (the mean
round-0 test top-1 of its runs). The legend sits below the panels, in a figure area of its own, so
it never covers data however many runs there are.
"""
import io
import math

from typing import Optional

from reports.series import group_series
from reports.xaxes import REMAINING, TOKENS, X_AXES, axis_for, drawable

MARKERS = "osD^vP*X"
CONTROL_STYLES = {"random_reinit": "--", "random_prune": "-.", "retrain": (0, (3, 1, 1, 1, 1, 1))}
LINK_STYLE = (0, (1, 2))
BASELINE_COLOR = "0.35"
PANEL_INCHES = (7.0, 4.5)
LEGEND_ROW_INCHES = 0.24


def panels(series: list, x: str) -> dict:
    """{(axis, arch, dataset): [series drawable there]} in order: weight panels first, then token panels."""
    found = {}
    for s in series:
        axis = axis_for(x, s.is_token)
        if any(drawable(axis, row) for row in s.rows):
            found.setdefault((axis, s.config.get("arch", "?"), s.config.get("dataset", "?")), []).append(s)
    return dict(sorted(found.items(), key=lambda item: item[0][0] is TOKENS))  # stable: first appearance kept


def left_out(series: list, x: str) -> list:
    """Notes on what the `x` view cannot draw: one line naming the series without any value (e.g. runs
    from before FLOPs were logged, or never exported), one per series with only some rounds missing."""
    from reports.lineage import compact_rounds
    absent, partial = [], []
    for s in series:
        axis = axis_for(x, s.is_token)
        missing = [row.round for row in s.rows if not drawable(axis, row)]
        if axis.missing and missing:
            if len(missing) == len(s.rows):
                absent.append(s.label)
            else:
                partial.append(f"{s.label}: round(s) {compact_rounds(missing)} left out of the {x} plot, "
                               f"{axis.missing}")
    return ([f"left out of the {x} plot, {X_AXES[x].missing}: {'; '.join(absent)}"] if absent else []) + partial


def styles(series: list) -> dict:
    """{series: (colour, marker, line style)}: a control takes its ticket's colour and marker."""
    own = [s for s in series if not (s.control and s.parent)]
    style = {s: (f"C{i % 10}", MARKERS[i % len(MARKERS)], "-") for i, s in enumerate(own)}
    for s in series:
        if s not in style:
            color, marker, _ = style[s.parent]
            style[s] = (color, marker, CONTROL_STYLES[s.control])
    return style


def _draw_series(axes, s, axis, style: tuple, members: list) -> list:
    """The line (+ band, best ring, link to the parent round); returns the x values drawn."""
    color, marker, linestyle = style
    rows = [row for row in s.rows if drawable(axis, row)]
    xs, ys = [axis.value(row).mean for row in rows], [row.test_top1.mean for row in rows]
    axes.plot(xs, ys, marker=marker, color=color, linestyle=linestyle, label=s.label,
              markerfacecolor="white" if s.control else color)
    if any(row.n > 1 for row in rows):
        axes.fill_between(xs, [row.test_top1.lo for row in rows], [row.test_top1.hi for row in rows],
                          color=color, alpha=0.18, linewidth=0)
    best = s.best()
    if best is not None and best in rows:
        axes.plot([axis.value(best).mean], [best.test_top1.mean], marker="o", markersize=14,
                  markerfacecolor="none", markeredgecolor=color, linestyle="none")
    parent = s.parent if s.parent in members else None
    start = next((row for row in parent.rows if row.round == s.branch_round), None) if parent else None
    if start is not None and rows and drawable(axis, start):
        axes.plot([axis.value(start).mean, xs[0]], [start.test_top1.mean, ys[0]], linestyle=LINK_STYLE,
                  color=color, linewidth=1)
    return xs


def _draw_baseline(axes, members: list, arch: str, dataset: str) -> str:
    """One dashed line: the mean round-0 (dense) test top-1 of the panel's tickets; returns its label."""
    dense = [r.test_top1 for s in members if not s.control for run in s.runs for r in run.rounds if r.round == 0]
    if dense:
        mean = sum(dense) / len(dense)
        pooled = f" (mean of {len(dense)} runs)" if len(dense) > 1 else ""
        label = f"dense baseline {arch} {dataset}: {mean:.2f}{pooled}"
        axes.axhline(mean, color=BASELINE_COLOR, linestyle="--", linewidth=1, label=label)
        return label
    return ""


def _format_axis(axes, axis, xs: list) -> None:
    """Scale, limits (decreasing where less model is to the right) and ticks that never come from data."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator
    lo, hi = min(xs), max(xs)
    if axis.log:
        axes.set_xscale("log")
        lo, hi = lo / 1.15, hi * 1.15
    else:
        pad = (hi - lo) * 0.06 or abs(hi) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    axes.set_xlim((hi, lo) if axis.decreasing else (lo, hi))
    ticks = axis.fixed_ticks(lo, hi) if axis.fixed_ticks else []
    if len(ticks) < 2 and axis is not REMAINING:  # a narrow range: nice round numbers inside it instead
        ticks = [t for t in MaxNLocator(nbins=5, integer=axis is TOKENS).tick_values(lo, hi) if lo <= t <= hi]
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: axis.tick_label(value)))
    axes.set(xlabel=axis.label, ylabel="test top-1 (%)")
    axes.grid(True, alpha=0.3)


def _legend(figure, handles: list, labels: list) -> None:
    """Below every panel, in as many columns as the longest label lets fit the figure's width; the figure
    grows by the legend's rows, so the panels keep their size however many runs there are."""
    width, height = figure.get_size_inches()
    columns = max(1, min(len(labels), int(width // (0.075 * max(map(len, labels)) + 0.8))))
    figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize="small", frameon=False)
    figure.set_size_inches(width, height + 0.3 + LEGEND_ROW_INCHES * math.ceil(len(labels) / columns))


def accuracy_figure(runs: list, title: Optional[str] = None, x: str = "remaining", spread: str = "std"):
    """A matplotlib Figure (Agg canvas, no pyplot: no global backend switch in the caller's process):
    one panel per (axis, arch, dataset) of reports.xaxes.axis_for(x, ...), in up to two columns, and
    the legend in its own area below them; `title` defaults to the x axis's ("Accuracy vs FLOPs per
    image"). Raises ValueError when no run can be drawn against `x`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    series, title = group_series(runs, spread), title or X_AXES[x].title
    groups = panels(series, x)
    if not groups:
        raise ValueError(f"no run has a value for x = {x}")
    columns = min(2, len(groups))
    rows = math.ceil(len(groups) / columns)
    figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows + 0.3), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    style, baselines = styles(series), set()
    for i, ((axis, arch, dataset), members) in enumerate(groups.items()):
        axes = figure.add_subplot(rows, columns, i + 1)
        xs = [value for s in members for value in _draw_series(axes, s, axis, style[s], members)]
        baselines.add(_draw_baseline(axes, members, arch, dataset))
        _format_axis(axes, axis, xs)
        axes.set_title(title if len(groups) == 1 else f"{arch} · {dataset}" + (" · tokens" if axis is TOKENS else ""))
    if len(groups) > 1:
        figure.suptitle(title)
    handles = {}
    pairs = [pair for axes in figure.axes for pair in zip(*axes.get_legend_handles_labels())]
    for handle, label in sorted(pairs, key=lambda pair: pair[1] in baselines):  # lines first, then baselines
        handles.setdefault(label, handle)
    handles["best-validation round"] = Line2D([], [], marker="o", markersize=10, markerfacecolor="none",
                                              markeredgecolor="0.3", linestyle="none")
    if any(row.n > 1 for members in groups.values() for s in members for row in s.rows):
        handles[f"band: {'± std' if spread == 'std' else 'min-max'} over seeds"] = Patch(color="0.5", alpha=0.25)
    labels = list(handles)
    _legend(figure, [handles[label] for label in labels], labels)
    return figure


def accuracy_plot_png(runs: list, title: Optional[str] = None, x: str = "remaining", spread: str = "std") -> bytes:
    """accuracy_figure rendered to PNG bytes."""
    buffer = io.BytesIO()
    accuracy_figure(runs, title, x, spread).savefig(buffer, format="png")
    return buffer.getvalue()
