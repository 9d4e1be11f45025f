"""reports/plot.py and reports/series.py on hand-written run dirs: fixed ticks, the legend outside the
panels, one baseline per (arch, dataset), seeds as one line in a band, lottery-ticket controls, and
the FLOPs / throughput views (fake compact/round_<k>.json exports)."""
import csv
import io
import json
import math
import os

import pytest

import report_runs
from reports import lineage, plot, tables, xaxes
from reports.runs import load_runs
from reports.series import group_series, stat
from test_report import config_record, table_rows, write_run

pytest.importorskip("matplotlib")


def make(root, name, rounds, extra=None, parent=None, **config):
    """A run dir `root/name` of `rounds` [(round, remaining %, test, val)] with config.json `config`."""
    directory = root / name
    return write_run(directory, rounds, config_record(**config), parent or str(directory / "rewind.pth.tar"), extra)


def curve(rate, rounds, base):
    """IMP rounds at `rate`: remaining 100 (1 - rate)^k, accuracy falling 0.5 a round from `base`."""
    return [(k, 100 * (1 - rate) ** k, base - 0.5 * k, base - 0.5 * k - 0.25) for k in range(rounds)]


def write_export(run_dir, round_index, compact=None, masked=None, dtype="fp32", compile=False):
    """compact/round_<k>.json as export_compact.py writes it; a variant's img/s median m has quartiles m -+ 5 %."""
    def variant(median):
        return {"params": 1000, "flops_per_image": 10 ** 6, "latency_ms_b1": {"median": 1.0, "p25": 0.9, "p75": 1.1},
                "throughput_img_s_b256": {"median": median, "p25": median * 0.95, "p75": median * 1.05}}
    variants = {"dense": variant(1000.0)}
    variants.update({name: variant(v) for name, v in (("compact", compact), ("masked", masked)) if v is not None})
    os.makedirs(os.path.join(run_dir, "compact"), exist_ok=True)
    with open(os.path.join(run_dir, "compact", f"round_{round_index}.json"), "w") as f:
        json.dump({"round": round_index, "device": "cpu", "dtype": dtype, "compile": compile, "out_dir": "x",
                   "variants": variants, "max_abs_logit_diff": 1e-6}, f)


@pytest.fixture
def eleven_runs(tmp_path):
    """The new user's sweep: res20s/cifar10 criteria x rate x 2 seeds (8 runs, rounds down to 1.56 %) and
    three vit_tiny/cifar100 runs whose levels (68.4, 49.7 %) once became colliding tick labels."""
    dirs = []
    for criteria in ("l1", "remain"):
        for rate in (0.2, 0.5):
            for seed in (1, 2):
                dirs.append(make(tmp_path, f"{criteria}_{rate}_{seed}", curve(rate, 7, 90 + seed), struct="rsst",
                                 dataset="cifar10", criteria=criteria, rate=rate, seed=seed))
    vit_rounds = [(0, 100.0, 60.0, 59.0), (1, 68.4, 59.0, 58.0), (2, 49.7, 58.0, 57.5), (3, 10.2, 50.0, 49.0)]
    for rate in (0.3, 0.31, 0.32):
        dirs.append(make(tmp_path, f"vit_{rate}", vit_rounds, arch="vit_tiny", dataset="cifar100", rate=rate))
    return dirs


def test_one_two_five_ticks_and_engineering_labels():
    assert xaxes.one_two_five(1.36, 115.0) == [100, 50, 20, 10, 5, 2]
    assert xaxes.one_two_five(0.3, 100.0) == [100, 50, 20, 10, 5, 2, 1, 0.5]
    assert xaxes.one_two_five(1e3, 1e9) == [1e9, 1e8, 1e7, 1e6, 1e5, 1e4, 1e3]  # 6 decades: decades only
    assert xaxes.one_two_five(3.1e6, 3.9e6) == [] and xaxes.one_two_five(0, 10) == []
    assert [xaxes.engineering(v) for v in (2e8, 1500, 41e6, 0.5)] == ["200M", "1.5k", "41M", "0.5"]


def test_eleven_runs_fixed_ticks_legend_outside_one_baseline_per_panel(eleven_runs):
    runs, warnings = load_runs(eleven_runs)
    assert warnings == [] and len(runs) == 11
    figure = plot.accuracy_figure(runs, "sweep")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    resnet, vit = figure.axes  # one panel per (arch, dataset), no legend axes
    assert (resnet.get_title(), vit.get_title()) == ("res20s · cifar10", "vit_tiny · cifar100")
    # the limits reach the tick beyond the sparsest round (1.56 % -> 1, 10.2 % -> 10)
    for axes, ticks in ((resnet, [100, 50, 20, 10, 5, 2, 1]), (vit, [100, 50, 20, 10])):
        assert axes.get_xscale() == "log" and axes.get_xlim()[0] > axes.get_xlim()[1]  # fewer weights to the right
        assert list(axes.get_xticks()) == ticks
        assert [label.get_text() for label in axes.get_xticklabels()] == [f"{t:g}" for t in ticks]
        assert list(axes.xaxis.get_minorticklocs()) == []
        assert min(axes.get_xlim()) < ticks[-1] and max(axes.get_xlim()) > ticks[0]
        assert sum(line.get_label().startswith("dense baseline") for line in axes.lines) == 1
    # seeds share a line: 4 res20s series (criteria x rate) of 2 seeds, 3 vit runs
    assert sum(line.get_label().endswith("(2 seeds)") for line in resnet.lines) == 4
    baseline = next(line for line in resnet.lines if line.get_label().startswith("dense baseline"))
    assert baseline.get_ydata()[0] == pytest.approx(91.5)  # mean round-0 test top-1 of the 8 res20s runs
    assert baseline.get_label() == "dense baseline res20s cifar10: 91.50 (mean of 8 runs)"
    legend, = figure.legends
    labels = [text.get_text() for text in legend.texts]
    assert len(labels) == 4 + 3 + 2 + 2 and sum(label.startswith("dense baseline") for label in labels) == 2
    box = legend.get_window_extent(renderer)
    for axes in figure.axes:  # never over a panel, its tick labels or its axis label
        assert not box.overlaps(axes.get_tightbbox(renderer))
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= figure.bbox.x1 and box.y1 < min(a.bbox.y0 for a in figure.axes)


def test_seeds_are_averaged_into_one_line_with_a_band(tmp_path):
    # run-control flags (wandb, save_dir, resume_from, pruning_times ...) do not make another experiment
    one = make(tmp_path, "s1", [(0, 100.0, 70.0, 69.0), (1, 50.0, 60.0, 59.0)], seed=1, wandb_mode="online")
    two = make(tmp_path, "s2", [(0, 100.0, 72.0, 71.0), (1, 50.0, 62.0, 61.0)], seed=2, save_dir="x", pruning_times=9)
    runs, _ = load_runs([one, two])
    assert [run.label for run in runs] == ["none res20s synthetic rate=0.5 seed=1",
                                           "none res20s synthetic rate=0.5 seed=2"]
    series, = group_series(runs)
    assert series.label == "none res20s synthetic rate=0.5 (2 seeds)" and series.seeds == [1, 2]
    assert [(row.round, row.n, row.test_top1.mean) for row in series.rows] == [(0, 2, 71.0), (1, 2, 61.0)]
    assert series.rows[0].test_top1.hi - 71.0 == pytest.approx(math.sqrt(2))  # sample std of 70, 72
    assert table_rows(tables.markdown_table(runs))[0] == [series.label, "0", "100.00", "71.00 ± 1.41", "70.00 ± 1.41",
                                                          "2", "2"]
    assert "71.00 [70.00, 72.00]" in tables.markdown_table(runs, spread="range")
    axes, = plot.accuracy_figure(runs).axes
    band, = axes.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert (ys.min(), ys.max()) == pytest.approx((61 - math.sqrt(2), 71 + math.sqrt(2)))


def test_runs_with_equal_seeds_or_other_flags_are_not_averaged(tmp_path):
    copy = [make(tmp_path, name, [(0, 100.0, 70.0, 69.0)], seed=1) for name in ("a", "b")]
    other = make(tmp_path, "c", [(0, 100.0, 70.0, 69.0)], seed=2, rate=0.3)
    runs, _ = load_runs([*copy, other])
    assert [len(s.runs) for s in group_series(runs)] == [1, 1, 1]
    assert stat([1.0, None, 3.0], "range").text() == "2.00 [1.00, 3.00]" and stat([None]) is None


@pytest.fixture
def ticket_and_controls(tmp_path):
    """A ticket (rounds 0-2) and random-reinit / random-prune controls from its round-1 checkpoint."""
    ticket = make(tmp_path, "ticket", [(0, 100.0, 90.0, 89.0), (1, 80.0, 90.5, 89.5), (2, 64.0, 90.2, 89.2)],
                  struct="rsst", dataset="cifar10", seed=1, branch=None, resume_from=None)
    source = os.path.join(ticket, "1checkpoint.pth.tar")
    controls = [make(tmp_path, kind, [(2, 64.0, 85.0 - i, 84.0 - i)], parent=source, struct="rsst", dataset="cifar10",
                     seed=1, branch=kind, resume_from=source)
                for i, kind in enumerate(("random_reinit", "random_prune"))]
    return ticket, controls


def test_controls_are_drawn_beside_their_ticket_and_listed_with_their_kind(ticket_and_controls):
    ticket, controls = ticket_and_controls
    runs, _ = load_runs([*controls, ticket])
    name = "rsst res20s cifar10 rate=0.5 crit=l1"
    assert [run.label for run in runs] == [name, f"{name} · random prune", f"{name} · random reinit"]
    tree = lineage.lineage_tree(runs).splitlines()
    assert tree[1].startswith(f"├── random prune at round 1: {name} · random prune  rounds 2")
    assert tree[2].startswith(f"└── random reinit at round 1: {name} · random reinit  rounds 2")
    table = tables.markdown_table(runs)
    assert f"| {name} · random reinit | **best val** (round 2) |" in table.replace("  ", "")
    axes, = plot.accuracy_figure(runs).axes
    lines = {line.get_label(): line for line in axes.lines}
    solid, reinit, prune = (lines[label] for label in (name, f"{name} · random reinit", f"{name} · random prune"))
    assert solid.get_color() == reinit.get_color() == prune.get_color()  # the ticket's colour family
    assert (solid.get_linestyle(), reinit.get_linestyle(), prune.get_linestyle()) == ("-", "--", "-.")
    assert lines["dense baseline res20s cifar10: 90.00"].get_ydata()[0] == 90.0  # controls have no round 0
    assert sum(label.startswith("dense baseline") for label in lines) == 1


def test_flops_view_leaves_out_runs_without_flops(tmp_path, capsys):
    flops = {0: 41_000_000, 1: 20_500_000, 2: 10_250_000}
    new = make(tmp_path, "new", curve(0.5, 3, 90), extra=lambda k: {"flops_per_image": flops[k]}, rate=0.5)
    old = make(tmp_path, "old", curve(0.2, 3, 88), rate=0.2)
    runs, _ = load_runs([new, old])
    assert [r.flops_per_image for r in runs[0].rounds] == [41_000_000, 20_500_000, 10_250_000]
    assert plot.left_out(group_series(runs), "flops") == [
        f"left out of the flops plot, {xaxes.FLOPS.missing}: none res20s synthetic rate=0.2"]
    figure = plot.accuracy_figure(runs, x="flops")
    figure.canvas.draw()
    axes, = figure.axes
    assert axes.get_xlabel() == "FLOPs per image" and axes.get_title() == "Accuracy vs FLOPs per image"
    assert [line.get_label() for line in axes.lines][0] == "none res20s synthetic rate=0.5"
    assert list(axes.lines[0].get_xdata()) == [41e6, 20.5e6, 10.25e6]
    # 41M and 10.25M lie between labelled ticks: the limits reach out to 50M and 10M
    assert [label.get_text() for label in axes.get_xticklabels()] == ["50M", "20M", "10M"]
    assert max(axes.get_xlim()) > 50e6 and min(axes.get_xlim()) < 10e6
    assert tables.markdown_table(runs).splitlines()[0].split("|")[4].strip() == "MFLOPs / image"
    assert [row[3] for row in table_rows(tables.markdown_table(runs))[:4]] == ["41.0", "20.5", "10.2", "41.0"]
    out = tmp_path / "out"
    assert report_runs.main([old, "--x", "flops", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: --x flops: nothing to plot, {xaxes.FLOPS.missing}\n"
    assert not out.exists()


def test_throughput_comes_from_compact_exports(tmp_path):
    run = make(tmp_path, "run", curve(0.5, 3, 90), struct="channel")
    write_export(run, 0, masked=1000.0)  # no compact variant: the masked model is what runs
    write_export(run, 1, compact=1800.0, masked=1010.0)
    runs, warnings = load_runs([run])
    assert warnings == []
    speeds = [(r.round, r.throughput and (r.throughput.median, r.throughput.variant)) for r in runs[0].rounds]
    assert speeds == [(0, (1000.0, "masked")), (1, (1800.0, "compact")), (2, None)]
    assert plot.left_out(group_series(runs), "throughput") == [
        f"channel res20s synthetic rate=0.5: round(s) 2 left out of the throughput plot, {xaxes.THROUGHPUT.missing}"]
    axes, = plot.accuracy_figure(runs, x="throughput").axes
    assert list(axes.lines[0].get_xdata()) == [1000.0, 1800.0] and axes.get_xscale() == "linear"
    assert axes.get_xlim()[0] < axes.get_xlim()[1]  # faster to the right
    csv_lines = tables.csv_text(runs).splitlines()
    assert csv_lines[0].split(",") == tables.CSV_COLUMNS
    assert csv_lines[0].split(",")[-6:] == ["throughput_img_s", "throughput_variant", "throughput_device",
                                            "throughput_dtype", "throughput_compile", "throughput_masked_img_s"]
    assert csv_lines[1].split(",")[-6:] == ["1000.0", "masked", "cpu", "fp32", "False", ""]
    assert csv_lines[2].split(",")[-6:] == ["1800.0", "compact", "cpu", "fp32", "False", "1010.0"]
    assert csv_lines[3].endswith(",,,,,,")


def test_controls_of_two_ticket_seeds_are_one_series_even_with_one_control_seed(tmp_path):
    tickets = [make(tmp_path, f"ticket{seed}", [(0, 100.0, 90.0 + seed, 89.0), (1, 80.0, 90.0, 89.0)], seed=seed)
               for seed in (1, 2)]
    sources = [os.path.join(ticket, "1checkpoint.pth.tar") for ticket in tickets]
    controls = [make(tmp_path, f"reinit{i}", [(1, 80.0, 80.0 + 2 * i, 79.0)], parent=source, seed=1,
                     branch="random_reinit", resume_from=source) for i, source in enumerate(sources)]
    runs, _ = load_runs([*tickets, *controls])
    ticket, control = group_series(runs)
    assert (len(ticket.runs), len(control.runs), control.parent) == (2, 2, ticket)
    assert control.label == "none res20s synthetic rate=0.5 · random reinit (2 seeds)"
    assert [(row.round, row.test_top1.text()) for row in control.rows] == [(1, "81.00 ± 1.41")]


def test_each_control_kind_has_its_own_marker_and_a_retrain_point_on_its_ticket_stays_visible(ticket_and_controls,
                                                                                            tmp_path):
    ticket, controls = ticket_and_controls
    source = os.path.join(ticket, "1checkpoint.pth.tar")
    retrain = make(tmp_path, "retrain", [(2, 64.0, 90.2, 89.2)], parent=source, struct="rsst", dataset="cifar10",
                   seed=1, branch="retrain", resume_from=source)  # exactly on the ticket's round-2 point
    runs, _ = load_runs([ticket, *controls, retrain])
    figure = plot.accuracy_figure(runs)
    axes, = figure.axes
    name = "rsst res20s cifar10 rate=0.5 crit=l1"
    kinds = ("random reinit", "random prune", "retrain")
    lines = {line.get_label(): line for line in axes.lines}
    solid, *drawn = [lines[name]] + [lines[f"{name} · {kind}"] for kind in kinds]
    assert len({line.get_marker() for line in [solid, *drawn]}) == 4  # one shape per kind, none the ticket's
    assert [line.get_linestyle() for line in [solid, *drawn[:2]]] == ["-", "--", "-."]  # retrain: its own dashes
    assert {line.get_color() for line in drawn} == {solid.get_color()}  # the ticket's colour, a darker edge
    assert {line.get_markeredgecolor() for line in drawn} == {plot.darker(solid.get_color())}
    for line in drawn:  # hollow, larger and above the ticket: a point on the ticket's point still shows
        assert line.get_markerfacecolor() == "none" and line.get_markersize() > solid.get_markersize()
        assert line.get_zorder() > solid.get_zorder()
    assert (list(lines[f"{name} · retrain"].get_xdata()), list(lines[f"{name} · retrain"].get_ydata())) == (
        [64.0], [90.2]) and (64.0, 90.2) in zip(solid.get_xdata(), solid.get_ydata())
    legend, = figure.legends
    handles = dict(zip([text.get_text() for text in legend.texts], legend.legend_handles))
    assert [handles[f"{name} · {kind}"].get_marker() for kind in kinds] == [line.get_marker() for line in drawn]
    assert handles[name].get_marker() == solid.get_marker()


def test_remaining_axis_reaches_the_next_tick_beyond_the_data(tmp_path):
    run = make(tmp_path, "run", [(0, 100.0, 90.0, 89.0), (1, 50.0, 89.0, 88.0), (2, 35.0, 88.0, 87.0),
                                 (3, 25.0, 87.0, 86.0)])
    runs, _ = load_runs([run])
    axes, = plot.accuracy_figure(runs).axes
    ticks = list(axes.get_xticks())
    assert ticks == [100, 50, 20]  # the 20 tick is reached: 35 % and 25 % lie between 50 and 20
    lo, hi = sorted(axes.get_xlim())
    assert lo < 20 and hi > 100
    assert all(any(t >= x for t in ticks) and any(t <= x for t in ticks) for x in axes.lines[0].get_xdata())
    assert xaxes.one_two_five_bounds(25.0, 100.0) == (20.0, 100.0)
    assert xaxes.one_two_five_bounds(10.25e6, 41e6) == (10e6, 50e6)
    assert xaxes.one_two_five_bounds(3e-3, 80.0) == (1e-3, 100.0)  # over 4 decades: decades only
    with pytest.raises(ValueError):
        xaxes.one_two_five_bounds(0.0, 1.0)


def test_throughput_says_its_dtype_and_compile_setting_and_warns_when_they_mix(tmp_path):
    fp32 = make(tmp_path, "fp32", curve(0.5, 2, 90), struct="channel", rate=0.5)
    bf16 = make(tmp_path, "bf16", curve(0.3, 2, 89), struct="channel", rate=0.3)
    for k in (0, 1):
        write_export(fp32, k, compact=1400.0 + k * 32, masked=1000.0)
        write_export(bf16, k, compact=2800.0 + k * 10, masked=2000.0, dtype="bf16", compile=True)
    runs, _ = load_runs([fp32, bf16])
    rows = table_rows(tables.markdown_table(runs))
    assert [row[-1] for row in rows if row[1] in ("0", "1")] == ["1400 (fp32)", "1432 (fp32)",
                                                                  "2800 (bf16, compiled)", "2810 (bf16, compiled)"]
    csv_rows = list(csv.DictReader(io.StringIO(tables.csv_text(runs))))
    assert [(r["throughput_dtype"], r["throughput_compile"]) for r in csv_rows] == [("fp32", "False")] * 2 + [
        ("bf16", "True")] * 2
    series = group_series(runs)
    warning = ("the throughput plot mixes measurement settings (bf16, compiled: channel res20s synthetic rate=0.3; "
               "fp32: channel res20s synthetic rate=0.5): their img/s are not comparable")
    assert plot.mixed_settings(series, "throughput") == [warning] and plot.mixed_settings(series, "remaining") == []
    axes, = plot.accuracy_figure(runs, x="throughput").axes
    assert axes.get_xlabel() == f"{xaxes.THROUGHPUT.label}\nMIXED settings, not comparable: bf16, compiled | fp32"
    assert [line.get_label() for line in axes.lines if not line.get_label().startswith("_")][:2] == [
        "channel res20s synthetic rate=0.5 [fp32]", "channel res20s synthetic rate=0.3 [bf16, compiled]"]
    alone, = plot.accuracy_figure(runs[:1], x="throughput").axes
    assert alone.get_xlabel() == f"{xaxes.THROUGHPUT.label}, fp32"
    assert alone.lines[0].get_label() == "channel res20s synthetic rate=0.5"  # one setting: said once, on the axis
    out = tmp_path / "out"
    assert report_runs.main([fp32, bf16, "--x", "throughput", "--out", str(out)]) == 0
    assert f"**Warning:** {warning}\n" in (out / "report.md").read_text()


def test_throughput_plot_draws_the_masked_model_faint_beside_the_compact_one(tmp_path):
    run = make(tmp_path, "run", curve(0.5, 3, 90), struct="channel")
    write_export(run, 0, masked=1000.0)  # nothing compact: no faint twin
    write_export(run, 1, compact=1800.0, masked=1010.0)
    write_export(run, 2, compact=2600.0, masked=1020.0)
    runs, _ = load_runs([run])
    assert [r.throughput.masked_median for r in runs[0].rounds] == [None, 1010.0, 1020.0]
    figure = plot.accuracy_figure(runs, x="throughput")
    axes, = figure.axes
    main = axes.lines[0]
    assert list(main.get_xdata()) == [1000.0, 1800.0, 2600.0]
    faint = [line for line in axes.lines if line.get_gid() == "companion" and line.get_linestyle() == "None"]
    assert len(faint) == 1 and faint[0].get_alpha() == plot.COMPANION_ALPHA
    assert (list(faint[0].get_xdata()), list(faint[0].get_ydata())) == ([1010.0, 1020.0], [89.5, 89.0])
    assert faint[0].get_color() == main.get_color() and faint[0].get_marker() == main.get_marker()
    assert min(axes.get_xlim()) < 1000.0 and max(axes.get_xlim()) > 2600.0
    legend, = figure.legends
    assert xaxes.THROUGHPUT.companion_label in [text.get_text() for text in legend.texts]
    remaining_view, = plot.accuracy_figure(runs).axes  # only the throughput view has a companion
    assert not any(line.get_gid() == "companion" for line in remaining_view.lines)
