"""The lockstep driver's copies around each fused epoch (training/fused/transfer.py): the cells' weights, masks,
momentum and running sums go into the fused tensors and come back exactly, as multi-tensor copies."""
from types import SimpleNamespace

import pytest
import torch

from models import create_model, dense_modules
from pruners.base import RoundPlan
from pruners.masks import prunable_weights
from training.fused import FusedTrainStep, fuse_models
from training.fused.transfer import load_group, store_group
from training.step import TrainStep

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
COUNTERS = ("loss_sum", "correct", "first_bad", "step_index")


def cell(seed: int, route_steps: int = 3):
    """A res20s cell: its model (BatchNorm counters at 10 * seed), TrainStep with random masks, penalty masks,
    momentum and running sums (seeded)."""
    torch.manual_seed(seed)
    model = create_model("res20s", 10)
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            value.fill_(10 * seed)
    weights = prunable_weights(model, exclude=dense_modules(model))
    step = TrainStep(model, weights, CPU, "none", 0.9, 1e-4, regularized=True, use_graph=False)
    masks = {n: (torch.rand(w.shape) > 0.5).float() for n, w in weights.items()}
    step.start_round(RoundPlan(train_masks=masks, final_masks=masks,
                               penalty_masks={n: m * (torch.rand(m.shape) > 0.5) for n, m in masks.items()}))
    for buf in step.buffers:
        buf.normal_()
    step.loss_sum.fill_(1.5 * seed)
    step.correct.fill_(seed)
    step.step_index.fill_(route_steps)
    return SimpleNamespace(runner=SimpleNamespace(session=SimpleNamespace(model=model, step=step),
                                                  config=SimpleNamespace(batch_size=8)),
                           carried=(16, 1), result=None)


def snapshot(request):
    session = request.runner.session
    return ({k: v.clone() for k, v in session.model.state_dict().items()},
            [b.clone() for b in session.step.buffers], [m.clone() for m in session.step.masks],
            [m.clone() for m in session.step.penalty_masks],
            [getattr(session.step, name).clone() for name in COUNTERS])


def assert_same(a, b):
    state_a, *lists_a = a
    state_b, *lists_b = b
    assert list(state_a) == list(state_b) and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    for x, y in zip(lists_a, lists_b):
        assert len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y))


def fused_for(group):
    models = [r.runner.session.model for r in group]
    steps = [r.runner.session.step for r in group]
    fused = fuse_models([create_model("res20s", 10) for _ in models])  # other weights: the load must overwrite
    return fused, FusedTrainStep(fused, steps[0].masked_names, CPU, "none", 0.9, [1e-4] * len(models),
                                 regularized=True, use_graph=False)


def test_load_then_store_without_steps_leaves_every_cell_as_it_was():
    group = [cell(1), cell(2), cell(3)]
    before = [snapshot(r) for r in group]
    fused, step = fused_for(group)
    load_group(fused, step, group)
    for i, (state, expected) in enumerate(zip(fused.unfuse(), before)):  # the fused model holds each cell
        assert all(torch.equal(state[k], expected[0][k]) for k in state if not k.endswith("num_batches_tracked"))
        momentum = step.cell_state_dict(i)["momentum_buffers"]
        assert all(torch.equal(m, b) for m, b in zip(momentum, expected[1]))
        assert float(step.loss_sum[i]) == 1.5 * (i + 1) and int(step.correct[i]) == i + 1
    assert int(step.step_index) == 3
    store_group(fused, step, group, stopped=None, seen=24)
    for request, expected in zip(group, before):
        # read_epoch reset the running sums into the result: compare those apart
        after = snapshot(request)
        assert_same(after[:4] + ([],), expected[:4] + ([],))
        assert request.result.samples == 16 + 24 and request.result.skipped == 1
    assert [r.result.loss for r in group] == pytest.approx([1.5 * s / 40 for s in (1, 2, 3)])
    assert [r.result.accuracy for r in group] == pytest.approx([100.0 * s / 40 for s in (1, 2, 3)])


def test_store_hands_each_cell_its_own_fused_values():
    group = [cell(4), cell(5)]
    fused, step = fused_for(group)
    load_group(fused, step, group)
    masks_before = [[m.clone() for m in r.runner.session.step.masks] for r in group]
    with torch.no_grad():  # an epoch's changes, different per cell
        for name, (tensor, index) in fused.fused_state.items():
            if index[0] == ():
                tensor.add_(7)  # 7 batches: the shared BatchNorm counter
            else:
                for i in range(2):
                    tensor[index[i]].add_(i + 1)
        for buf in step.buffers:
            buf.mul_(-2)
        step.loss_sum.copy_(torch.tensor([3.0, 4.0]))
        step.step_index.add_(7)
    expected_states = fused.unfuse()
    expected_momentum = [step.cell_state_dict(i)["momentum_buffers"] for i in range(2)]
    store_group(fused, step, group, stopped=5, seen=40)
    for i, request in enumerate(group):
        session = request.runner.session
        for name, value in session.model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                assert int(value) == 10 * (4 + i) + 7, name  # each cell's own count plus the group's 7
            else:
                assert torch.equal(value, expected_states[i][name]), name
        assert all(torch.equal(b, e) for b, e in zip(session.step.buffers, expected_momentum[i]))
        assert all(torch.equal(m, e) for m, e in zip(session.step.masks, masks_before[i]))
        assert float(session.step.loss_sum) == 3.0 + i and int(session.step.step_index) == 10
        assert request.result.stopped_at == 5  # a stopped epoch reads no sums


def test_counts_and_masks_must_match():
    group = [cell(1), cell(2)]
    fused, step = fused_for(group)
    with pytest.raises(ValueError, match="1 cell states for 2 cells"):
        fused.store_cells([group[0].runner.session.model.state_dict()])
    with pytest.raises(ValueError, match="1 cell steps for 2 cells"):
        step.load_cell_steps([group[0].runner.session.step])
    lacking = group[1].runner.session.step
    first = lacking.masked_names[0]
    lacking.masked_names = lacking.masked_names[1:]
    lacking.masks = lacking.masks[1:]
    with pytest.raises(ValueError, match=f"^cell 1: no mask for {first}$"):
        step.load_cell_steps([r.runner.session.step for r in group])


def test_transfer_benchmark_writes_its_rows_and_refuses_bad_flags(tmp_path, capsys):
    from benchmarks import fused_transfer
    out = tmp_path / "t.json"
    assert fused_transfer.main(["--cells", "2", "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = __import__("json").loads(out.read_text())["rows"]
    assert [r["cells"] for r in rows] == [2] and rows[0]["ms_per_epoch"] > 0
    assert 1000 < rows[0]["aten_ops"] < 2000  # 1,336 measured: a few multi-tensor copies, not one per tensor
    for flags, message in ((["--cells", "x"], "error: --cells 'x': expected comma-separated positive integers"),
                           (["--cells", "0"], "error: --cells '0': every value must be between 1 and 64"),
                           (["--repeats", "0"], "error: --repeats 0: must be at least 1"),
                           (["--device", "gpu"], "error: --device 'gpu': choose cuda or cpu")):
        bad = tmp_path / "bad" / "t.json"
        assert fused_transfer.main([*flags, "--out", str(bad)]) == 2
        assert message in capsys.readouterr().err and not bad.parent.exists()
