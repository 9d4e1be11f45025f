"""SIGTERM/Ctrl-C save and exit cleanly; a non-finite loss stops with a named step."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import FAST, ROOT, run_main
from utils import checkpoint, paths

TINY = [*FAST, "--arch", "test_vit", "--struct", "none", "--rate", "0.5"]


def test_sigterm_saves_an_epoch_checkpoint_and_resume_matches(tmp_path):
    args = [*TINY, "--pruning_times", "2", "--epochs", "4", "--deterministic", "--checkpoint_interval", "1000"]
    reference = str(tmp_path / "reference")
    run_main(*args, "--save_dir", reference)
    stopped = str(tmp_path / "stopped")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "main_imp_fillback.py"), *args,
                                "--save_dir", stopped], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics = paths.metrics_file(stopped)
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(metrics) and any(json.loads(line).get("round") == 1 for line in open(metrics)):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err
    saved = checkpoint.load(paths.latest_checkpoint(stopped))
    assert saved["kind"] == "epoch" and saved["round"] == 1 and 1 <= saved["epoch"] < 4
    run_main(*args, "--save_dir", stopped, "--resume")
    ours, theirs = (checkpoint.load(paths.round_checkpoint(d, 1)) for d in (stopped, reference))
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])


def test_nan_loss_stops_with_round_epoch_step_and_keeps_checkpoints(tmp_path):
    directory = str(tmp_path / "nan")
    result = run_main(*TINY, "--pruning_times", "2", "--epochs", "2", "--lr", "1e30", "--warmup", "0",
                      "--save_dir", directory, check=False)
    assert result.returncode == 3, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "round 0 epoch 1 step" in line and "not finite" in line and "--nan_policy skip_batch" in line
    assert not os.path.exists(paths.round_checkpoint(directory, 0))
    assert os.path.isfile(paths.rewind_weights(directory))  # what was written before stays


def test_skip_batch_policy_continues(tmp_path):
    directory = str(tmp_path / "skip")
    result = run_main(*TINY, "--pruning_times", "1", "--epochs", "1", "--lr", "1e30", "--warmup", "0",
                      "--nan_policy", "skip_batch", "--save_dir", directory, check=False)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in open(paths.metrics_file(directory))]
    assert records[0]["type"] == "epoch" and records[0]["skipped_batches"] > 0
