"""vlm/config.py, vlm/trainer.py, vlm/checkpoints.py, vlm/pretrain.py: config refusals, optimizer isolation,
a 20-step run lowering the task loss, resume == uninterrupted, a checkpoint of another model refused,
and the tiny LLaVA pretraining command at CPU size."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from tests.conftest import ROOT  # noqa: E402
from utils.errors import UsageError  # noqa: E402
from vlm import checkpoints as ckpt  # noqa: E402
from vlm.config import load_config  # noqa: E402
from vlm.trainer import backward, compute_losses, main, make_optimizers, train_step  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "vision_token_pruning.yaml")
# tiny random LLaVA (32 layers at hidden 32) with 56-px images: 16 vision tokens -> 8 merge centres
SMALL = ["--tiny_random", "tiny_image_size=56", "pruner_d_internal=16", "discriminator_d_internal=16",
         "no_wandb=true", "progress=false", "dataset=jsonl", "batch_size=2"]


@pytest.fixture(scope="module")
def vqa_jsonl(tmp_path_factory):
    """Four 28-px PNG images with one question each (answers of the CIFAR-10 VQA vocabulary)."""
    from PIL import Image
    folder = tmp_path_factory.mktemp("vqa")
    generator = torch.Generator().manual_seed(0)
    lines = []
    for i, (question, answer) in enumerate([("what is in the picture?", "cat"), ("is there a dog?", "no"),
                                            ("what is in the picture?", "ship"), ("is there a frog?", "yes")]):
        pixels = torch.randint(0, 256, (28, 28, 3), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": question, "answers": [answer] * 3}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "train.jsonl")


def _args(jsonl, save_dir, *extra):
    return ["--config", CONFIG, *SMALL, f"train_jsonl={jsonl}", f"save_dir={save_dir}", *extra]


def test_config_keys_and_overrides():
    config = load_config(CONFIG, ["--tiny_random", "pruning_layers=[5, 9]", "--merger_type", "question_aware",
                                  "lr_pruner=1e-3", "--amp", "false"])
    assert config.tiny_random and config.pruning_layers == (5, 9) and config.merger_type == "question_aware"
    assert (config.lr_merger, config.lr_pruner, config.lr_discriminator) == (2e-5, 1e-3, 5e-4)
    assert (config.merge_sparsity_weight, config.task_loss_weight, config.adv_loss_weight) == (1e-4, 25.0, 1.0)
    assert (config.temperature, config.temperature_min, config.temperature_anneal_rate) == (1.0, 0.1, 0.5)
    assert config.amp is False and config.pruner_d_internal == 512 and config.pruner_num_heads == 4
    with pytest.raises(UsageError, match="merger_type 'fancy': choose one of simple, question_aware"):
        load_config(CONFIG, ["--tiny_random", "merger_type=fancy"])
    with pytest.raises(UsageError, match="model: give exactly one of"):
        load_config(CONFIG, [])


def test_unknown_key_exits_2_with_one_line(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("tiny_random: true\nmerge_rate: 0.5\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_vlm_pruning.py"), "--config", CONFIG,
                             "--tiny_random", "merge_raito=0.3", f"save_dir={tmp_path / 'run'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: merge_raito: unknown config key (on the command line)"]
    for args, named in ((["--config", str(bad_yaml)], "merge_rate"),
                        (["--config", CONFIG, "--tiny_random", "--no_such_flag", "3"], "no_such_flag")):
        assert main(args + [f"save_dir={tmp_path / 'run'}"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {named}: unknown config key")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("override, message", [
    ("pruning_layers=[10,32]", "error: pruning_layers [10, 32] must be distinct layers in 0..31"),
    ("target_merge_tokens=16", "error: target_merge_tokens=16 gives 16 merge centres for 16 vision tokens"),
    ("merge_ratio=1.5", "error: merge_ratio 1.5: must be between 0 and 1")])
def test_bad_layer_or_centres_exit_2_nothing_written(vqa_jsonl, tmp_path, capsys, override, message):
    assert main(_args(vqa_jsonl, tmp_path / "run", override)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)
    assert not os.path.exists(tmp_path / "run")


def test_missing_base_checkpoint_is_named_in_one_line(vqa_jsonl, tmp_path, capsys):
    missing = tmp_path / "tiny_llava.pt"
    args = [a for a in _args(vqa_jsonl, tmp_path / "run") if a != "--tiny_random"]
    assert main(args + [f"base_checkpoint={missing}"]) == 2
    assert capsys.readouterr().err == f"error: base_checkpoint {missing}: no such checkpoint file\n"
    assert not os.path.exists(tmp_path / "run")


def _setup(jsonl, save_dir):
    config = load_config(CONFIG, SMALL[1:] + ["tiny_random=true", f"train_jsonl={jsonl}", f"save_dir={save_dir}"])
    backbone = ckpt.load_backbone(config)
    torch.manual_seed(1)
    modules = {name: m.train() for name, m in ckpt.build_modules(config, backbone).items()}
    from vlm.data import read_vqa_jsonl
    batch = backbone.collate_train(read_vqa_jsonl(jsonl)[:2])
    return config, backbone, modules, make_optimizers(config, modules), batch


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(module, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())


def test_each_optimizer_steps_only_its_own_module(vqa_jsonl, tmp_path, one_thread):
    config, backbone, modules, optimizers, batch = _setup(vqa_jsonl, tmp_path)
    assert all(not p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training
    backbone_before = _snapshot(backbone.model)
    backward(compute_losses(backbone.model, modules, batch, config, temperature=1.0), modules)
    assert all(p.grad is None for p in backbone.model.parameters())
    for name in ckpt.MODULES:
        before = {n: _snapshot(m) for n, m in modules.items()}
        optimizers[name].step()
        assert not _same(modules[name], before[name]), f"{name} did not change"
        assert all(_same(m, before[n]) for n, m in modules.items() if n != name), f"{name} moved another module"
        assert _same(backbone.model, backbone_before)
    losses = train_step(backbone.model, modules, optimizers, batch, config, temperature=0.5, amp=False)
    assert set(losses) >= {"task", "sparsity", "adversarial", "discriminator", "generator"}
    assert losses["generator"] == pytest.approx(25 * losses["task"] + losses["sparsity"] + losses["adversarial"],
                                                rel=1e-5)
    assert _same(backbone.model, backbone_before)


def test_twenty_steps_lower_the_task_loss(vqa_jsonl, tmp_path, one_thread):
    """A fixed batch (4 samples, batch 4), lr 0.1 for the merger and the pruner. The backbone is random and
    frozen, so its answers hardly depend on the image: the loss moves by ~0.02 in 20 steps (noise ~0.001)."""
    run = tmp_path / "run"
    assert main(_args(vqa_jsonl, run, "steps=20", "batch_size=4", "save_every=20", "lr_merger=0.1",
                      "lr_pruner=0.1")) == 0
    losses = [json.loads(line)["loss_task"] for line in open(run / "metrics.jsonl")]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.005, losses


def _records(directory):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(directory / "metrics.jsonl")]


def test_resume_equals_uninterrupted_and_other_model_refused(vqa_jsonl, tmp_path, one_thread, capsys):
    """A 4-step run; its last checkpoint deleted (a run killed after step 2); --resume redoes steps 3-4."""
    split = tmp_path / "split"
    assert main(_args(vqa_jsonl, split, "steps=4", "save_every=2")) == 0
    whole, whole_records = ckpt.load_checkpoint(str(split / "checkpoint_0000004.pt")), _records(split)
    os.unlink(split / "checkpoint_0000004.pt")
    capsys.readouterr()
    assert main(_args(vqa_jsonl, split, "steps=4", "save_every=2", "--resume")) == 0
    assert "checkpoint_0000002.pt at step 2 of 4" in capsys.readouterr().out
    resumed = ckpt.load_checkpoint(str(split / "checkpoint_0000004.pt"))
    assert whole["step"] == resumed["step"] == 4
    for name in ckpt.MODULES:
        assert all(torch.equal(v, resumed["modules"][name][k]) for k, v in whole["modules"][name].items()), name
    assert _records(split) == whole_records and [r["step"] for r in whole_records] == [1, 2, 3, 4]
    # without --resume the run refuses to overwrite; a checkpoint of another model is refused in one line
    assert main(_args(vqa_jsonl, split, "steps=6")) == 2
    assert "pass --resume" in capsys.readouterr().err
    from vlm.data import cifar10_vqa_tokenizer
    from vlm.llava import build_llava, tiny_llava_config
    from vlm.pretrain import save_tiny_llava
    tokenizer = cifar10_vqa_tokenizer()
    other = build_llava(tiny_llava_config(len(tokenizer), tokenizer.image_token_id, tokenizer.pad_token_id,
                                          hidden_size=16, image_size=56, num_layers=32))
    save_tiny_llava(str(tmp_path / "other.pt"), other, tokenizer, 0, {})
    args = [a for a in _args(vqa_jsonl, split, "steps=6", "--resume") if a not in ("--tiny_random",
                                                                                   "tiny_image_size=56")]
    assert main(args + [f"base_checkpoint={tmp_path / 'other.pt'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint of another model (hidden_size 32, this model 16)" in err[0]
    assert sorted(os.listdir(split)) == ["checkpoint_0000002.pt", "checkpoint_0000004.pt", "log.txt",
                                         "metrics.jsonl"]


def test_load_for_eval_restores_the_trained_modules(vqa_jsonl, tmp_path, one_thread):
    assert main(_args(vqa_jsonl, tmp_path / "run", "steps=1", "save_every=1")) == 0
    path = str(tmp_path / "run" / "checkpoint_0000001.pt")
    model, tokenizer, merger, decider, layers = ckpt.load_for_eval(path)
    payload = ckpt.load_checkpoint(path)
    assert layers == (10, 20, 31) and decider.layers == [10, 20, 31] and not merger.training
    assert all(torch.equal(v, payload["modules"]["merger"][k]) for k, v in merger.state_dict().items())
    assert merger.num_centres == 8 and tokenizer.image_token_id == model.config.image_token_id


@pytest.mark.slow
def test_tiny_llava_pretraining_cpu(cifar10_root, tmp_path):
    """train_tiny_llava.py at CPU size: writes the checkpoint and the accuracy JSON; the model reloads."""
    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_tiny_llava.py"), "--data", cifar10_root,
                             "--out", str(out), "--steps", "60", "--batch_size", "16", "--warmup", "10",
                             "--lr", "2e-3", "--hidden_size", "32", "--num_layers", "4", "--vision_hidden_size",
                             "32", "--vision_layers", "2", "--image_size", "56", "--train_images", "2000",
                             "--val_images", "100", "--eval_images", "50", "--eval_every", "60", "--workers", "0",
                             "--no_progress"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "tiny_llava.json").read_text())
    assert summary["steps"] == 60 and summary["test"]["samples"] == 100
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[-1]["loss"] < records[0]["loss"]
    from vlm.pretrain import load_tiny_llava, model_fingerprint
    model, tokenizer, payload = load_tiny_llava(str(out / "tiny_llava.pt"))
    assert model_fingerprint(model) == summary["fingerprint"] and payload["step"] == 60


def test_hf_model_path_trains_through_the_processor(vqa_jsonl, tmp_path, one_thread):
    """model_name_or_path on a folder saved by save_pretrained (a tiny LLaVA + a local LlavaProcessor), as a
    user's llava-hf/llava-1.5-7b-hf folder is read: one step, and load_for_eval gives the HF tokenizer back."""
    from tests.test_vlm_data import _local_llava_processor
    from vlm.llava import build_llava, tiny_llava_config
    processor = _local_llava_processor()
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    build_llava(tiny_llava_config(len(tokenizer), image_id, tokenizer.pad_token_id)).save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    args = [a for a in _args(vqa_jsonl, run, "steps=1", "save_every=1") if not a.startswith(("--tiny", "tiny_"))]
    assert main(args + [f"model_name_or_path={tmp_path / 'hf'}"]) == 0
    record = json.loads(open(run / "metrics.jsonl").readline())
    assert record["step"] == 1 and record["tokens"] < 576  # 288 merged tokens, then the pruner's choice
    model, loaded_tokenizer, merger, decider, layers = ckpt.load_for_eval(str(run / "checkpoint_0000001.pt"))
    assert loaded_tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == image_id
    assert merger.num_centres == 288 and "backbone" not in ckpt.load_checkpoint(str(run / "checkpoint_0000001.pt"))


def test_pruner_budget_loss_by_hand():
    """Layer 2: sample 0 keeps 1 of its 2 vision tokens (0.5), sample 1 keeps 3 of 3 (1.0); layer 5: sample 0
    has no vision token left (adds nothing), sample 1 keeps 0 of 1. Ratio 0.5, weight 2:
    2 · mean_b [(0.5 − 0.5)² + 0, (1 − 0.5)² + (0 − 0.5)²] = 2 · (0 + 0.5) / 2 = 0.5."""
    from vlm.losses import pruner_budget_loss
    keep = {2: torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), 5: torch.tensor([[0.0], [0.0]])}
    valid = {2: torch.tensor([[True, True, False], [True, True, True]]), 5: torch.tensor([[False], [True]])}
    assert pruner_budget_loss(keep, valid, 0.5, 2.0).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="pruner_keep_ratio"):
        pruner_budget_loss({}, {}, 0.5, 1.0)


def test_pruner_keep_ratio_makes_the_heads_drop_tokens(vqa_jsonl, tmp_path, one_thread):
    """Untrained heads keep ~95 % (Gumbel samples of logit +3 at τ = 1: T̄ near the 8 merge centres); with
    pruner_keep_ratio 0.25 at layers [2, 5] of 32 the budget is T̄ = (2·8 + 3·2 + 27·0.5)/32 ≈ 1.1, and 15
    steps at a large pruner lr get there."""
    run = tmp_path / "budget"
    assert main(_args(vqa_jsonl, run, "steps=15", "batch_size=4", "save_every=15", "lr_pruner=0.05",
                      "pruner_keep_ratio=0.25", "pruner_sparsity_weight=10", "pruning_layers=[2,5]")) == 0
    tokens = [json.loads(line)["tokens"] for line in open(run / "metrics.jsonl")]
    assert tokens[0] > 6.0, tokens
    assert sum(tokens[-3:]) / 3 < 2.0, tokens


def test_evaluation_uses_the_temperature_training_reached(vqa_jsonl, tmp_path, one_thread):
    """τ anneals 1.0 -> 0.1 over the first half: after 4 of 4 steps it is 0.1, and the evaluation's merger
    assignment must use that, not the untrained 1.0."""
    from vlm.evaluate import load_eval_setup
    run = tmp_path / "tau"
    assert main(_args(vqa_jsonl, run, "steps=4", "save_every=4")) == 0
    last = [json.loads(line) for line in open(run / "metrics.jsonl")][-1]
    *_, temperature = load_eval_setup(str(run / "checkpoint_0000004.pt"), seed=0)
    assert temperature == pytest.approx(last["temperature"]) and temperature < 0.5


def test_eval_keeps_the_top_keep_ratio_tokens_when_a_budget_was_trained():
    """Logits all positive (uniform-ish: what a budget on the mean keep probability can converge to):
    the threshold would keep every token; with keep_ratio 0.5 the eval keeps the top round(0.5 · n) valid
    tokens of each sample (sample 0: 4 valid -> 2; sample 1: 3 valid -> round(1.5) = 2)."""
    from vlm.layer_pruner import LayerSpecificPruner
    logits = torch.tensor([[1.3, 1.1, 1.5, 1.2], [0.9, 2.0, 1.0, 5.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    decide = dict(layer=1, hidden=torch.zeros(2, 4, 8), vision_index=torch.zeros(2, 4, dtype=torch.long),
                  vision_valid=valid, question_hidden=torch.zeros(2, 1, 8),
                  question_mask=torch.ones(2, 1, dtype=torch.bool), training=False, temperature=0.1)
    budget, threshold = (LayerSpecificPruner(8, 4, [1], "simple", d_internal=8, keep_ratio=ratio)
                         for ratio in (0.5, None))
    for pruner in (budget, threshold):
        pruner.keep_logits = lambda *args, **kwargs: logits
    assert budget.decide(**decide).tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]]
    assert threshold.decide(**decide).tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="pruner_keep_ratio"):
        LayerSpecificPruner(8, 4, [1], "simple", d_internal=8, keep_ratio=1.5)


def test_missing_cifar_folder_is_named_in_one_line(tmp_path, capsys):
    """dataset cifar10_vqa with a data folder that holds no CIFAR-10: one line naming the key and its value."""
    args = ["--config", CONFIG, *SMALL, "dataset=cifar10_vqa", f"data={tmp_path / 'data'}",
            f"save_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    assert capsys.readouterr().err == (f"error: data '{tmp_path / 'data'}': no cifar-10-batches-py folder in it "
                                       f"(materialise ../shared/data with its materialize_cifar10.py)\n")
    assert not os.path.exists(tmp_path / "run")
