"""benchmarks/runner_rates.py: the runner's images/s from each run's last epoch record."""
import json

import pytest

from benchmarks.runner_rates import main, runner_summary
from utils.errors import UsageError


def run_dir(path, rates):
    path.mkdir(parents=True)
    records = [{"type": "epoch", "round": 0, "epoch": i + 1, "images_per_second": r} for i, r in enumerate(rates)]
    records.append({"type": "round", "round": 0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_takes_each_runs_last_epoch(tmp_path):
    run_dir(tmp_path / "plain", [100.0, 400.0])
    run_dir(tmp_path / "fused" / "seed-1", [50.0, 300.0])
    run_dir(tmp_path / "fused" / "seed-2", [60.0, 500.0])
    (tmp_path / "fused" / "notes").mkdir()  # not a run dir: left out
    summary = runner_summary(str(tmp_path / "plain"), str(tmp_path / "fused"))
    assert summary == {"plain_images_per_second": 400.0, "cells_images_per_second": {"seed-1": 300.0, "seed-2": 500.0},
                       "fused_images_per_second": 800.0, "fused_over_plain": 2.0}
    assert main(["--plain", str(tmp_path / "plain"), "--fused", str(tmp_path / "fused"),
                 "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text()) == summary


def test_refusals_name_the_file(tmp_path):
    run_dir(tmp_path / "plain", [])
    with pytest.raises(UsageError, match=r"plain/metrics\.jsonl: no epoch record$"):
        runner_summary(str(tmp_path / "plain"), str(tmp_path))
    with pytest.raises(UsageError, match=r"none/metrics\.jsonl: no such file \(did the run train\?\)$"):
        runner_summary(str(tmp_path / "none"), str(tmp_path))
    run_dir(tmp_path / "p2", [1.0])
    with pytest.raises(UsageError, match=r"empty: no cell run dir \(metrics\.jsonl\) in it$"):
        runner_summary(str(tmp_path / "p2"), str(tmp_path / "empty"))
