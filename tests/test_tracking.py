"""Tracking sinks: metrics.jsonl + log.txt always; wandb offline by default, a clean fallback without it."""
import builtins
import glob
import json
import os

import pytest

from conftest import FAST, run_main
from utils.cli import parse_config
from utils.tracking import Tracker, run_name, truncate_metrics


def test_wandb_offline_run_is_written_into_the_run_dir(tmp_path):
    pytest.importorskip("wandb")
    directory = str(tmp_path / "run")
    flags = [f for f in FAST if f != "--no_wandb"]
    result = run_main(*flags, "--arch", "test_vit", "--struct", "rsst", "--vit_structured", "--pruning_times",
                      "1", "--epochs", "1", "--save_dir", directory, "--wandb_mode", "offline", wandb_env=None)
    runs = glob.glob(os.path.join(directory, "wandb", "offline-run-*"))
    assert len(runs) == 1, os.listdir(directory)
    state = json.load(open(os.path.join(directory, "wandb_state.json")))
    assert runs[0].endswith(f"-{state['run_id']}") and state["logged"] == 2  # the epoch and the round record
    assert "deprecat" not in result.stderr.lower(), result.stderr  # no reinit=True warning


def test_missing_wandb_warns_once_and_keeps_local_logs(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    config = parse_config(["--dataset", "synthetic", "--vit_structured", "--arch", "vit_tiny"])
    tracker = Tracker(str(tmp_path), config, resuming=False)
    tracker.epoch({"round": 0, "epoch": 1, "val_top1": 50.0})
    tracker.close()
    err = capsys.readouterr().err
    assert err.count("wandb is not installed") == 1
    record = json.loads(open(tmp_path / "metrics.jsonl").read())
    assert record == {"type": "epoch", "round": 0, "epoch": 1, "val_top1": 50.0}
    assert "wandb is not installed" in open(tmp_path / "log.txt").read()


def test_run_name_says_head_level():
    config = parse_config(["--arch", "vit_tiny", "--struct", "rsst", "--vit_structured", "--rate", "0.3",
                           "--criteria", "magnitude"])
    assert run_name(config) == "rsst_head_vit_tiny_cifar100_rate0.3_magnitude"


def test_truncate_drops_records_after_the_resume_point_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"type": "epoch", "round": 0, "epoch": 1}, {"type": "epoch", "round": 0, "epoch": 2},
             {"type": "round", "round": 0}, {"type": "epoch", "round": 1, "epoch": 1},
             {"type": "epoch", "round": 1, "epoch": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "ep')
    truncate_metrics(str(tmp_path), 1, 1, round_complete=False)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == lines[:4]
