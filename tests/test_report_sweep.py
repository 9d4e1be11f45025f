"""report_runs.py on sweep folders (sweep.json as sweep.py writes it) and plain folders of runs: the
per-sweep table (rows: grid values but the seed; columns: rounds), the summary table, rounds.csv and
the refusals (not a run dir, a broken sweep.json) before anything is written."""
import csv
import json
import os

import pytest

import report_runs
from reports import tables
from reports.runs import load_runs
from reports.sweep import read_sweep, sweep_table
from test_report import config_record, table_rows, write_run

# (criteria, rate) -> {seed: [(round, remaining %, test, val)]}; seed 2 of (remain, 0.5) has not finished a round
RESULTS = {
    ("l1", "0.2"): {"1": [(0, 100.0, 90.0, 89.0), (1, 80.0, 91.0, 90.0)],
                    "2": [(0, 100.0, 92.0, 91.0), (1, 80.0, 89.0, 88.0)]},
    ("l1", "0.5"): {"1": [(0, 100.0, 90.0, 89.0), (1, 50.0, 88.0, 87.0)],
                    "2": [(0, 100.0, 90.0, 89.0), (1, 50.0, 86.0, 85.0)]},
    ("remain", "0.2"): {"1": [(0, 100.0, 91.0, 90.0), (1, 80.0, 90.5, 90.5)],
                        "2": [(0, 100.0, 91.0, 90.0), (1, 80.0, 90.5, 90.5)]},
    ("remain", "0.5"): {"1": [(0, 100.0, 91.0, 90.0), (1, 50.0, 87.0, 86.0), (2, 25.0, 80.0, 79.0)], "2": None},
}


@pytest.fixture
def sweep_folder(tmp_path):
    """<tmp>/sweeps/crit_rate: 8 cells (criteria x rate x seed), one cell still without a finished round."""
    folder = tmp_path / "sweeps" / "crit_rate"
    cells = []
    for (criteria, rate), seeds in RESULTS.items():
        for seed, rounds in seeds.items():
            name = f"criteria-{criteria}_rate-{rate}_seed-{seed}"
            if rounds:
                write_run(folder / name, rounds, config_record(struct="rsst", criteria=criteria, rate=float(rate),
                                                               seed=int(seed), save_dir=str(folder / name)),
                          str(folder / name / "rewind.pth.tar"))
            cells.append({"name": name, "values": {"criteria": criteria, "rate": rate, "seed": seed}, "run_dir": name,
                          "command": ["python", "main_imp_fillback.py", "--criteria", criteria]})
    record = {"name": "crit_rate", "grid": {"criteria": ["l1", "remain"], "rate": ["0.2", "0.5"], "seed": ["1", "2"]},
              "runner_flags": ["--struct", "rsst"], "executor": "local", "cells": cells}
    (folder / "sweep.json").write_text(json.dumps(record))
    return str(folder)


def test_sweep_table_rows_are_grid_values_columns_rounds(sweep_folder):
    runs, warnings = load_runs([sweep_folder])
    assert len(runs) == 7 and warnings == []
    rows = table_rows(sweep_table(read_sweep(sweep_folder), runs))
    assert rows == [
        ["l1", "0.2", "2/2", "91.00 ± 1.41 @ 100%", "90.00 ± 1.41 @ 80%", "-",
         "round 0: 91.00 ± 1.41 @ 100% (val 90.00 ± 1.41)"],
        ["l1", "0.5", "2/2", "90.00 @ 100%", "87.00 ± 1.41 @ 50%", "-", "round 0: 90.00 @ 100% (val 89.00)"],
        ["remain", "0.2", "2/2", "91.00 @ 100%", "90.50 @ 80%", "-", "round 1: 90.50 @ 80% (val 90.50)"],
        ["remain", "0.5", "1/2", "91.00 @ 100%", "87.00 @ 50%", "80.00 @ 25%", "round 0: 91.00 @ 100% (val 90.00)"],
    ]
    header = sweep_table(read_sweep(sweep_folder), runs, spread="range").splitlines()[0]
    assert [cell.strip() for cell in header.split("|")[1:-1]] == [
        "criteria", "rate", "seeds", "round 0", "round 1", "round 2", "best (val)"]
    assert "91.00 [90.00, 92.00] @ 100%" in sweep_table(read_sweep(sweep_folder), runs, spread="range")


def test_cli_on_a_sweep_writes_its_table_and_csv(sweep_folder, tmp_path, capsys):
    out = tmp_path / "report"
    assert report_runs.main([os.path.dirname(sweep_folder), "--out", str(out), "--title", "criteria x rate"]) == 0
    markdown = (out / "report.md").read_text()
    assert "## Sweep crit_rate\n\n| criteria | rate | seeds |" in markdown and "## Summary" not in markdown
    assert "| remain   |  0.5 |   1/2 |" in markdown
    with open(out / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 and list(rows[0]) == tables.CSV_COLUMNS
    first = rows[0]
    assert (first["arch"], first["criteria"], first["rate"], first["seed"], first["round"], first["test_top1"],
            first["branch"], first["flops_per_image"]) == ("res20s", "l1", "0.2", "1", "0", "90.0", "", "")
    assert "(2 seeds)" in capsys.readouterr().out


def test_a_folder_without_sweep_json_gets_a_summary_by_differing_flags(tmp_path):
    for rate, seed, test in ((0.2, 1, 90.0), (0.2, 2, 92.0), (0.5, 1, 85.0)):
        write_run(tmp_path / "runs" / f"r{rate}s{seed}", [(0, 100.0, 91.0, 90.0), (1, 100 * (1 - rate), test, test)],
                  config_record(rate=rate, seed=seed), str(tmp_path / "rewind.pth.tar"))
    runs, _ = load_runs([str(tmp_path / "runs")])
    assert table_rows(tables.summary_table(runs)) == [
        ["0.2", "start", "2", "91.00 @ 100%", "91.00 ± 1.41 @ 80%",
         "round 1: 91.00 ± 1.41 @ 80% (val 91.00 ± 1.41)", "r0.2s1, r0.2s2"],
        ["0.5", "start", "1", "91.00 @ 100%", "85.00 @ 50%", "round 0: 91.00 @ 100% (val 90.00)", "r0.5s1"],
    ]
    header = tables.summary_table(runs).splitlines()[0].split("|")
    assert (header[1].strip(), header[-2].strip()) == ("rate", "run dir")


def test_summary_names_a_ticket_ticket_and_traces_each_row_to_its_run_dir(tmp_path):
    ticket = write_run(tmp_path / "runs" / "ticket", [(0, 100.0, 90.0, 89.0), (1, 80.0, 90.5, 89.5)],
                       config_record(branch=None), str(tmp_path / "runs" / "ticket" / "rewind.pth.tar"))
    source = os.path.join(ticket, "0checkpoint.pth.tar")
    kinds = ("continue", "retrain", "random_reinit")
    for i, kind in enumerate(kinds):
        write_run(tmp_path / "runs" / kind, [(1, 80.0, 88.0 - i, 87.0 - i)],
                  config_record(branch=kind, resume_from=source, exp_name=kind), source)
    runs, _ = load_runs([str(tmp_path / "runs")])
    rows = table_rows(tables.summary_table(runs))
    assert [(row[0], row[-1]) for row in rows] == [("ticket", "ticket"), ("ticket", "continue"),
                                                   ("random_reinit", "random_reinit"), ("retrain", "retrain")]
    assert "None" not in tables.summary_table(runs)


@pytest.mark.parametrize("content,reason", [
    ("{not json", "unreadable sweep record (JSONDecodeError: "),
    ('{"grid": {"rate": ["0.2"]}, "cells": [{"values": {"rate": "0.2"}}]}',
     "not a sweep.json sweep.py wrote (needs a 'grid' object and 'cells'"),
])
def test_a_broken_sweep_json_is_refused_before_writing(sweep_folder, tmp_path, capsys, content, reason):
    with open(os.path.join(sweep_folder, "sweep.json"), "w") as f:
        f.write(content)
    out = tmp_path / "out"
    assert report_runs.main([sweep_folder, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {sweep_folder}/sweep.json: {reason}")
    assert err.count("\n") == 1 and not out.exists()


def test_a_folder_that_holds_no_run_is_refused_in_one_line(tmp_path, capsys):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "results.txt").write_text("acc 90\n")
    out = tmp_path / "out"
    assert report_runs.main([str(folder), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {folder}: not a run dir (no config.json, lineage.json or "
                                       f"metrics.jsonl here or below)\n")
    assert not out.exists()
