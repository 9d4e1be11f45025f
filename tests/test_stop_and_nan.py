"""SIGTERM/Ctrl-C stop at the next training step, save and exit; a non-finite loss or non-finite weights
stop with the round, epoch and last good checkpoint named, and are never saved."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from conftest import FAST, ROOT, run_main
from training.loop import train_epoch
from training.step import TrainStep
from utils import checkpoint, paths

TINY = [*FAST, "--arch", "test_vit", "--struct", "none", "--rate", "0.5"]
# 300 training images in batches of 16: 18 steps an epoch, each a step boundary to stop at
SMALL_STEPS = [*TINY, "--val_size", "2700", "--batch_size", "16", "--print_freq", "1", "--deterministic",
               "--checkpoint_interval", "1000"]


def start(args, directory):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main_imp_fillback.py"), *args, "--save_dir",
                             directory], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def terminate_at(process, marker, timeout=600):
    """Send SIGTERM once a stdout line contains `marker`; returns seconds from the signal to the exit."""
    deadline = time.time() + timeout
    for line in process.stdout:
        if marker in line:
            break
        assert time.time() < deadline, "the run never reached the stop point"
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    return time.time() - sent


def test_sigterm_stops_at_the_next_step_with_a_mid_epoch_checkpoint(tmp_path):
    directory = str(tmp_path / "stopped")
    process = start([*SMALL_STEPS, "--pruning_times", "1", "--epochs", "1"], directory)
    seconds = terminate_at(process, "round 0 epoch 1/1 step 2/18")
    err = process.stderr.read()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert seconds < 15, seconds  # was: the whole epoch first (89-243 s on the CPU for a real one)
    assert "SIGTERM" in err and "--resume" in err and "latest.pth.tar" in err.strip().splitlines()[-1]
    saved = checkpoint.load(paths.latest_checkpoint(directory))
    assert saved["kind"] == "epoch" and saved["round"] == 0 and saved["epoch"] == 0
    assert 2 <= saved["scheduler"]["batch"] < 18 and saved["scheduler"]["steps_per_epoch"] == 18
    sums = saved["epoch_sums"]
    assert sums["seen"] == 16 * saved["scheduler"]["batch"] and sums["skipped"] == 0
    assert int(sums["counters"]["step_index"]) == saved["scheduler"]["batch"]
    assert float(sums["counters"]["loss_sum"]) > 0 and int(sums["counters"]["first_bad"]) == -1
    # stopped inside a round's first epoch: metrics.jsonl has no record of the round yet, and the resume
    # (which checks it against the checkpoints) once failed with KeyError there
    resumed = run_main(*SMALL_STEPS, "--pruning_times", "1", "--epochs", "1", "--save_dir", directory, "--resume")
    assert "Traceback" not in resumed.stderr and os.path.isfile(paths.round_checkpoint(directory, 0))
    with open(paths.metrics_file(directory)) as f:
        kinds = [(r["type"], r["round"], r.get("epoch")) for r in map(json.loads, f)]
    assert kinds == [("epoch", 0, 1), ("round", 0, None)]


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path):
    args = [*SMALL_STEPS, "--pruning_times", "2", "--epochs", "2"]
    reference = str(tmp_path / "reference")
    run_main(*args, "--save_dir", reference)
    stopped = str(tmp_path / "stopped")
    process = start(args, stopped)
    terminate_at(process, "round 1 epoch 2/2 step 5/18")
    assert process.returncode == 128 + signal.SIGTERM, process.stderr.read()
    assert checkpoint.load(paths.latest_checkpoint(stopped))["scheduler"]["batch"] >= 5
    run_main(*args, "--save_dir", stopped, "--resume")
    for round_index in (0, 1):
        ours, theirs = (checkpoint.load(paths.round_checkpoint(d, round_index)) for d in (stopped, reference))
        assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
        assert all(torch.equal(ours["masks"][k], theirs["masks"][k]) for k in theirs["masks"])
    timing = {"epoch_seconds", "train_seconds", "images_per_second", "checkpoint", "time", "timestamp"}

    def records(directory):
        with open(paths.metrics_file(directory)) as f:
            return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in f]
    assert records(stopped) == records(reference)


def test_nan_loss_stops_with_round_epoch_step_and_keeps_checkpoints(tmp_path):
    directory = str(tmp_path / "nan")
    result = run_main(*TINY, "--val_size", "2700", "--pruning_times", "2", "--epochs", "2", "--lr", "1e30",
                      "--warmup", "0", "--save_dir", directory, check=False)
    assert result.returncode == 3, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "round 0 epoch 1 step" in line and "not finite" in line and "--nan_policy skip_batch" in line
    assert not os.path.exists(paths.round_checkpoint(directory, 0))
    assert os.path.isfile(paths.rewind_weights(directory))  # what was written before stays


@pytest.mark.parametrize("flags,needle", [
    (["--lr", "1e38", "--weight_decay", "100"], "41 of 80 weight tensors are not finite (pos_embed, "),
    (["--lr", "1e38"], "--nan_policy skip_batch skipped 3 of 4 batches for a non-finite loss"),  # finite, useless
])
def test_skip_batch_never_saves_non_finite_weights(flags, needle, tmp_path):
    """Issue 16 §7b: an exploding run under skip_batch saved a round with 63/128 tensors non-finite and
    train_loss 0.0, exit 0."""
    directory = str(tmp_path / "skip")
    result = run_main(*TINY, "--val_size", "2700", "--pruning_times", "2", "--epochs", "1", *flags,
                      "--warmup", "0", "--nan_policy", "skip_batch", "--save_dir", directory, check=False)
    assert result.returncode == 3, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: round 0 epoch 1: ") and needle in line, line
    assert f"(last good checkpoint: {paths.rewind_weights(directory)}); lower --lr" in line
    assert not os.path.exists(paths.round_checkpoint(directory, 0))
    assert not os.path.exists(paths.latest_checkpoint(directory))
    with open(paths.metrics_file(directory)) as f:
        assert f.read() == ""  # no epoch record for the broken epoch either


def test_skip_batch_skips_a_non_finite_batch_and_trains_on_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    weights = {"1.weight": model[1].weight}
    step = TrainStep(model, weights, torch.device("cpu"), "none", momentum=0.9, weight_decay=0.0,
                     regularized=False, use_graph=False, skip_nonfinite=True)
    good = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    poisoned = (torch.full((4, 3, 2, 2), float("nan")), torch.tensor([0, 1, 2, 0]))
    result = train_epoch(model, step, [good[0], poisoned, good[1], good[2]], lambda i: (0.1, 0.0))
    assert (result.skipped, result.samples, result.bad_step) == (1, 12, None)
    assert all(torch.isfinite(p).all() for p in model.parameters()) and result.loss > 0


def test_signal_during_a_log_write_only_records_the_request(tmp_path):
    """The handler must not write: a SIGTERM landing inside the run log's own write once raised
    'reentrant call inside BufferedWriter' and the run died with exit 1 instead of saving."""
    from utils.interrupts import StopRequest
    lines = []
    with open(tmp_path / "log.txt", "wb") as handle:
        def log(message):
            lines.append(message)
            handle.write(message.encode())
        with StopRequest(log=log) as stop:
            stop._handle(signal.SIGTERM, None)  # as the interpreter calls it, between two bytecodes of a write
            assert lines == [] and stop.signum == signal.SIGTERM
            assert stop.requested and stop.requested
    assert len(lines) == 1 and lines[0].startswith("SIGTERM received: stopping after this training step")
