"""Fused evaluation (training/fused/evaluate.py): each cell's loss and top-1 equal its own model's plain
evaluation, and the lockstep driver evaluates a group's cells as one fused forward."""
import pytest
import torch

from models import create_model
from training.fused import fuse_models
from training.fused import runner as fused_runner
from training.fused.evaluate import evaluate_cells
from training.fused.runner import run_cells
from training.loop import evaluate

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
