"""The report's plot: test top-1 of every round against what the round keeps, costs or runs at.

One panel per (arch, dataset) (and, on the remaining-weights view, one per (arch, dataset) of
`--struct token` runs, whose x is tokens kept); x from reports/xaxes.py with fixed ticks. Seeds of one
experiment are one line (their mean) in a band (± std or min-max); a lottery-ticket control
(random reinit / random prune / retrain) is drawn in its ticket's colour with its own line style and
marker shape, hollow, larger and above the tickets (a retrain point on its ticket's point stays
visible); on the throughput view the masked model's img/s of each exported round is a faint marker
beside the compact one's, and the axis label names the dtype / compile setting (or says they mix); a
dotted link joins a branch to the parent round it started from; a ring marks each line's
best-validation round (never chosen on test); one dashed grey dense baseline per panel (the mean
round-0 test top-1 of its runs). The legend sits below the panels, in a figure area of its own, so
it never covers data however many runs there are.
"""
import io
import math

from typing import Optional

from reports.series import group_series
from reports.xaxes import TOKENS, X_AXES, axis_for, drawable

MARKERS = "osDPXphd"                    # tickets (and ordinary branches), one per series in turn
# control kind -> (line style, marker): shapes no ticket uses, so a one-round control still says what it is
CONTROL_STYLES = {"random_reinit": ("--", "^"), "random_prune": ("-.", "v"), "retrain": ((0, (3, 1, 1, 1, 1, 1)), "*")}
CONTROL_MARKER = {"markersize": 10, "markerfacecolor": "none", "markeredgewidth": 1.6, "zorder": 3}  # above tickets
CONTROL_EDGE_SHADE = 0.6                # a control's marker edge: its ticket's colour darkened, seen on top of it
COMPANION_ALPHA = 0.3
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


def mixed_settings(series: list, x: str) -> list:
    """A warning line when the `x` view draws values measured in different settings (throughput: dtype,
    torch.compile), naming the series of each; [] when they agree or the axis has no settings."""
    by_setting = {}
    for s in series:
        for setting in measured_settings(axis_for(x, s.is_token), [s]):
            by_setting.setdefault(setting, []).append(s.label)
    if len(by_setting) < 2:
        return []
    named = "; ".join(f"{setting}: {', '.join(labels)}" for setting, labels in sorted(by_setting.items()))
    return [f"the {x} plot mixes measurement settings ({named}): their img/s are not comparable"]


def styles(series: list) -> dict:
    """{series: (colour, marker, line style)}: a control takes its ticket's colour, its kind's line style
    and marker (CONTROL_STYLES); a control whose ticket is not in the report gets a colour of its own."""
    own = [s for s in series if not (s.control and s.parent)]
    colour = {s: f"C{i % 10}" for i, s in enumerate(own)}
    style = {}
    for i, s in enumerate(own):
        style[s] = (colour[s], *(CONTROL_STYLES[s.control][::-1] if s.control else (MARKERS[i % len(MARKERS)], "-")))
    for s in series:
        if s not in style:
            linestyle, marker = CONTROL_STYLES[s.control]
            style[s] = (colour[s.parent], marker, linestyle)
    return style


def darker(color: str, factor: float = CONTROL_EDGE_SHADE) -> tuple:
    """`color` as RGB scaled towards black by `factor` (1: unchanged): the same colour family, darker."""
    from matplotlib.colors import to_rgb
    return tuple(channel * factor for channel in to_rgb(color))


def _draw_companion(axes, axis, rows: list, color: str, marker: str) -> list:
    """Faint markers at the axis's companion x of each round (same y), each joined to its round's point by
    a faint line: the gap is the speedup. Returns the companion x values drawn."""
    pairs = [(axis.companion(row).mean, axis.value(row).mean, row.test_top1.mean) for row in rows
             if axis.companion(row) is not None and math.isfinite(axis.companion(row).mean)]
    if pairs:
        axes.plot([p[0] for p in pairs], [p[2] for p in pairs], marker=marker, color=color, linestyle="none",
                  alpha=COMPANION_ALPHA, markerfacecolor="none", gid="companion")
        gaps = [point for faint, x, y in pairs for point in ((faint, y), (x, y), (math.nan, math.nan))]
        axes.plot([p[0] for p in gaps], [p[1] for p in gaps], color=color, alpha=COMPANION_ALPHA, linewidth=1,
                  linestyle=":", gid="companion")
    return [p[0] for p in pairs]


def _draw_series(axes, s, axis, style: tuple, members: list) -> list:
    """The line (+ band, best ring, link to the parent round, faint companion points); returns the x values
    drawn. In a panel whose values mix measurement settings the label says the series' own: '... [bf16]'."""
    color, marker, linestyle = style
    rows = [row for row in s.rows if drawable(axis, row)]
    xs, ys = [axis.value(row).mean for row in rows], [row.test_top1.mean for row in rows]
    own = measured_settings(axis, [s]) if len(measured_settings(axis, members)) > 1 else []
    axes.plot(xs, ys, marker=marker, color=color, linestyle=linestyle,
              label=s.label + (f" [{' / '.join(own)}]" if own else ""),
              **({**CONTROL_MARKER, "markeredgecolor": darker(color)} if s.control else {}))
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
    return xs + (_draw_companion(axes, axis, rows, color, marker) if axis.companion else [])


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


def measured_settings(axis, members: list) -> list:
    """The sorted measurement settings ('bf16, compiled', 'fp32') of the values `members` put on `axis`."""
    if axis.settings is None:
        return []
    return sorted({setting for s in members for row in s.rows if drawable(axis, row) for setting in axis.settings(row)})


def axis_label(axis, members: list) -> str:
    """The x label, naming the measurement setting of the panel's values ('..., fp32') or that they mix."""
    found = measured_settings(axis, members)
    if len(found) > 1:
        return f"{axis.label}\nMIXED settings, not comparable: {' | '.join(found)}"
    return f"{axis.label}, {found[0]}" if found else axis.label


def _format_axis(axes, axis, xs: list, label: str) -> None:
    """Scale, limits (decreasing where less model is to the right; on 1-2-5 axes out to the next tick beyond
    the data on each side) and ticks that never come from data."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator
    lo, hi = min(xs), max(xs)
    if axis.bounds:
        lo, hi = axis.bounds(lo, hi)
    ticks = axis.fixed_ticks(lo, hi) if axis.fixed_ticks else []
    if axis.log:
        axes.set_xscale("log")
        lo, hi = lo / 1.15, hi * 1.15
    else:
        pad = (hi - lo) * 0.06 or abs(hi) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    axes.set_xlim((hi, lo) if axis.decreasing else (lo, hi))
    if not ticks:  # no fixed ticks (tokens, throughput): nice round numbers inside the range
        ticks = [t for t in MaxNLocator(nbins=5, integer=axis is TOKENS).tick_values(lo, hi) if lo <= t <= hi]
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: axis.tick_label(value)))
    axes.set(xlabel=label, ylabel="test top-1 (%)")
    axes.grid(True, alpha=0.3)


def _legend(figure, handles: list, labels: list) -> None:
    """Below every panel, in as many columns as the longest label lets fit the figure's width; the figure
    grows by the legend's rows, so the panels keep their size however many runs there are."""
    width, height = figure.get_size_inches()
    columns = max(1, min(len(labels), int(width // (0.075 * max(map(len, labels)) + 0.8))))
    figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize="small", frameon=False,
                  handlelength=3.5)  # long enough to tell --, -. and -.. apart
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
        _format_axis(axes, axis, xs, axis_label(axis, members))
        axes.set_title(title if len(groups) == 1 else f"{arch} · {dataset}" + (" · tokens" if axis is TOKENS else ""))
    if len(groups) > 1:
        figure.suptitle(title)
    handles = {}
    pairs = [pair for axes in figure.axes for pair in zip(*axes.get_legend_handles_labels())]
    for handle, label in sorted(pairs, key=lambda pair: pair[1] in baselines):  # lines first, then baselines
        handles.setdefault(label, handle)
    handles["best-validation round"] = Line2D([], [], marker="o", markersize=10, markerfacecolor="none",
                                              markeredgecolor="0.3", linestyle="none")
    if any(line.get_gid() == "companion" for axes in figure.axes for line in axes.lines):
        handles[X_AXES[x].companion_label] = Line2D([], [], marker="o", color="0.3", alpha=COMPANION_ALPHA,
                                                    markerfacecolor="none", linestyle=":")
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
