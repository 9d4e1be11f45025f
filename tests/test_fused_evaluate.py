"""Fused evaluation and BatchNorm recalibration (training/fused/evaluate.py): each cell's loss and top-1, and
its recomputed statistics, equal its own model's plain ones, and the lockstep driver runs a group's
evaluations and recalibrations as one fused forward each."""
import copy
import os

import pytest
import torch

from models import create_model
from training.fused import fuse_models
from training.fused import runner as fused_runner
from training import rounds
from training.fused.evaluate import evaluate_cells, recalibrate_cells
from training.fused.runner import run_cells
from training.loop import evaluate, recalibrate_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def loaders(cells, batches, batch, seed=0):
    """Per cell, its own list of (images [B, 3, 32, 32], labels [B]) batches; the last batch smaller."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(cells):
        sizes = [batch] * (batches - 1) + [batch // 2]
        out.append([(torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator))
                    for size in sizes])
    return out


@pytest.mark.parametrize("arch,route", [("res20s", "grouped"), ("test_vit", "streams"), ("test_vit", "grouped")])
def test_each_cell_equals_its_plain_evaluation(arch, route):
    models = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        models.append(create_model(arch, 10).eval())
    fused = fuse_models(models, route)
    assert fused.route == route
    data = loaders(3, 3, 8)
    results = evaluate_cells(fused, data, CPU)
    for model, batches, result in zip(models, data, results):
        plain = evaluate(model, batches, CPU)
        assert result.samples == plain.samples == 20
        assert result.accuracy == plain.accuracy  # the same argmax on every image
        assert result.loss == pytest.approx(plain.loss, rel=1e-5)
    assert len({r.loss for r in results}) == 3  # three different cells


def test_loaders_must_match_the_cells():
    fused = fuse_models([create_model("res20s", 10) for _ in range(2)])
    with pytest.raises(ValueError, match="^1 loaders for 2 cells$"):
        evaluate_cells(fused, loaders(1, 2, 4), CPU)
    short = loaders(2, 2, 4)
    short[1] = short[1][:1]
    with pytest.raises(ValueError, match="differ in batch count or batch size"):
        evaluate_cells(fused, short, CPU)


def test_the_driver_evaluates_a_group_as_one_fused_forward(tmp_path, monkeypatch):
    """Two test_vit cells, 2 epochs, 1 round: each epoch's validation and the round's test run as one fused
    evaluation of both cells (3 calls of 2 cells), and each cell's log carries its own accuracies."""
    calls = []

    def counted(fused, cell_loaders, device, amp="none"):
        calls.append(fused.cells)
        return evaluate_cells(fused, cell_loaders, device, amp)
    monkeypatch.setattr(fused_runner, "evaluate_cells", counted)
    base = ["--dataset", "synthetic", "--arch", "test_vit", "--no_wandb", "--no_progress", "--batch_size", "64",
            "--pruning_times", "1", "--epochs", "2", "--val_size", "300"]
    argvs = [[*base, "--seed", str(seed), "--save_dir", str(tmp_path / f"cell{seed}")] for seed in (1, 2)]
    assert run_cells(argvs, ["cell1", "cell2"]) == [0, 0]
    assert calls == [2, 2, 2]


def test_recalibration_gives_each_cell_its_own_statistics():
    """recalibrate_cells (one fused train-mode forward of the cells' stacked batches) leaves in each cell the
    BatchNorm statistics training.loop.recalibrate_batchnorm computes for that cell alone: the sparse view of
    an RSST round (here half of each conv's weights zeroed) on its own calibration batches. The streams route
    keeps its statistics in stacked tensors, not BatchNorm modules: it says so (False, nothing changed) and
    the driver leaves the recalibration to each cell."""
    models = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = create_model("res20s", 10)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Conv2d):
                    module.weight.mul_(torch.rand_like(module.weight) > 0.5)
        models.append(model)
    alone = [copy.deepcopy(m) for m in models]
    data = [batches[:2] for batches in loaders(3, 3, 8)]  # 2 full batches per cell: recalibration draws those
    streams = fuse_models(models, "streams")
    before = streams.unfuse()
    assert not recalibrate_cells(streams, data, CPU)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, streams.unfuse()) for k in a)
    fused = fuse_models(models, "grouped").eval()
    assert recalibrate_cells(fused, data, CPU)
    for model, batches in zip(alone, data):
        assert recalibrate_batchnorm(model, batches)
    for i, (state, model) in enumerate(zip(fused.unfuse(), alone)):
        for name, tensor in model.state_dict().items():
            if "running" in name:
                assert torch.allclose(state[name], tensor, rtol=1e-5, atol=1e-6), (i, name)
            elif "num_batches_tracked" in name:
                assert int(state[name]) == int(tensor) == 2, name
    means = [m.state_dict()["bn1.running_mean"] for m in alone]
    assert not torch.allclose(means[0], means[1])  # three cells, three sets of statistics
    assert not fused.training  # the model's mode is left as it was (train-mode forwards inside)
    short = [data[0], data[1], data[2][:1]]
    with pytest.raises(ValueError, match="differ in batch count or batch size"):
        recalibrate_cells(fused, short, CPU)


@pytest.mark.slow
def test_the_driver_recalibrates_a_group_as_one_fused_forward(tmp_path, monkeypatch):
    """Two res20s RSST cells, 2 rounds of 2 epochs: each sparse-view BatchNorm recalibration of round 1 (before
    each epoch's validation and at the round's end) is one fused forward of both cells, and leaves in each cell
    the statistics a plain recalibration of its own weights on its own calibration batches gives; no cell
    recalibrates alone (70 s on 2 cores; the default suite's test_vit cells post the same requests, answered
    by the cells alone as their model has no BatchNorm)."""
    fused_calls, plain_calls = [], []

    def fused_counted(fused, cell_loaders, device, amp="none"):
        fused_calls.append(fused.cells)
        return recalibrate_cells(fused, cell_loaders, device, amp)

    def plain_counted(model, batches, amp="none", channels_last=False):
        plain_calls.append(1)
        return recalibrate_batchnorm(model, batches, amp, channels_last)
    monkeypatch.setattr(fused_runner, "recalibrate_cells", fused_counted)
    fused_group = fused_runner.LockstepDriver._recalibrate_group
    compared = []

    def checked(driver, group):  # each cell's plain recalibration, on a copy, against what the driver writes back
        expected = []
        for request in group:
            alone = copy.deepcopy(request.runner.session.model)
            recalibrate_batchnorm(alone, request.runner.calibration_batches(rounds.BN_RECALIBRATION_BATCHES))
            expected.append(alone.state_dict())
        fused_group(driver, group)
        for request, want in zip(group, expected):
            got = request.runner.session.model.state_dict()
            assert request.result is True
            for name, tensor in want.items():
                assert torch.allclose(got[name].double(), tensor.double(), rtol=1e-5, atol=1e-6), name
            compared.append(request.cell)
    monkeypatch.setattr(fused_runner.LockstepDriver, "_recalibrate_group", checked)
    monkeypatch.setattr(rounds, "recalibrate_batchnorm", plain_counted)
    base = ["--dataset", "synthetic", "--arch", "res20s", "--no_wandb", "--no_progress", "--batch_size", "128",
            "--struct", "rsst", "--pruning_times", "2", "--epochs", "2", "--val_size", "2600",
            "--checkpoint_interval", "0"]  # 3 steps an epoch
    argvs = [[*base, "--seed", str(seed), "--save_dir", str(tmp_path / f"cell{seed}")] for seed in (1, 2)]
    assert run_cells(argvs, ["cell1", "cell2"]) == [0, 0]
    assert fused_calls == [2, 2, 2] and compared == [0, 1] * 3 and plain_calls == []  # no cell alone
    for seed in (1, 2):
        assert {"0checkpoint.pth.tar", "1checkpoint.pth.tar"} <= set(os.listdir(tmp_path / f"cell{seed}"))
