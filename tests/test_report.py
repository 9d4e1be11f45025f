"""report_runs.py / reports/: table, lineage tree, plot and errors, on run dirs written by hand.

The fixtures write lineage.json, metrics.jsonl and config.json in exactly the
format training/rounds.py and utils/tracking.py produce, so these tests run in
well under a second and need no training; one slow test runs the real thing.
"""
import json
import os
import subprocess
import sys

import pytest

import report_runs
from reports import lineage, plot, tables, xaxes
from reports.runs import load_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# round, remaining %, test, val: round 2 has the parent's best *test* top-1 but round 1 its best *validation*
PARENT_ROUNDS = [(0, 100.0, 70.5, 69.0), (1, 50.0, 71.25, 70.0), (2, 25.0, 72.5, 65.5)]
BRANCH_ROUNDS = [(2, 35.0, 72.0, 71.0), (3, 12.25, 64.5, 63.0)]


def config_record(**overrides) -> dict:
    config = {"arch": "res20s", "dataset": "synthetic", "struct": "none", "rate": 0.5, "criteria": "l1",
              "vit_structured": False, "exp_name": "", "epochs": 2, "pruning_times": 3, "save_dir": None}
    config.update(overrides)
    return {"config": config, "config_hash": "0123456789abcdef"}


def write_run(directory, rounds, config, first_parent, extra=None):
    """A run dir as the runner leaves it; `first_parent` is the parent file of the first round;
    `extra(round)` adds a struct mode's round_metrics() to the round record."""
    os.makedirs(directory)
    lineage, lines = {"rounds": [], "config_hash": config["config_hash"], "run_dir": str(directory)}, []
    parent = first_parent
    for index, remaining, test, val in rounds:
        checkpoint = f"{index}checkpoint.pth.tar"
        for epoch in (1, 2):
            lines.append({"type": "epoch", "round": index, "epoch": epoch, "lr": 0.01, "train_loss": 1.5,
                          "train_top1": 60.0, "val_top1": val, "reg_lambda": 0.0, "penalized_l2": 0.0,
                          "remaining_pct": remaining, "epoch_seconds": 1.0, "images_per_second": 100.0})
        lines.append({"type": "round", "round": index, "epochs": 2, "val_top1": val, "best_epoch": 2,
                      "test_top1": test, "train_loss": 1.4, "remaining_pct": remaining,
                      "checkpoint": os.path.join(str(directory), checkpoint),
                      "layer_sparsity": {"conv1.weight": 1 - remaining / 100}, **(extra(index) if extra else {})})
        lineage["rounds"].append({"round": index, "checkpoint": checkpoint, "sha256": "ab" * 32,
                                  "test_top1": test, "val_top1": val, "remaining_pct": remaining,
                                  "parent": parent, "parent_sha256": "cd" * 32 if parent else None})
        parent = os.path.join(str(directory), checkpoint)
        open(os.path.join(directory, checkpoint), "wb").close()
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)
    with open(os.path.join(directory, "lineage.json"), "w") as f:
        json.dump(lineage, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return str(directory)


@pytest.fixture
def sweep(tmp_path):
    """A parent run (rounds 0-2) and a branch started from the parent's round-1 checkpoint."""
    parent = write_run(tmp_path / "runs" / "parent", PARENT_ROUNDS, config_record(),
                       str(tmp_path / "runs" / "parent" / "rewind.pth.tar"))
    branch = write_run(tmp_path / "runs" / "branch", BRANCH_ROUNDS, config_record(rate=0.3, exp_name="br"),
                       os.path.join(parent, "1checkpoint.pth.tar"))
    return parent, branch


def table_rows(table: str) -> list:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[2:]]


def test_table_marks_the_best_validation_round_with_its_test_beside(sweep):
    runs, warnings = load_runs(list(sweep))
    assert warnings == []
    rows = table_rows(tables.markdown_table(runs))
    parent_label = "none res20s synthetic rate=0.5"
    branch_label = "none res20s synthetic rate=0.3 [br]"
    assert rows == [
        [parent_label, "0", "100.00", "70.50", "69.00", "2"],
        [parent_label, "1", "50.00", "71.25", "70.00", "2"],
        [parent_label, "2", "25.00", "72.50", "65.50", "2"],
        # round 2's 72.50 is the best test top-1, but the test set never selects: round 1 has the best val
        [parent_label, "**best val** (round 1)", "50.00", "71.25", "**70.00**", ""],
        [branch_label, "2", "35.00", "72.00", "71.00", "2"],
        [branch_label, "3", "12.25", "64.50", "63.00", "2"],
        [branch_label, "**best val** (round 2)", "35.00", "72.00", "**71.00**", ""],
    ]
    assert [run.best().round for run in runs] == [1, 2]


def test_tree_hangs_the_branch_under_its_parent_at_round_1(sweep):
    parent, branch = sweep
    runs, _ = load_runs([branch, parent])  # order given must not matter
    lines = lineage.lineage_tree(runs).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("none res20s synthetic rate=0.5  rounds 0-2  remaining 100%->25%  "
                               "best val 70.00 (test 71.25) @ 50%  ") and parent in lines[0]
    assert lines[1].startswith("└── branch at round 1: none res20s synthetic rate=0.3 [br]  rounds 2-3")
    assert branch in lines[1] and "not in this report" not in lines[1]


def test_nested_branches_draw_as_a_tree(sweep, tmp_path):
    parent, branch = sweep
    early = write_run(tmp_path / "runs" / "early", [(1, 80.0, 70.0, 69.0)], config_record(rate=0.2),
                      os.path.join(parent, "0checkpoint.pth.tar"))
    deep = write_run(tmp_path / "runs" / "deep", [(3, 20.0, 60.0, 59.0)], config_record(exp_name="deep"),
                     os.path.join(branch, "2checkpoint.pth.tar"))
    runs, _ = load_runs([deep, early, branch, parent])
    prefixes = [line.split(": ")[0] if ": " in line else "" for line in lineage.lineage_tree(runs).splitlines()]
    # siblings sorted by the round they branched at, whatever order the dirs were given in
    assert prefixes == ["", "├── branch at round 0", "└── branch at round 1", "    └── branch at round 2"]
    assert [run.directory for run in runs] == [parent, early, branch, deep]


def test_a_folder_of_runs_is_expanded_and_an_absent_parent_is_named(sweep, tmp_path):
    parent, branch = sweep
    runs, _ = load_runs([str(tmp_path / "runs")])
    assert [run.directory for run in runs] == [parent, branch]
    alone, _ = load_runs([branch])
    assert f"[branched from {parent}/1checkpoint.pth.tar, not in this report]" in lineage.lineage_tree(alone)


def test_cli_writes_a_png_and_report_md(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert report_runs.main([*sweep, "--out", str(out), "--title", "IMP sweep"]) == 0
    png = (out / "accuracy_vs_remaining.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# IMP sweep\n") and "![IMP sweep](accuracy_vs_remaining.png)" in markdown
    assert "| **best val** (round 1) |" in markdown.replace("  ", "")
    assert "```\nnone res20s synthetic rate=0.5" in markdown and "└── branch at round 1" in markdown
    printed = capsys.readouterr().out
    assert "└── branch at round 1" in printed and "71.25" in printed
    assert sorted(os.listdir(out)) == ["accuracy_vs_remaining.png", "report.md", "rounds.csv"]  # no temp files left


def test_bad_path_exits_2_with_one_line_naming_it(tmp_path):
    missing = str(tmp_path / "no_such_run")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "report_runs.py"), missing, "--out",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {missing}: no such directory"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make,needle", [
    (lambda d: d.mkdir(), "not a run dir"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "no finished rounds yet"),
    (lambda d: d.write_text("x"), "not a directory"),
])
def test_unusable_inputs_exit_2(make, needle, tmp_path, capsys):
    target = tmp_path / "target"
    make(target)
    assert report_runs.main([str(target), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(target) in err and needle in err


def test_truncated_and_partial_metrics_lines_are_skipped(sweep):
    parent, _ = sweep
    metrics = os.path.join(parent, "metrics.jsonl")
    with open(metrics) as f:
        lines = f.readlines()
    cut = lines[-1][: len(lines[-1]) // 2]  # round 2's record, cut by a crash mid-write
    with open(metrics, "w") as f:
        f.writelines(lines[:3] + ['{"type": "round", "round": 1\n', "[1, 2]\n"] + lines[3:-1] + [cut])
    os.remove(os.path.join(parent, "lineage.json"))  # metrics.jsonl is now the only source of rounds
    runs, warnings = load_runs([parent])
    assert [(r.round, r.test_top1, r.epochs) for r in runs[0].rounds] == [(0, 70.5, 2), (1, 71.25, 2)]
    assert warnings == [f"{metrics}: skipped 3 unreadable line(s)"]


def test_report_on_a_real_two_round_run(core_run, tmp_path):
    run_dir, result = core_run  # conftest's shared run: res20s rsst, 2 rounds x 1 epoch, --rate 0.5
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "report"
    assert report_runs.main([run_dir, "--out", str(out)]) == 0
    runs, warnings = load_runs([run_dir])
    rows = runs[0].rounds
    assert warnings == [] and [r.round for r in rows] == [0, 1] and 45 < rows[1].remaining_pct < 55
    best = runs[0].best()
    assert best.val_top1 == max(r.val_top1 for r in rows)
    assert f"| **best val** (round {best.round}) |" in tables.markdown_table(runs).replace("  ", "")
    assert (out / "accuracy_vs_remaining.png").read_bytes().startswith(PNG_SIGNATURE)
    with open(out / "rounds.csv") as f:  # the runner's config.json gives the CSV's flag columns
        csv_rows = [line.rstrip("\n").split(",") for line in f][1:]
    assert [row[2:10] for row in csv_rows] == [["res20s", "synthetic", "rsst", "l1", "0.5", "1", "", str(k)]
                                               for k in (0, 1)]


# --struct token: the weights stay at 100 %, the tokens kept per image shrink (pruners/token.py round_metrics)
TOKEN_ROUNDS = [(0, 100.0, 60.0, 61.0), (1, 100.0, 58.5, 59.5), (2, 100.0, 55.25, 60.0)]
TOKENS_KEPT = {0: 65, 1: 33, 2: 17}  # vit_tiny at 32 px: class token + 64 patches, then rate 0.5 per round


@pytest.fixture
def token_and_weight_runs(sweep, tmp_path):
    token = write_run(tmp_path / "runs" / "token", TOKEN_ROUNDS,
                      config_record(struct="token", arch="vit_tiny", rate=0.5),
                      str(tmp_path / "runs" / "token" / "rewind.pth.tar"),
                      extra=lambda k: {"tokens_kept": TOKENS_KEPT[k], "patch_tokens_kept": TOKENS_KEPT[k] - 1,
                                       "token_budget_fraction": (TOKENS_KEPT[k] - 1) / 64})
    return sweep[0], token


def test_token_runs_get_their_own_x_tokens_kept(token_and_weight_runs):
    parent, token = token_and_weight_runs
    runs, warnings = load_runs([parent, token])
    assert warnings == [] and [run.is_token for run in runs] == [False, True]
    rows = table_rows(tables.markdown_table(runs))
    assert rows[4:] == [
        ["token vit_tiny synthetic rate=0.5", "0", "100.00", "65", "60.00", "61.00", "2"],
        ["token vit_tiny synthetic rate=0.5", "1", "100.00", "33", "58.50", "59.50", "2"],
        ["token vit_tiny synthetic rate=0.5", "2", "100.00", "17", "55.25", "60.00", "2"],
        ["token vit_tiny synthetic rate=0.5", "**best val** (round 0)", "100.00", "65", "60.00", "**61.00**", ""],
    ]
    assert rows[3][3] == "-"  # a weight run has no tokens kept
    assert "tokens 65->17  best val 61.00 (test 60.00) @ 65 tokens" in lineage.lineage_tree(runs)
    figure = plot.accuracy_figure(runs, "mixed")
    weights, tokens = figure.axes
    assert (weights.get_xlabel(), tokens.get_xlabel()) == (xaxes.REMAINING.label, xaxes.TOKENS.label)
    assert (weights.get_xscale(), tokens.get_xscale()) == ("log", "linear")
    assert list(tokens.lines[0].get_xdata()) == [65, 33, 17]  # not a vertical line at 100 % weights
    assert list(tokens.lines[0].get_ydata()) == [60.0, 58.5, 55.25]
    assert list(weights.lines[0].get_xdata()) == [100.0, 50.0, 25.0]
    assert tokens.get_xlim()[0] > tokens.get_xlim()[1]  # fewer tokens to the right, as fewer weights are
    ring = next(line for line in tokens.lines if line.get_markersize() == 14)  # the best-validation round
    assert (list(ring.get_xdata()), list(ring.get_ydata())) == ([65], [60.0])


def test_token_run_without_its_metrics_records_is_named_not_plotted_at_100(token_and_weight_runs):
    _, token = token_and_weight_runs
    metrics = os.path.join(token, "metrics.jsonl")
    with open(metrics) as f:
        kept = [line for line in f if '"round": 2' not in line]
    with open(metrics, "w") as f:
        f.writelines(kept)
    runs, warnings = load_runs([token])
    assert [r.round for r in runs[0].rounds] == [0, 1]
    assert warnings == [f"{token}: --struct token round(s) 2 have no tokens_kept in metrics.jsonl, left out"]


def test_without_a_validation_split_no_round_is_called_best(tmp_path):
    run = write_run(tmp_path / "noval", [(0, 100.0, 70.0, None), (1, 50.0, 72.0, None)], config_record(),
                    str(tmp_path / "noval" / "rewind.pth.tar"))
    runs, _ = load_runs([run])
    assert runs[0].best() is None
    assert table_rows(tables.markdown_table(runs))[-1][1] == "no best: no validation split"
    assert "no validation split" in lineage.lineage_tree(runs) and "best val" not in lineage.lineage_tree(runs)
    assert plot.accuracy_plot_png(runs).startswith(PNG_SIGNATURE)


def test_without_matplotlib_the_table_and_tree_still_come_out(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report_runs, "have_matplotlib", lambda: False)  # the core install has no matplotlib
    out = tmp_path / "report"
    assert report_runs.main([sweep[0], "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == ("warning: matplotlib is not installed: no accuracy_vs_remaining.png "
                                    "(pip install matplotlib, or pip install '.[reports]')")
    assert sorted(os.listdir(out)) == ["report.md", "rounds.csv"] and "![" not in (out / "report.md").read_text()
    assert "| **best val** (round 1) |" in captured.out.replace("  ", "")
