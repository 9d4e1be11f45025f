"""Every loader whose batches a model sees in training mode drops a partial last batch, so train-mode
BatchNorm never meets a batch of one image (issue 16 §4)."""
import re

import pytest
import torch
import torch.nn as nn

import data
from conftest import run_main
from data.loader import TensorLoader
from training.loop import recalibrate_batchnorm
from training.session import Session
from utils.cli import parse_config
from utils.errors import UsageError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def pooled_batchnorm_model() -> nn.Module:
    """Like resnet18 at 32 px: the last BatchNorm sees a 1x1 map, one value per channel per image."""
    return nn.Sequential(nn.Conv2d(3, 4, 32), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 10))


def session_for(argv, model, tmp_path):
    config = parse_config(["--dataset", "synthetic", "--no_wandb", *argv])
    splits = data.load("synthetic", "", config.val_size)
    return Session(config=config, directory=str(tmp_path), device=torch.device("cpu"), model=model, weights={},
                   splits=splits)


def test_issue_example_calibration_batches_have_no_single_image(tmp_path):
    """--val_size 299 --batch_size 300: 2701 training images, 9 full batches and one of a single image."""
    session = session_for(["--val_size", "299", "--batch_size", "300"], pooled_batchnorm_model(), tmp_path)
    for name in ("train", "calibration"):
        sizes = [len(labels) for _, labels in session.loaders[name]]
        assert sizes == [300] * 9 and session.loaders[name].smallest_batch == 300, (name, sizes)
    model = pooled_batchnorm_model()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        recalibrate_batchnorm(model, [(torch.zeros(1, 3, 32, 32), None)])  # the crash the old loader hit
    assert recalibrate_batchnorm(model, session.loaders["calibration"])
    assert torch.isfinite(model[1].running_var).all() and model[1].num_batches_tracked == 9


def test_a_set_smaller_than_a_batch_is_one_batch():
    images = data.ImageSet(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), torch.arange(5))
    loader = TensorLoader(images, 8, MEAN, STD, torch.device("cpu"), train=True, drop_last=True)
    assert [len(labels) for _, labels in loader] == [5] and loader.smallest_batch == 5
    eval_loader = TensorLoader(images, 2, MEAN, STD, torch.device("cpu"), train=False)
    assert [len(labels) for _, labels in eval_loader] == [2, 2, 1] and eval_loader.smallest_batch == 1


@pytest.mark.parametrize("argv,needle", [
    (["--batch_size", "1"], "--batch_size 1: --arch res20s has BatchNorm"),
    (["--val_size", "2999"], "--val_size 2999: leaves 1 training image(s)"),
])
def test_one_image_training_batches_are_refused_for_batchnorm(argv, needle, tmp_path):
    from models import create_model
    with pytest.raises(UsageError, match=re.escape(needle)):
        session_for(argv, create_model("res20s", 10), tmp_path)
    session_for(argv, nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)), tmp_path)  # no BatchNorm: fine


@pytest.mark.slow
def test_issue_example_resnet18_rsst_runs_and_resumes(tmp_path):
    """The issue's command crashed in round 1 (`Expected more than 1 value per channel when training`)."""
    directory = str(tmp_path / "r18")
    args = ["--arch", "resnet18", "--dataset", "synthetic", "--val_size", "299", "--batch_size", "300",
            "--struct", "rsst", "--pruning_times", "2", "--epochs", "1", "--rate", "0.5", "--lr", "0.05",
            "--no_wandb", "--no_progress", "--save_dir", directory]
    result = run_main(*args)
    assert "1checkpoint.pth.tar" in result.stdout
    again = run_main(*args, "--pruning_times", "3", "--resume")
    assert "2checkpoint.pth.tar" in again.stdout
