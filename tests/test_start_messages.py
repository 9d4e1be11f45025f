"""What a resumed or branched run says about where it goes on, the warning a branch gives under other
runtime settings, and the one-line refusals of a directory or a rewind file where a checkpoint is due."""
import os

import pytest
import torch

from pruners.base import RoundPlan
from training.session import RoundProgress
from training.start import Start, _warn_runtime, describe
from utils import checkpoint
from utils.cli import main
from utils.config import RunConfig
from utils.errors import CheckpointError
from utils.seeding import runtime_settings


def start(resumed, complete, epoch=0, batch=0, round_index=2):
    progress = RoundProgress(round=round_index, plan=RoundPlan(train_masks={}, final_masks={}), epoch=epoch,
                             batch=batch)
    return Start(progress=progress, round_complete=complete, source="run/latest.pth.tar", resumed=resumed)


@pytest.mark.parametrize("begin, branch, text", [
    (start(True, False, epoch=3, batch=10), None, "run/latest.pth.tar: round 2, inside epoch 4 at step 10"),
    (start(True, False, epoch=3), None, "run/latest.pth.tar: round 2, epoch 4 (epochs 1-3 done)"),
    (start(True, False), None, "run/latest.pth.tar: the start of round 2"),
    (start(True, True), None, "round 2 is complete, next round 3"),
    (start(False, True), None, "branching from run/latest.pth.tar (its round 2): next round 3"),
    (start(False, False), "random_reinit", "as a random_reinit control: training its round 2 again"),
])
def test_the_start_line_names_the_round_epoch_and_step_it_goes_on_from(begin, branch, text):
    assert text in describe(begin, RunConfig(branch=branch))


def test_a_branch_under_other_runtime_settings_warns_in_one_line(capsys):
    saved = dict(runtime_settings(), threads=torch.get_num_threads() + 3)
    _warn_runtime({"rng": {"runtime": saved}}, "--resume_from", "the branch", "its parent's round")
    assert capsys.readouterr().err == (f"warning: --resume_from: torch threads {saved['threads']} when saved, "
                                       f"{torch.get_num_threads()} now, so the branch is not bit-identical to its "
                                       f"parent's round\n")
    _warn_runtime({"rng": {"runtime": runtime_settings()}}, "x", "y", "z")
    assert capsys.readouterr().err == ""


def test_a_directory_or_rewind_weights_where_a_checkpoint_is_due_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"a directory, not a checkpoint file; it holds no checkpoint file "
                                              r"\(\*\.pth\.tar, \*\.pt\)$"):
        checkpoint.load(str(tmp_path))
    (tmp_path / "tiny_llava.pt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"a directory, not a checkpoint file; name one of its files, e\.g\. "
                                              r".*tiny_llava\.pt$"):
        checkpoint.load(str(tmp_path))
    (tmp_path / "tiny_llava.pt").unlink()
    rewind = str(tmp_path / "rewind.pth.tar")
    checkpoint.save(rewind, {"kind": "rewind", "prune_type": "lt", "epoch": 0, "model": {"w": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match="the run's rewind weights .* use a numbered <k>checkpoint.pth.tar"):
        checkpoint.load(rewind)


def test_only_rank_0_says_it_saved(monkeypatch, capsys):
    from utils.interrupts import Interrupted

    def stop(_config):
        raise Interrupted(15, "run/latest.pth.tar")
    monkeypatch.setenv("RANK", "1")
    assert main(["--dataset", "synthetic"], run=stop) == 143
    assert capsys.readouterr().err == "[rank 1] stopped by SIGTERM; rank 0 saved the checkpoint\n"
    monkeypatch.setenv("RANK", "0")
    assert main(["--dataset", "synthetic"], run=stop) == 143
    assert "saved run/latest.pth.tar; continue with the same command plus --resume" in capsys.readouterr().err
    assert not os.path.exists("run")
