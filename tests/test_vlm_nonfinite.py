"""A diverging run never leaves a non-finite model behind: train_vlm_pruning.py stops (exit 3) or skips the batch
(nan_policy) before a non-finite loss or gradient is applied, no checkpoint with NaN weights is written or read,
and train_tiny_llava.py stops without writing tiny_llava.pt (seen on an H100: a pruning run went NaN at step
~100 of 200, saved its NaN modules, and the evaluation scored 0 %)."""
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from tests.conftest import ROOT  # noqa: E402
from tests.test_vlm_train import _args, vqa_jsonl  # noqa: E402,F401  (the fixture)
from utils import checkpoint  # noqa: E402
from utils.checkpoint import non_finite_tensors  # noqa: E402
from utils.errors import NumericalError, require_finite  # noqa: E402
from vlm import checkpoints as ckpt  # noqa: E402
from vlm import trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def poison_step(monkeypatch, at_call: int, where: str):
    """The `at_call`-th train step (1-based) gets a NaN generator loss (`where` "loss") or an infinite gradient
    in the pruner ("grad")."""
    calls = {"n": 0}
    compute, backward = trainer.compute_losses, trainer.backward

    def losses(*args, **kwargs):
        calls["n"] += 1
        out = compute(*args, **kwargs)
        if where == "loss" and calls["n"] == at_call:
            out["task"] = out["task"] * float("nan")
            out["generator"] = out["generator"] + out["task"]
        return out

    def grads(losses_, modules):
        backward(losses_, modules)
        if where == "grad" and calls["n"] == at_call:
            next(p for p in modules["pruner"].parameters() if p.grad is not None).grad.fill_(float("inf"))
    monkeypatch.setattr(trainer, "compute_losses", losses)
    monkeypatch.setattr(trainer, "backward", grads)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_stop_keeps_the_last_good_checkpoint_and_exits_3(vqa_jsonl, tmp_path, capsys, monkeypatch, where):
    poison_step(monkeypatch, 3, where)
    run = tmp_path / "run"
    assert trainer.main(_args(vqa_jsonl, run, "steps=5", "save_every=2")) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: step 3: non-finite loss or gradient (task ") and err.count("\n") == 1, err
    assert err.rstrip().endswith(f"the run stopped before applying it and the last checkpoint is "
                                 f"{run / 'checkpoint_0000002.pt'}. Lower lr_merger / lr_pruner / lr_discriminator, "
                                 f"or nan_policy=skip_batch skips such batches")
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_0000002.pt"]
    payload = ckpt.load_checkpoint(str(run / "checkpoint_0000002.pt"))
    assert payload["step"] == 2 and payload["extra"]["skipped_batches"] == 0


def test_skip_batch_applies_nothing_of_the_bad_step_and_goes_on(vqa_jsonl, tmp_path, monkeypatch):
    poison_step(monkeypatch, 3, "grad")
    run = tmp_path / "run"
    assert trainer.main(_args(vqa_jsonl, run, "steps=4", "save_every=1", "nan_policy=skip_batch")) == 0
    states = [ckpt.load_checkpoint(str(run / f"checkpoint_000000{k}.pt")) for k in (2, 3, 4)]
    for name in ckpt.MODULES:
        before, after = states[0]["modules"][name], states[1]["modules"][name]
        assert all(torch.equal(before[key], after[key]) for key in before), name  # step 3 changed nothing
        assert any(not torch.equal(after[key], states[2]["modules"][name][key]) for key in after), name  # 4 did
        assert states[1]["optimizers"][name]["state"][0]["step"] == states[0]["optimizers"][name]["state"][0]["step"]
    assert [s["extra"]["skipped_batches"] for s in states] == [0, 1, 1]
    assert "step 3: non-finite loss or gradient, batch skipped (nan_policy skip_batch; 1 so far)" in \
        (run / "log.txt").read_text()


def test_a_checkpoint_with_nan_weights_is_neither_written_nor_read(vqa_jsonl, tmp_path, capsys):
    run = tmp_path / "run"
    assert trainer.main(_args(vqa_jsonl, run, "steps=1", "save_every=1")) == 0
    path = run / "checkpoint_0000001.pt"
    payload = checkpoint.load_file(str(path))
    name = next(iter(payload["modules"]["merger"]))
    payload["modules"]["merger"][name].fill_(float("nan"))
    checkpoint.save(str(path), payload)  # a whole file (its digest matches) that holds NaN weights
    from eval_vlm_pruning import main as evaluate
    assert evaluate(["--checkpoint", str(path), "--data", vqa_jsonl, "--modes", "origin", "--limit", "2",
                     "--output", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err == f"error: {path}: non-finite weights in merger.{name} (the training diverged)\n"
    assert not (tmp_path / "r.json").exists()
    config, backbone = ckpt.config_from_dict(payload["config"], str(path)), None
    backbone = ckpt.load_backbone(config, payload.get("backbone"))
    modules = ckpt.build_modules(config, backbone)
    with torch.no_grad():
        next(modules["pruner"].parameters()).fill_(float("inf"))
    optimizers = trainer.make_optimizers(config, modules)
    with pytest.raises(NumericalError, match=r"^step 7: non-finite weights in pruner\.\S+; .*checkpoint_0000007.pt "
                                             r"not written$"):
        ckpt.save_checkpoint(str(run / "checkpoint_0000007.pt"), config, backbone, modules, optimizers, 7, {})
    assert not (run / "checkpoint_0000007.pt").exists()


def test_finite_checks_by_hand():
    assert require_finite(0.5, "step 1", "x") == 0.5
    for value in (float("nan"), float("inf"), -math.inf):
        with pytest.raises(NumericalError, match=rf"^step 9: loss {value} \(the training diverged\); lower --lr$"):
            require_finite(value, "step 9", "lower --lr")
    named = [("a", torch.ones(2)), ("b", torch.tensor([1.0, float("nan")])), ("c", torch.tensor([3])),
             ("d", torch.tensor([-float("inf")])), ("e", "text")]
    assert non_finite_tensors(named) == ["b", "d"]


def test_tiny_llava_training_that_diverges_writes_no_model(cifar10_root, tmp_path):
    """lr 1e30 sends the weights to inf / NaN within a few steps: exit 3, one line, no tiny_llava.pt."""
    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, "train_tiny_llava.py", "--data", cifar10_root, "--out", str(out),
                             "--steps", "4", "--batch_size", "4", "--warmup", "0", "--lr", "1e30", "--hidden_size",
                             "16", "--num_layers", "2", "--vision_hidden_size", "16", "--vision_layers", "1",
                             "--image_size", "28", "--train_images", "40", "--val_images", "10", "--eval_images", "5",
                             "--eval_every", "100", "--workers", "0", "--no_progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("error: step 4: ") and "(the training diverged)" in result.stderr
    assert result.stderr.rstrip().endswith("no tiny_llava.pt written; lower --lr") and result.stderr.count("\n") == 1
    assert not (out / "tiny_llava.pt").exists() and not (out / "tiny_llava.json").exists()


def test_gumbel_noise_stays_finite_when_the_sampler_returns_zero(monkeypatch):
    from vlm.gumbel import gumbel_noise, gumbel_softmax_hard
    from vlm.pruner_heads import keep_mask
    torch.manual_seed(0)
    noise = gumbel_noise(torch.empty(200_000))
    assert noise.dtype == torch.float32 and float(noise.mean()) == pytest.approx(0.5772, abs=0.01)  # Euler's gamma
    original = torch.Tensor.exponential_

    def with_zeros(self, *args, **kwargs):  # the sampler's rare exact 0, on every 3rd element
        out = original(self, *args, **kwargs)
        out.view(-1)[::3] = 0.0
        return out
    monkeypatch.setattr(torch.Tensor, "exponential_", with_zeros)
    noise = gumbel_noise(torch.empty(9))
    assert torch.isfinite(noise).all() and float(noise.max()) == pytest.approx(87.34, abs=0.01)  # -log(tiny)
    logits = torch.randn(4, 6, 2, requires_grad=True)
    sample = gumbel_softmax_hard(logits, 0.1)
    assert torch.isfinite(sample).all() and torch.equal(sample.sum(-1), torch.ones(4, 6))
    sample[..., 0].sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.isfinite(keep_mask(torch.randn(3, 5), 0.1, training=True)).all()
    from vlm.merger import LearnableTokenMerger
    merger = LearnableTokenMerger(8, 12, d_internal=8).train()
    assert torch.isfinite(merger(torch.randn(2, 12, 8), temperature=0.1).merged).all()


def test_max_grad_norm_clips_each_module_before_its_step(vqa_jsonl, tmp_path, monkeypatch):
    import dataclasses
    from tests.test_vlm_train import _setup
    config, backbone, modules, optimizers, batch = _setup(vqa_jsonl, tmp_path)
    norms = {}
    for name, optimizer in optimizers.items():
        def step(*args, _name=name, _step=optimizer.step, **kwargs):
            grads = [p.grad for p in modules[_name].parameters() if p.grad is not None]
            norms[_name] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            return _step(*args, **kwargs)
        monkeypatch.setattr(optimizer, "step", step)
    trainer.train_step(backbone.model, modules, optimizers, batch, config, temperature=0.5, amp=False)
    unclipped = dict(norms)
    assert min(unclipped.values()) > 1e-3, unclipped
    clipped = dataclasses.replace(config, max_grad_norm=1e-3)
    trainer.train_step(backbone.model, modules, optimizers, batch, clipped, temperature=0.5, amp=False)
    assert set(norms) == set(ckpt.MODULES) and all(v == pytest.approx(1e-3, rel=1e-4) for v in norms.values()), norms


@pytest.mark.parametrize("override,message", [
    ("lr_pruner=nan", "lr_pruner nan: must be a finite number (command line)"),
    ("temperature=inf", "temperature inf: must be a finite number (command line)"),
    ("max_grad_norm=-1", "max_grad_norm -1.0: must be positive, or null for no clipping"),
    ("nan_policy=ignore", "nan_policy 'ignore': choose one of stop, skip_batch (command line)")])
def test_non_finite_or_bad_settings_are_refused_before_any_work(vqa_jsonl, tmp_path, capsys, override, message):
    assert trainer.main(_args(vqa_jsonl, tmp_path / "run", override)) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "run").exists()
