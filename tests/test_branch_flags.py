"""Branches and resumes that would silently mean something else: each flag a checkpoint's meaning
depends on is honoured exactly or refused in one line naming the flag and the file (exit 2, nothing
written); `--resume --resume_from`; the last round's bookkeeping after a kill; damaged history files."""
import json
import os
import shutil

import pytest
import torch

from utils import checkpoint, paths
from utils.cli import main

PARENT = ["--dataset", "synthetic", "--arch", "test_vit", "--no_wandb", "--no_progress", "--batch_size", "64",
          "--lr", "0.05", "--struct", "none", "--rate", "0.5", "--epochs", "2", "--val_size", "2400",
          "--prune_type", "rewind_lt", "--rewind_epoch", "1", "--checkpoint_interval", "0"]
ROUNDS = ["--pruning_times", "2"]
BRANCH = ["--pruning_times", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """Two rounds of --prune_type rewind_lt --rewind_epoch 1 (tests copy it before changing anything)."""
    directory = str(tmp_path_factory.mktemp("branch") / "parent")
    assert main(PARENT + ROUNDS + ["--save_dir", directory]) == 0
    return directory


def error_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error:")], err


def copy_of(directory, tmp_path, name="run"):
    target = str(tmp_path / name)
    shutil.copytree(directory, target)
    return target


@pytest.mark.parametrize("flags,needle", [
    (["--rewind_epoch", "0"], "--rewind_epoch 0: {path} was made with --rewind_epoch 1"),
    (["--seed", "2"], "--seed 2: {path} was made with --seed 1"),
    (["--val_size", "1800"], "--val_size 1800: {path} was made with --val_size 2400"),
    (["--struct", "refill"], "--struct refill: {path} was made with --struct none"),
    (["--prune_type", "lt"], "--prune_type lt: {path} was made with --prune_type rewind_lt"),
])
def test_branch_flag_the_parent_cannot_honour_is_refused(parent, tmp_path, capsys, flags, needle):
    source = paths.round_checkpoint(parent, 1)
    branch = tmp_path / "branch"
    base = PARENT[:-4] + PARENT[-2:] if flags[0] == "--prune_type" else PARENT  # lt refuses --rewind_epoch
    code = main(base + BRANCH + flags + ["--save_dir", str(branch), "--resume_from", source])
    lines, err = error_lines(capsys)
    assert code == 2 and len(lines) == 1, err
    assert needle.format(path=source) in lines[0], lines[0]
    assert "Traceback" not in err and not branch.exists()


@pytest.mark.parametrize("flag,field,layer", [("--prune_classifier", "prune_classifier", "head.weight"),
                                              pytest.param("--conv1", "conv1", "patch_embed.proj.weight",
                                                           marks=pytest.mark.slow)])
def test_branch_pruning_a_layer_its_parent_kept_dense_starts_it_dense(parent, tmp_path, flag, field, layer):
    source, branch = paths.round_checkpoint(parent, 1), str(tmp_path / "branch")
    assert main(PARENT + BRANCH + [flag, "--save_dir", branch, "--resume_from", source]) == 0
    masks = checkpoint.load(paths.round_checkpoint(branch, 2))["masks"]
    parent_masks = checkpoint.load(source)["masks"]
    assert layer in masks and layer not in parent_masks
    kept = masks[layer].float().mean().item()
    assert 0.0 < kept < 1.0  # pruned in the branch's own round, from a dense start
    for name, mask in parent_masks.items():  # nothing the parent pruned grows back
        assert not torch.any(masks[name] & ~mask), name
    assert json.load(open(paths.config_file(branch)))["config"][field] is True


def test_branch_without_the_parents_prune_classifier_is_refused(parent, tmp_path, capsys):
    payload = checkpoint.load(paths.round_checkpoint(parent, 1))
    head = payload["model"]["head.weight"]
    payload["masks"]["head.weight"] = torch.rand(head.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    payload["config"]["prune_classifier"] = True
    source = str(tmp_path / "1checkpoint.pth.tar")
    checkpoint.save(source, payload)
    shutil.copy(paths.rewind_weights(parent), tmp_path / "rewind.pth.tar")
    code = main(PARENT + BRANCH + ["--save_dir", str(tmp_path / "b"), "--resume_from", source])
    lines, err = error_lines(capsys)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: no --prune_classifier: {source} was made with --prune_classifier; "
                               f"a branch keeps its parent's pruned head.weight"), lines[0]


def test_resume_with_resume_from_starts_then_continues_the_branch(parent, tmp_path, capsys):
    source, branch = paths.round_checkpoint(parent, 1), str(tmp_path / "branch")
    command = PARENT + BRANCH + ["--save_dir", branch, "--resume_from", source, "--resume"]
    assert main(command) == 0
    out, err = capsys.readouterr()
    assert f"no checkpoint in {branch} yet; starting the branch from {source}" in err
    lineage = json.load(open(paths.lineage_file(branch)))
    assert [r["round"] for r in lineage["rounds"]] == [2] and lineage["rounds"][0]["parent"] == source
    assert main(command) == 0  # the same command again: the branch's own run, finished
    assert "nothing to run" in capsys.readouterr().out
    other = paths.round_checkpoint(parent, 0)
    assert main(PARENT + BRANCH + ["--save_dir", branch, "--resume_from", other, "--resume"]) == 2
    lines, _ = error_lines(capsys)
    assert len(lines) == 1 and f"is a branch of {source}" in lines[0]


def test_resume_after_a_kill_past_the_last_checkpoint_finishes_the_bookkeeping(parent, tmp_path, capsys):
    """What a SIGKILL right after the last round's numbered checkpoint leaves: no lineage entry, no round
    record, and the round's latest.pth.tar."""
    directory = copy_of(parent, tmp_path)
    last = checkpoint.load(paths.round_checkpoint(directory, 1))
    stale = dict(last, kind="epoch", epoch=1)
    checkpoint.save(paths.latest_checkpoint(directory), stale)
    lineage = json.load(open(paths.lineage_file(directory)))
    lineage["rounds"] = lineage["rounds"][:1]
    checkpoint.atomic_write_text(paths.lineage_file(directory), json.dumps(lineage))
    records = open(paths.metrics_file(directory)).read().splitlines()
    assert json.loads(records[-1])["type"] == "round"
    checkpoint.atomic_write_text(paths.metrics_file(directory), "\n".join(records[:-1]) + "\n")
    assert main(PARENT + ROUNDS + ["--save_dir", directory, "--resume"]) == 0
    assert not os.path.exists(paths.latest_checkpoint(directory))
    assert open(paths.metrics_file(directory)).read().splitlines() == records
    assert json.load(open(paths.lineage_file(directory)))["rounds"] == \
        json.load(open(paths.lineage_file(parent)))["rounds"]


@pytest.mark.parametrize("damage", ["truncate_lineage", "delete_lineage", "delete_metrics", "drop_epoch_record"])
def test_lost_history_is_rebuilt_from_the_checkpoints(parent, tmp_path, capsys, damage):
    directory = copy_of(parent, tmp_path)
    lineage_path, metrics_path = paths.lineage_file(directory), paths.metrics_file(directory)
    if damage == "truncate_lineage":
        with open(lineage_path, "r+b") as f:
            f.truncate(os.path.getsize(lineage_path) // 2)
    elif damage == "delete_lineage":
        os.unlink(lineage_path)
    elif damage == "delete_metrics":
        os.unlink(metrics_path)
    else:
        lines = open(metrics_path).read().splitlines(keepends=True)
        checkpoint.atomic_write_text(metrics_path, "".join(lines[:1] + lines[2:]))
    assert main(PARENT + ROUNDS + ["--save_dir", directory, "--resume"]) == 0
    err = capsys.readouterr().err
    damaged = lineage_path if "lineage" in damage else metrics_path
    assert f"warning: {damaged}" in err and "rebuilt round(s) 0, 1" in err or \
        damage == "drop_epoch_record" and "rebuilt round(s) 0 " in err, err
    rebuilt, original = json.load(open(lineage_path)), json.load(open(paths.lineage_file(parent)))
    assert rebuilt.pop("run_dir") == os.path.abspath(directory) and original.pop("run_dir") == parent
    assert rebuilt == original
    assert open(metrics_path).read() == open(paths.metrics_file(parent)).read()


def test_resume_with_another_thread_count_warns_once(parent, tmp_path, capsys):
    directory = copy_of(parent, tmp_path)
    torch.set_num_threads(2)
    try:
        assert main(PARENT + ROUNDS + ["--save_dir", directory, "--resume"]) == 0
    finally:
        torch.set_num_threads(1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "threads" in line]
    assert warnings == ["warning: --resume: torch threads 1 when saved, 2 now, so the resumed run is not "
                        "bit-identical to an uninterrupted one"]


def test_resume_on_a_dir_without_checkpoints_says_it_starts_a_new_run(tmp_path, capsys):
    directory = str(tmp_path / "empty")
    os.makedirs(directory)
    assert main(PARENT + ["--pruning_times", "1", "--save_dir", directory, "--resume"]) == 0
    out, err = capsys.readouterr()
    assert f"--resume: no checkpoint in {directory} yet; starting a new run from round 0" in err
    assert "resuming" not in out and os.path.isfile(paths.round_checkpoint(directory, 0))


def test_branch_compares_the_split_not_how_it_was_given(parent, tmp_path, capsys):
    """A parent run with the default --val_size (None in its config) and a branch that names the same
    size explicitly use one split: accepted; another size is refused with both sizes resolved."""
    run = copy_of(parent, tmp_path, "parent_default_split")
    payload = checkpoint.load(paths.round_checkpoint(run, 1))
    payload["config"]["val_size"] = None  # as saved by a run without --val_size (synthetic default: 300)
    source = os.path.join(run, "default_split.pth.tar")
    checkpoint.save(source, payload)
    flags = [f for i, f in enumerate(PARENT) if "--val_size" not in PARENT[max(i - 1, 0):i + 1]]
    code = main(flags + BRANCH + ["--val_size", "301", "--save_dir", str(tmp_path / "b1"), "--resume_from", source])
    lines, _ = error_lines(capsys)
    assert code == 2 and f"--val_size 301: {source} was made with --val_size 300" in lines[0], lines
    assert main(flags + BRANCH + ["--val_size", "300", "--save_dir", str(tmp_path / "b2"),
                                  "--resume_from", source]) == 0
