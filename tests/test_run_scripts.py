"""Sweep scripts are resumable: a finished run is skipped, saved configs replay exactly."""
import json
import os
import subprocess

import pytest

from conftest import ROOT
from utils.cli import parse_config
from utils.replay_flags import flags_for


def test_replayed_flags_rebuild_the_same_config():
    config = parse_config(["--arch", "vit_tiny", "--struct", "rsst", "--vit_structured", "--criteria", "l2",
                           "--rate", "0.3", "--decreasing_lr", "20,30", "--epochs", "40", "--no_wandb",
                           "--exp_name", "x", "--no_progress", "--no_cuda_graph",
                           "--compile", "off", "--nan_policy", "skip_batch"])
    again = parse_config(flags_for(config))
    assert again == config


def test_sweep_script_runs_then_skips(tmp_path):
    env = dict(os.environ, ARCH="test_vit", DATASET="synthetic", RATES="0.5", ROUNDS="2", EPOCHS="1",
               OUT=str(tmp_path), STRUCT="none", WANDB_MODE="disabled")
    extra = ["--no_wandb", "--no_progress", "--batch_size", "64", "--lr", "0.05"]
    script = os.path.join(ROOT, "run_scripts", "sweep_rates.sh")
    first = subprocess.run(["bash", script, *extra], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "synthetic_none_test_vit_rate0.5"
    assert (run_dir / "1checkpoint.pth.tar").is_file()
    again = subprocess.run(["bash", script, *extra], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to run" in again.stdout
    resumed = subprocess.run(["bash", os.path.join(ROOT, "run_scripts", "resume_sweep.sh"), str(tmp_path)],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "nothing to run" in resumed.stdout, resumed.stderr
    saved = json.load(open(run_dir / "config.json"))["config"]
    assert saved["rate"] == 0.5 and saved["arch"] == "test_vit"


def test_a_branch_replays_its_resume_from_so_resume_sweep_restarts_the_branch(tmp_path):
    """resume_sweep.sh on a branch killed before its first checkpoint must start the branch again,
    not a dense round 0: the replayed flags keep --resume_from (absolute, so any cwd works)."""
    os.chdir(tmp_path)
    try:
        config = parse_config(["--arch", "res20s", "--struct", "none", "--resume_from", "p/1checkpoint.pth.tar"])
    finally:
        os.chdir(ROOT)
    flags = flags_for(config)
    assert flags[flags.index("--resume_from") + 1] == str(tmp_path / "p" / "1checkpoint.pth.tar")
    assert "--resume" not in flags and "--save_dir" not in flags
    assert parse_config(flags) == config


def test_vlm_cifar_script_refuses_bad_budgets_before_any_work(tmp_path):
    """BUDGETS names the pruning runs of run_scripts/vlm_cifar.sh: a wrong or empty one stops it in one line
    (exit 2) before the training starts, and nothing is written."""
    script = os.path.join(ROOT, "run_scripts", "vlm_cifar.sh")
    for budgets, message in (("t25 t10", "error: BUDGETS: t10 is not one of t75 t50 t25"),
                             (" ", "error: BUDGETS is empty: name one or more of t75 t50 t25")):
        env = dict(os.environ, BUDGETS=budgets, OUT=str(tmp_path / "out"), DATA=str(tmp_path / "none"))
        done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.strip() == message, done.stderr
    assert not (tmp_path / "out").exists()


def test_fused_bench_script_refuses_bad_settings_before_any_work(tmp_path):
    """run_scripts/fused_bench.sh: every setting is checked first (the runner part's flags by the runner's own
    parser); anything wrong stops it in one line (exit 2) before any measurement, and nothing is written."""
    script = os.path.join(ROOT, "run_scripts", "fused_bench.sh")
    cases = [({"PARTS": "compile speed"}, [], "error: PARTS: speed is not one of compile kernels runner sweep table"),
             ({"PARTS": ""}, [], "error: PARTS is empty: name one or more of compile kernels runner sweep table"),
             ({"DEVICE": "tpu"}, [], "error: DEVICE=tpu: cuda or cpu"),
             ({"STEPS": "abc"}, [], "error: STEPS=abc: a positive whole number"),
             ({"DEVICE": "cpu", "EPOCHS": "0"}, [], "error: EPOCHS=0: a positive whole number"),
             ({"SWEEP_EXECUTORS": "fussed"}, [], "error: SWEEP_EXECUTORS=fussed: fused, local or fused,local"),
             ({"MERGE": "nope.json"}, [], f"error: MERGE={tmp_path}/nope.json: no such file"),
             ({}, ["--epochs", "1"], "error: fused_bench.sh takes no arguments (settings are environment variables: "
                                     "OUT, PARTS, ...)")]
    for env_vars, args, message in cases:
        env = dict(os.environ, OUT="out", RUNS="runs", **env_vars)
        done = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.strip() == message, (env_vars, done.stderr)
    env = dict(os.environ, OUT="out", RUNS="runs", DEVICE="cpu", DATASET="cifar1O", PARTS="compile runner")
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[0].startswith("error: --dataset") and lines[-1] == (
        "error: the runner part's flags (DATASET, DATA, BATCH, EPOCHS) were refused, see the line above"), done.stderr
    assert sorted(os.listdir(tmp_path)) == []  # no OUT, no RUNS


@pytest.mark.slow
def test_fused_bench_runner_part_on_the_cpu(tmp_path):
    """The runner part end to end on synthetic data: one plain run and 2 fused cells (the CPU size), each with its
    own run dir and checkpoint, summarised from their metrics.jsonl into runner.json; relative OUT and RUNS are
    taken from the caller's folder."""
    env = dict(os.environ, OUT="out", RUNS="runs", DEVICE="cpu", DATASET="synthetic", PARTS="runner",
               OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    done = subprocess.run(["bash", os.path.join(ROOT, "run_scripts", "fused_bench.sh")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.load(open(tmp_path / "out" / "runner.json"))
    assert sorted(os.listdir(tmp_path / "out")) == ["runner.json", "runner_fused.log", "runner_plain.log"]
    cells = summary["cells_images_per_second"]
    assert sorted(cells) == ["seed-1", "seed-2"] and all(rate > 0 for rate in cells.values())
    assert summary["fused_images_per_second"] == sum(cells.values()) > 0 and summary["plain_images_per_second"] > 0
    runs = tmp_path / "runs" / "runner"
    assert all((runs / "fused" / name / "0checkpoint.pth.tar").is_file() for name in cells)
    assert (runs / "plain" / "0checkpoint.pth.tar").is_file()
    assert "2 fused cells" in done.stdout
