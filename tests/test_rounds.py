"""End-to-end round loop on synthetic data: schedule, checkpoints, lineage, resume, branch."""
import json
import os
import shutil

import pytest
import torch

from conftest import FAST, kill_run_when, run_main
from utils import checkpoint, paths


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("runs") / "base")
    result = run_main(*FAST, "--struct", "none", "--rate", "0.5", "--pruning_times", "2", "--epochs", "1",
                      "--save_dir", directory)
    return directory, result.stdout


def test_round_table_checkpoints_and_schedule(finished_run):
    directory, stdout = finished_run
    assert "remaining%" in stdout and "1checkpoint.pth.tar" in stdout
    rounds = [r for r in read_jsonl(paths.metrics_file(directory)) if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["remaining_pct"] == 100.0
    assert rounds[0]["test_top1"] > 20.0  # synthetic data is learnable: chance is 10 %
    payload = checkpoint.load(paths.round_checkpoint(directory, 1))
    masks, model = payload["masks"], payload["model"]
    total = sum(m.numel() for m in masks.values())
    assert abs(sum(int(m.sum()) for m in masks.values()) - total * 0.5) <= len(masks)
    assert "fc.weight" not in masks  # the classifier stays dense by default
    for name, mask in masks.items():
        assert torch.all(model[name][~mask] == 0), name
    for k in (0, 1):
        assert os.path.isfile(paths.round_best(directory, k))
    assert not os.path.exists(paths.latest_checkpoint(directory))


def test_best_round_is_selected_on_validation_not_test(finished_run):
    directory, stdout = finished_run
    rounds = [r for r in read_jsonl(paths.metrics_file(directory)) if r["type"] == "round"]
    for k, record in enumerate(rounds):
        seen = rounds[:k + 1]
        best = max(range(len(seen)), key=lambda i: (seen[i]["val_top1"], i))  # ties: the later round
        assert record["best_round"] == {"round": best, "val_top1": seen[best]["val_top1"],
                                        "test_top1": seen[best]["test_top1"]}
    last = rounds[-1]["best_round"]
    assert f"{last['round']}:{last['test_top1']:.2f}" in stdout.splitlines()[-1]
    assert "best_round" in stdout and "best_test" not in stdout


def test_lineage_chains_rounds_to_the_rewind_root(finished_run):
    directory, _ = finished_run
    lineage = json.load(open(paths.lineage_file(directory)))
    first, second = lineage["rounds"]
    assert first["parent"].endswith("rewind.pth.tar")
    assert first["parent_sha256"] == checkpoint.sha256_of(paths.rewind_weights(directory))
    assert second["parent"] == paths.round_checkpoint(directory, 0)
    assert second["parent_sha256"] == first["sha256"] == checkpoint.sha256_of(paths.round_checkpoint(directory, 0))
    payload = checkpoint.load(paths.round_checkpoint(directory, 1))
    assert payload["lineage"]["config_hash"] == lineage["config_hash"] == payload["config_hash"]
    assert set(payload) >= {"optimizer", "rng", "config", "rewind", "best"} - {"optimizer"}
    assert payload["rewind"]["sha256"] == first["parent_sha256"]


def test_existing_run_needs_resume_and_same_flags(finished_run, tmp_path):
    directory, _ = finished_run
    refused = run_main(*FAST, "--struct", "none", "--rate", "0.5", "--pruning_times", "2", "--epochs", "1",
                       "--save_dir", directory, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    other = run_main(*FAST, "--struct", "none", "--rate", "0.3", "--pruning_times", "2", "--epochs", "1",
                     "--save_dir", directory, "--resume", check=False)
    assert other.returncode == 2 and "rate: 0.5 -> 0.3" in other.stderr
    done = run_main(*FAST, "--struct", "none", "--rate", "0.5", "--pruning_times", "2", "--epochs", "1",
                    "--save_dir", directory, "--resume")
    assert "nothing to run" in done.stdout


def test_resume_extends_a_finished_run_and_skips_a_corrupt_newest(finished_run, tmp_path):
    directory = str(tmp_path / "copy")
    shutil.copytree(finished_run[0], directory)
    with open(paths.round_checkpoint(directory, 1), "r+b") as f:
        f.truncate(1000)
    result = run_main(*FAST, "--struct", "none", "--rate", "0.5", "--pruning_times", "3", "--epochs", "1",
                      "--save_dir", directory, "--resume")
    assert "skipping unusable checkpoint" in result.stderr and "1checkpoint.pth.tar" in result.stderr
    rounds = [r for r in read_jsonl(paths.metrics_file(directory)) if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert abs(rounds[2]["remaining_pct"] - 25.0) < 0.1
    assert checkpoint.load(paths.round_checkpoint(directory, 1))["round"] == 1


def test_branch_records_its_parent(finished_run, tmp_path):
    parent_dir, _ = finished_run
    parent = paths.round_checkpoint(parent_dir, 1)
    branch = str(tmp_path / "branch")
    run_main(*FAST, "--struct", "none", "--rate", "0.2", "--pruning_times", "3", "--epochs", "1",
             "--save_dir", branch, "--resume_from", parent)
    lineage = json.load(open(paths.lineage_file(branch)))
    assert [r["round"] for r in lineage["rounds"]] == [2]
    assert lineage["rounds"][0]["parent"] == os.path.abspath(parent)
    assert lineage["rounds"][0]["parent_sha256"] == checkpoint.sha256_of(parent)
    assert abs(lineage["rounds"][0]["remaining_pct"] - 40.0) < 0.1  # 50 % x (1 - 0.2)
    assert os.path.isfile(paths.rewind_weights(branch))


def test_branch_from_wrong_architecture_is_refused(finished_run, tmp_path):
    parent = paths.round_checkpoint(finished_run[0], 1)
    result = run_main(*FAST[:2], "--arch", "res56s", "--no_wandb", "--struct", "none", "--epochs", "1",
                      "--save_dir", str(tmp_path / "b"), "--resume_from", parent, check=False)
    assert result.returncode == 2 and "1checkpoint.pth.tar" in result.stderr and "--arch res20s" in result.stderr
    assert not os.path.exists(tmp_path / "b")


@pytest.mark.slow  # the default suite has test_crash_resume.py::test_kill_mid_epoch_resumes_bit_identically
def test_killed_run_resumes_bit_identically(tmp_path):
    args = [*FAST, "--arch", "test_vit", "--struct", "rsst", "--vit_structured", "--rate", "0.5",
            "--pruning_times", "2", "--epochs", "3", "--deterministic", "--checkpoint_interval", "0",
            "--criteria", "saliency"]
    reference = str(tmp_path / "reference")
    run_main(*args, "--save_dir", reference)
    killed = str(tmp_path / "killed")
    kill_run_when(args, killed, lambda r: r.get("round") == 1 and r.get("epoch") == 1)
    run_main(*args, "--save_dir", killed, "--resume")
    ours, theirs = (checkpoint.load(paths.round_checkpoint(d, 1)) for d in (killed, reference))
    for name in theirs["model"]:
        assert torch.equal(ours["model"][name], theirs["model"][name]), name
    for name in theirs["masks"]:
        assert torch.equal(ours["masks"][name], theirs["masks"][name]), name
    keys = ("round", "epoch", "train_loss", "val_top1", "test_top1", "remaining_pct", "reg_lambda")

    def comparable(directory):
        return [{k: r.get(k) for k in keys} for r in read_jsonl(paths.metrics_file(directory))]
    assert comparable(killed) == comparable(reference)
