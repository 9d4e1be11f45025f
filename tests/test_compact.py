"""Physical compaction (compact/, export_compact.py): compact == masked, widths, safe loading, bad input."""
import copy
import json
import os
import pickle
import shutil

import pytest
import torch

from compact import load_compact, structured_cost
from compact.families import FAMILIES, apply_masks_copy, compact_copy
from compact.measure import parameter_count
from utils.flops import flops_per_image
from compact.source import load_source, max_logit_difference, verification_images
from conftest import run_main
from export_compact import main as export_main
from models import create_model
from utils import checkpoint, paths

VIT_RUN = ["--dataset", "synthetic", "--arch", "test_vit", "--no_wandb", "--no_progress", "--batch_size", "64",
           "--lr", "0.05", "--pruning_times", "2", "--epochs", "1", "--rate", "0.5", "--val_size", "2700"]
QUICK = ["--runs", "2", "--batch", "4"]
ROUND_KEYS = {"round", "device", "dtype", "compile", "out_dir", "variants", "max_abs_logit_diff"}
VARIANT_KEYS = {"params", "flops_per_image", "latency_ms_b1", "throughput_img_s_b4"}


@pytest.fixture(scope="module")
def res_run(core_run, tmp_path_factory):
    """conftest's shared res20s --struct rsst run (channel masks), copied: exports write into the run dir."""
    directory, result = core_run
    assert result.returncode == 0, result.stderr
    copied = str(tmp_path_factory.mktemp("res") / "run")
    shutil.copytree(directory, copied)
    return copied


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("vit") / "run")
    run_main(*VIT_RUN, "--struct", "refill", "--vit_structured", "--criteria", "magnitude", "--save_dir", directory)
    return directory


@pytest.fixture(scope="module")
def vit_export(vit_run, tmp_path_factory):
    """Round 1 of vit_run exported once (tests copy it before changing anything)."""
    out = tmp_path_factory.mktemp("vit_export") / "out"
    assert export_main([paths.round_checkpoint(vit_run, 1), "--out", str(out), *QUICK]) == 0
    return out


def export(capsys, *args):
    code = export_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_json(path):
    with open(path) as f:
        return json.load(f)


def resnet_params_by_hand(arch: dict) -> int:
    """res20s parameters from arch.json's kept widths: convs keep rows, a block's conv2 also keeps only its
    conv1's kept inputs; each BN 2 per kept channel; fc 64 x 10 + 10."""
    model = create_model(arch["arch"], arch["num_classes"])
    layers = arch["plan"]["layers"]
    total = 0
    for name, conv in model.named_modules():
        if not isinstance(conv, torch.nn.Conv2d):
            continue
        out = len(layers[name]["keep"]) if name in layers else conv.out_channels
        inner = name[:-len("conv2")] + "conv1" if name.endswith("conv2") else None
        width_in = len(layers[inner]["keep"]) if inner else conv.in_channels
        total += out * width_in * conv.kernel_size[0] * conv.kernel_size[1] + 2 * out
    return total + 64 * 10 + 10


def test_res20s_channel_checkpoint_compacts_exactly(res_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "compact"
    code, stdout, stderr = export(capsys, paths.round_checkpoint(res_run, 1), "--out", out, *QUICK)
    assert code == 0, stderr
    report, arch = read_json(out / "report.json"), read_json(out / "arch.json")
    assert report["max_abs_logit_diff"] <= 1e-4 and "max |logit difference|" in stdout
    assert arch["arch"] == "res20s" and arch["source"]["round"] == 1
    assert arch["source"]["sha256"] == checkpoint.sha256_of(paths.round_checkpoint(res_run, 1))
    # the kept channels are exactly the mask's alive rows (a block's conv1 also needs conv2's column alive)
    masks = checkpoint.load(paths.round_checkpoint(res_run, 1))["masks"]
    alive = masks["layers.3.conv2.weight"].flatten(1).any(1)
    assert arch["plan"]["layers"]["layers.3.conv2"]["keep"] == torch.nonzero(alive).flatten().tolist()
    compact = report["variants"]["compact"]
    assert compact["params"] == resnet_params_by_hand(arch) < report["variants"]["dense"]["params"] == 272474
    assert compact["flops_per_image"] < report["variants"]["masked"]["flops_per_image"]
    round_report = read_json(os.path.join(res_run, "compact", "round_1.json"))
    assert ROUND_KEYS <= set(round_report) and round_report["round"] == 1 and round_report["compile"] is False
    for variant in ("dense", "masked", "compact"):
        assert VARIANT_KEYS <= set(round_report["variants"][variant])
        assert set(round_report["variants"][variant]["latency_ms_b1"]) == {"median", "p25", "p75"}
    # loads from safetensors + JSON only: torch.load and pickle are never called
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model = load_compact(str(out))
    assert parameter_count(model) == compact["params"]
    monkeypatch.undo()
    source = load_source(paths.round_checkpoint(res_run, 1))
    images, origin = verification_images(source.config)
    assert origin.startswith("the first 256 synthetic test images")
    assert max_logit_difference(source.masked, model, images) <= 1e-4


def test_constant_channels_are_folded_exactly(res_run):
    """Dead channels still output BN(0) = beta - gamma*mean/sqrt(var+eps): with positive betas the masked model
    depends on them; the compact one matches only because it keeps them (ScatterChannels constants, and
    conv2's map for the block-internal ones)."""
    masked = load_source(paths.round_checkpoint(res_run, 1)).masked
    with torch.no_grad():
        for module in masked.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.uniform_(0.5, 1.0)
    compact, layout = compact_copy(masked, FAMILIES["resnet"], (3, 32, 32))
    images = torch.randn(8, 3, 32, 32)
    assert max_logit_difference(masked, compact, images) <= 1e-4
    maps = [name for name, spec in layout["layers"].items() if "map" in spec]
    assert maps, "every dropped internal channel feeds relu(beta) > 0 to conv2"
    broken = copy.deepcopy(compact)
    for name, buffer in broken.named_buffers():
        if name.endswith(".map"):
            buffer.zero_()
    assert max_logit_difference(masked, broken, images) > 1e-3


def test_res18_hand_made_channel_masks_compact_exactly():
    torch.manual_seed(0)
    model = create_model("res18", 10).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.uniform_(-0.5, 1.0)
                module.running_mean.uniform_(-0.2, 0.2)
    masks = {}
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv2d) and name != "conv1":
            rows = torch.rand(conv.out_channels) < 0.5
            masks[f"{name}.weight"] = rows.view(-1, 1, 1, 1).expand_as(conv.weight).float()
    masked = apply_masks_copy(model, masks).eval()
    compact, _ = compact_copy(masked, FAMILIES["resnet"], (3, 32, 32))
    assert max_logit_difference(masked, compact, torch.randn(2, 3, 32, 32)) <= 1e-4
    assert parameter_count(compact) < 0.4 * parameter_count(model)


def test_vit_head_and_neuron_checkpoint_compacts_exactly(vit_run, vit_export):
    out = vit_export
    report, arch = read_json(out / "report.json"), read_json(out / "arch.json")
    assert report["max_abs_logit_diff"] <= 1e-4
    masks = checkpoint.load(paths.round_checkpoint(vit_run, 1))["masks"]
    dim, head_dim, removed = 64, 32, 0
    for block in range(6):
        heads = masks[f"blocks.{block}.attn.qkv.weight"].view(3, 2, head_dim, dim).any(-1).any(-1).any(0)
        neurons = masks[f"blocks.{block}.mlp.fc1.weight"].any(1)
        assert arch["plan"]["attention"][f"blocks.{block}.attn"]["keep"] == torch.nonzero(heads).flatten().tolist()
        assert arch["plan"]["mlp"][f"blocks.{block}.mlp"]["keep"] == torch.nonzero(neurons).flatten().tolist()
        removed += int((~heads).sum()) * head_dim * (3 * dim + 3 + dim) + int((~neurons).sum()) * (2 * dim + 1)
    assert removed > 0
    assert report["variants"]["compact"]["params"] == report["variants"]["dense"]["params"] - removed
    assert report["variants"]["dense"]["params"] == 300746
    model = load_compact(str(out))
    assert [model.blocks[b].attn.num_heads for b in range(6)] == [
        len(arch["plan"]["attention"][f"blocks.{b}.attn"]["keep"]) for b in range(6)]
    source = load_source(paths.round_checkpoint(vit_run, 1))
    assert max_logit_difference(source.masked, model, verification_images(source.config)[0]) <= 1e-4


def test_vit_constant_heads_and_neurons_fold_into_biases():
    """A head whose v rows are zero outputs b_v (softmax rows sum to 1); a neuron whose fc1 row is zero
    outputs act(b1): both are removed and folded into proj / fc2 biases, exactly."""
    torch.manual_seed(0)
    model = create_model("test_vit", 10).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
    masks = {name: torch.ones_like(p) for name, p in model.named_parameters() if name.endswith("weight")}
    masks["blocks.0.attn.qkv.weight"][2 * 64:2 * 64 + 32] = 0  # v rows of head 0; q, k and proj stay
    masks["blocks.1.attn.proj.weight"][:, 32:] = 0  # proj columns of head 1: silent
    masks["blocks.0.mlp.fc1.weight"][:10] = 0  # neurons 0-9: constant act(b1)
    masked = apply_masks_copy(model, masks).eval()
    compact, layout = compact_copy(masked, FAMILIES["vit"], (3, 32, 32))
    assert layout["attention"]["blocks.0.attn"]["keep"] == [1]
    assert layout["attention"]["blocks.1.attn"]["keep"] == [0]
    assert layout["mlp"]["blocks.0.mlp"]["keep"] == list(range(10, 192))
    images = torch.randn(4, 3, 32, 32)
    assert max_logit_difference(masked, compact, images) <= 1e-4
    unfolded = copy.deepcopy(compact)
    unfolded.blocks[0].mlp.fc2.bias.data.copy_(model.blocks[0].mlp.fc2.bias)
    assert max_logit_difference(masked, unfolded, images) > 1e-3


def test_structured_cost_counts_removed_heads_and_neurons():
    model = create_model("vit_tiny", 10)
    masks = {name: torch.ones_like(p) for name, p in model.named_parameters() if name.endswith("weight")}
    for block in range(9):  # drop head 2 (qkv rows + proj columns) and neurons 0-127 in every block
        masks[f"blocks.{block}.attn.qkv.weight"].view(3, 3, 64, 192)[:, 2] = 0
        masks[f"blocks.{block}.attn.proj.weight"][:, 128:] = 0
        masks[f"blocks.{block}.mlp.fc1.weight"][:128] = 0
        masks[f"blocks.{block}.mlp.fc2.weight"][:, :128] = 0
    dense = flops_per_image(model, (3, 32, 32))
    tokens, dim = 65, 192
    per_head = 2 * tokens * dim * 64 * 4 + 2 * tokens * tokens * 64 * 2  # qkv + proj, q @ k^T + attn @ v
    per_block = per_head + 128 * 2 * tokens * dim * 2
    cost = structured_cost(model, masks, (3, 32, 32))
    assert cost["flops_per_image"] == dense - 9 * per_block
    params = sum(p.numel() for p in model.parameters())  # a head: 3 x 64 qkv rows (+ bias), 64 proj columns
    per_block_params = (3 * 64 * 192 + 3 * 64) + 64 * 192 + 128 * (192 + 1) + 128 * 192
    assert cost["parameters"] == params - 9 * per_block_params
    element = {name: (torch.rand_like(m) < 0.5).float() for name, m in masks.items()}
    assert structured_cost(model, element, (3, 32, 32)) == {"flops_per_image": dense, "parameters": params}


def test_elementwise_checkpoint_says_no_speedup(tmp_path, capsys):
    directory = str(tmp_path / "none")
    run_main(*VIT_RUN, "--struct", "none", "--save_dir", directory)
    out = tmp_path / "export"
    code, stdout, stderr = export(capsys, paths.round_checkpoint(directory, 1), "--out", out, *QUICK)
    assert code == 0, stderr
    assert "no speedup expected from element-wise sparsity" in stdout
    report = read_json(out / "report.json")
    assert "variants" not in report and report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert not os.path.exists(os.path.join(directory, "compact"))
    model = load_compact(str(out))
    assert parameter_count(model) == 300746  # dense-shaped: the masked weights as they are


def _forged_epoch_checkpoint(run_dir, tmp_path):
    payload = checkpoint.load(paths.round_checkpoint(run_dir, 1))
    path = str(tmp_path / "latest.pth.tar")
    checkpoint.save(path, dict(payload, kind="epoch"))
    return path


@pytest.mark.parametrize("case", ["latest", "foreign", "rewind", "missing", "out_not_empty", "out_is_file"])
def test_bad_input_is_one_line_and_writes_nothing(vit_run, tmp_path, capsys, case):
    source, out = paths.round_checkpoint(vit_run, 1), str(tmp_path / "out")
    if case == "latest":
        source = _forged_epoch_checkpoint(vit_run, tmp_path)
    elif case == "foreign":
        source = str(tmp_path / "notes.pth.tar")
        with open(source, "w") as f:
            f.write("not a checkpoint")
    elif case == "rewind":
        source = paths.rewind_weights(vit_run)
    elif case == "missing":
        source = str(tmp_path / "7checkpoint.pth.tar")
    elif case == "out_not_empty":
        os.makedirs(out)
        open(os.path.join(out, "keep.txt"), "w").close()
    else:
        open(out, "w").close()
    before = sorted(os.listdir(vit_run))
    code, _, stderr = export(capsys, source, "--out", out, *QUICK)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert (out if case.startswith("out") else source) in stderr
    assert sorted(os.listdir(vit_run)) == before
    assert os.path.exists(out) == case.startswith("out")
    if case == "out_not_empty":
        assert os.listdir(out) == ["keep.txt"]


def test_mismatch_exits_1_and_writes_nothing(vit_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("compact.export.TOLERANCE", -1.0)  # no difference passes
    out = tmp_path / "out"
    code, _, stderr = export(capsys, paths.round_checkpoint(vit_run, 1), "--out", out, *QUICK)
    assert code == 1 and "differs from the masked one by" in stderr and stderr.count("\n") == 1
    assert not out.exists() and not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


@pytest.mark.parametrize("damage,message", [
    (lambda arch: arch.update(arch="res21x"), "unknown arch 'res21x'"),
    (lambda arch: arch["plan"]["mlp"]["blocks.0.mlp"]["keep"].pop(), "model.safetensors: blocks.0.mlp.fc1.weight has"),
    (lambda arch: arch.update(family="mlp_mixer"), "unknown compaction family 'mlp_mixer'"),
])
def test_load_compact_names_the_file_it_cannot_use(vit_export, tmp_path, damage, message):
    out = tmp_path / "out"
    shutil.copytree(vit_export, out)
    arch = read_json(out / "arch.json")
    damage(arch)
    (out / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(Exception) as error:
        load_compact(str(out))
    text = str(error.value)
    assert message in text and str(out) in text and "\n" not in text
