"""Lottery-ticket control branches (--branch retrain / random_reinit / random_prune): masks, weights and
rewind points as specified, lineage naming the kind, and the flags they refuse."""
import json

import pytest
import torch

from pruners.masks import random_masks_like
from utils import checkpoint, paths
from utils.cli import main

from conftest import assert_refused

PARENT = ["--dataset", "synthetic", "--arch", "test_vit", "--no_wandb", "--no_progress", "--batch_size", "64",
          "--lr", "0.05", "--struct", "none", "--rate", "0.5", "--epochs", "1", "--val_size", "400",
          "--checkpoint_interval", "0", "--pruning_times", "2", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("controls") / "parent")
    assert main(PARENT + ["--save_dir", directory]) == 0
    return directory


def branch(parent, tmp_path, kind, *extra):
    directory = str(tmp_path / kind)
    assert main(PARENT + ["--save_dir", directory, "--resume_from", paths.round_checkpoint(parent, 1),
                          "--branch", kind, *extra]) == 0
    return directory


def round1(directory):
    return checkpoint.load(paths.round_checkpoint(directory, 1))


def rewind_model(directory):
    return checkpoint.load_file(paths.rewind_weights(directory))["model"]


def test_random_masks_keep_each_layers_count_at_new_positions():
    masks = {"a": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32),
             "b": torch.ones(3, 5, dtype=torch.bool)}
    masks["b"][0, :4] = False
    drawn = random_masks_like(masks, torch.Generator().manual_seed(0))
    assert [int(drawn[n].sum()) for n in masks] == [3, 11]
    assert drawn["a"].dtype == torch.float32 and drawn["a"].shape == (2, 4) and drawn["b"].dtype == torch.bool
    again = random_masks_like(masks, torch.Generator().manual_seed(0))
    assert all(torch.equal(drawn[n], again[n]) for n in masks)
    other = random_masks_like(masks, torch.Generator().manual_seed(1))
    assert not all(torch.equal(drawn[n], other[n]) for n in masks)


def test_retrain_with_the_parents_flags_reproduces_its_round(parent, tmp_path):
    run = branch(parent, tmp_path, "retrain")
    ours, theirs = round1(run), round1(parent)
    assert all(torch.equal(ours["masks"][n], theirs["masks"][n]) for n in theirs["masks"])
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    assert checkpoint.sha256_of(paths.rewind_weights(run)) == checkpoint.sha256_of(paths.rewind_weights(parent))
    with open(paths.lineage_file(run)) as f:
        lineage = json.load(f)
    assert lineage["branch"] == {"kind": "retrain", "from": paths.round_checkpoint(parent, 1)}
    assert [r["round"] for r in lineage["rounds"]] == [1]
    assert lineage["rounds"][0]["parent"] == paths.round_checkpoint(parent, 1)


def test_random_reinit_keeps_the_masks_and_draws_a_new_init(parent, tmp_path):
    run = branch(parent, tmp_path, "random_reinit", "--seed", "7")
    ours, theirs = round1(run), round1(parent)
    assert all(torch.equal(ours["masks"][n], theirs["masks"][n]) for n in theirs["masks"])
    ours_init, parent_init = rewind_model(run), rewind_model(parent)
    name = next(iter(theirs["masks"]))
    assert not torch.equal(ours_init[name], parent_init[name])
    # same init distribution: the per-tensor std agrees within 10 %
    assert abs(ours_init[name].std() / parent_init[name].std() - 1) < 0.1
    assert ours["config"]["branch"] == "random_reinit" and ours["config"]["seed"] == 7


def test_random_prune_keeps_each_layers_sparsity_and_the_parents_rewind_point(parent, tmp_path):
    run = branch(parent, tmp_path, "random_prune")
    ours, theirs = round1(run), round1(parent)
    for name, mask in theirs["masks"].items():
        assert int(ours["masks"][name].sum()) == int(mask.sum())
    assert not all(torch.equal(ours["masks"][n], theirs["masks"][n]) for n in theirs["masks"])
    assert checkpoint.sha256_of(paths.rewind_weights(run)) == checkpoint.sha256_of(paths.rewind_weights(parent))
    for name, mask in ours["masks"].items():  # trained inside its own masks
        assert float(ours["model"][name][~mask].abs().sum()) == 0.0


@pytest.mark.parametrize("extra, message", [
    (["--branch", "retrain"], "error: --branch retrain: needs --resume_from"),
    (["--branch", "random_prune", "--struct", "token", "--rate", "0.5", "--resume_from", "x"],
     "error: --branch random_prune: --struct token has no weight masks"),
])
def test_a_control_without_a_parent_or_masks_is_refused(tmp_path, capsys, extra, message):
    flags = [f for f in PARENT if f not in ("--struct", "none")] if "--struct" in extra else PARENT
    assert_refused(flags + extra, str(tmp_path / "run"), capsys, message)


def test_retrain_under_another_seed_is_refused_but_random_controls_take_one(parent, tmp_path, capsys):
    argv = PARENT + ["--resume_from", paths.round_checkpoint(parent, 1), "--branch", "retrain", "--seed", "7"]
    assert_refused(argv, str(tmp_path / "run"), capsys, "error: --seed 7:")


def test_a_control_needs_the_round_it_retrains_within_pruning_times(parent, tmp_path, capsys):
    argv = [a if a != "2" or i == 0 or PARENT[i - 1] != "--pruning_times" else "1" for i, a in enumerate(PARENT)]
    assert_refused(argv + ["--resume_from", paths.round_checkpoint(parent, 1), "--branch", "retrain"],
                   str(tmp_path / "run"), capsys, "error: --pruning_times 1: the retrain control re-trains round 1")
