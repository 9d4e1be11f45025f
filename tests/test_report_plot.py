"""reports/plot.py and reports/series.py on hand-written run dirs: fixed ticks, the legend outside the
panels, one baseline per (arch, dataset), seeds as one line in a band, lottery-ticket controls, and
the FLOPs / throughput views (fake compact/round_<k>.json exports)."""
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


def write_export(run_dir, round_index, compact=None, masked=None):
    """compact/round_<k>.json as export_compact.py writes it; a variant's img/s median m has quartiles m -+ 5 %."""
    def variant(median):
        return {"params": 1000, "flops_per_image": 10 ** 6, "latency_ms_b1": {"median": 1.0, "p25": 0.9, "p75": 1.1},
                "throughput_img_s_b256": {"median": median, "p25": median * 0.95, "p75": median * 1.05}}
    variants = {"dense": variant(1000.0)}
    variants.update({name: variant(v) for name, v in (("compact", compact), ("masked", masked)) if v is not None})
    os.makedirs(os.path.join(run_dir, "compact"), exist_ok=True)
    with open(os.path.join(run_dir, "compact", f"round_{round_index}.json"), "w") as f:
        json.dump({"round": round_index, "device": "cpu", "dtype": "float32", "compile": False, "out_dir": "x",
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
    for axes, ticks in ((resnet, [100, 50, 20, 10, 5, 2]), (vit, [100, 50, 20, 10])):
        assert axes.get_xscale() == "log" and axes.get_xlim()[0] > axes.get_xlim()[1]  # fewer weights to the right
        assert list(axes.get_xticks()) == ticks
        assert [label.get_text() for label in axes.get_xticklabels()] == [f"{t:g}" for t in ticks]
        assert list(axes.xaxis.get_minorticklocs()) == []
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
    assert [label.get_text() for label in axes.get_xticklabels()] == ["20M", "10M"]
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
    assert csv_lines[2].split(",")[-3:] == ["1800.0", "compact", "cpu"] and csv_lines[3].endswith(",,,")


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
