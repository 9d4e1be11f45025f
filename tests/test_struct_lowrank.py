"""`--struct lowrank`: SVD factors, the rank schedule, parameter counts, the CLI over rounds, resume, bad flags."""
import os

import pytest
import torch
import torch.nn as nn

from conftest import FAST, assert_refused, kill_run_when, read_jsonl, run_main
from models import create_model
from pruners.base import PruneContext
from pruners.factorise import LowRank, factorise, truncated_svd_factors
from pruners.lowrank import LowRankFactorisation, scheduled_rank
from pruners.masks import dense_masks
from utils import checkpoint, paths
from utils.config import RunConfig
from utils.errors import UsageError

# test_vit: dim 64, 6 blocks (qkv 192x64, proj 64x64, fc1 192x64, fc2 64x192); 600 training images
LOWRANK_VIT = [*FAST, "--arch", "test_vit", "--struct", "lowrank", "--prune_type", "pt", "--rate", "0.5",
               "--val_size", "2400"]


def lowrank_mode(**fields):
    return LowRankFactorisation(RunConfig(**{"arch": "vit_tiny", "struct": "lowrank", "prune_type": "pt",
                                             "rate": 0.3, "pruning_times": 5, **fields}))


def factorise_round(mode, model, round_index):
    ctx = PruneContext(model=model, weights={}, config=mode.config, round_index=round_index,
                       calibration_batches=lambda: iter(()), log=lambda message: None)
    mode.plan_round(ctx, dense_masks({}))


def test_svd_factors_reproduce_a_rank_r_matrix_and_truncate_optimally():
    torch.manual_seed(0)
    weight = torch.randn(40, 5) @ torch.randn(5, 30)  # rank 5
    a, b = truncated_svd_factors(weight, 5)
    assert a.shape == (40, 5) and b.shape == (5, 30) and a.dtype == weight.dtype
    assert torch.allclose(a @ b, weight, atol=1e-4)
    singular = torch.linalg.svdvals(weight.double())
    a3, b3 = truncated_svd_factors(weight, 3)  # Eckart-Young: the error is the dropped singular values
    error = torch.linalg.matrix_norm((a3 @ b3 - weight).double())
    assert float(error) == pytest.approx(float(singular[3:].norm()), rel=1e-4)
    assert torch.allclose(a3.norm(dim=0), b3.norm(dim=1), rtol=1e-4)  # sqrt(S) on both sides
    with pytest.raises(ValueError, match=r"rank 31 outside \[1, 30\]"):
        truncated_svd_factors(weight, 31)
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd_factors(torch.randn(4, 3, 2), 1)


def test_rank_schedule_compounds_the_rate_from_the_weight_equivalent_rank():
    # vit_tiny, --rate 0.3: qkv 576x192 (r_eq 144), proj 192x192 (96), fc1 384x192 and fc2 192x384 (128)
    assert [scheduled_rank(k, 576, 192, 0.3) for k in range(5)] == [None, 101, 71, 49, 35]
    assert [scheduled_rank(k, 192, 192, 0.3) for k in range(5)] == [None, 67, 47, 33, 23]
    assert [scheduled_rank(k, 192, 384, 0.3) for k in range(5)] == [None, 90, 63, 44, 31]
    assert scheduled_rank(30, 8, 8, 0.5) == 1  # never below rank 1


def test_parameter_counts_fall_as_computed():
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10)
    dense_total = sum(p.numel() for p in model.parameters())
    mode = lowrank_mode()
    mode.check_model(model)
    assert len(mode.dense_shapes) == 36 and mode.dense_weights() == 9 * 294912
    images = torch.randn(2, 3, 32, 32)
    counts, logged = [], []
    for round_index in (1, 2, 3):
        factorise_round(mode, model, round_index)
        mode.configure_model(model, round_index, logged.append)
        model.eval()(images)  # the measured pass records the image shape for the FLOP count
        counts.append(mode.round_metrics())
    # per block r_qkv*768 + r_proj*384 + 2*r_fc*576, 9 blocks
    expected = [9 * (r[0] * 768 + r[1] * 384 + 2 * r[2] * 576) for r in ((101, 67, 90), (71, 47, 63), (49, 33, 44))]
    assert expected == [1862784, 1306368, 908928]
    assert [m["factorised_weights"] for m in counts] == expected
    assert [m["parameters"] for m in counts] == [dense_total - 9 * 294912 + e for e in expected]
    assert [round(m["remaining_pct"], 2) for m in counts] == [70.18, 49.22, 34.24]
    assert all(m["factorised_layers"] == 36 for m in counts)
    assert counts[0]["layer_ranks"]["blocks.0.attn.qkv"] == 101 and counts[2]["layer_ranks"]["blocks.8.mlp.fc2"] == 44
    flops = [m["flops_per_image"] for m in counts]
    assert flops[0] > flops[1] > flops[2] > 0
    assert "round 2: --struct lowrank layers 576x192: rank 71, 192x192: rank 47, 384x192: rank 63" in logged[2]
    assert logged[1].startswith("round 1: --struct lowrank model: 1,906,186 parameters, 272.5 MFLOPs per image, "
                                "eval ") and logged[1].endswith(" images/s")
    assert isinstance(model.head, nn.Linear) and isinstance(model.patch_embed.proj, nn.Conv2d)  # left dense


@pytest.mark.parametrize("dense", [nn.Linear(12, 20), nn.Conv2d(6, 10, 3, stride=2, padding=1)])
def test_factorised_layer_at_full_rank_computes_the_dense_layer(dense):
    torch.manual_seed(0)
    x = torch.randn(3, 12) if isinstance(dense, nn.Linear) else torch.randn(2, 6, 9, 9)
    full = min(dense.weight.flatten(1).shape)
    with torch.no_grad():
        assert torch.allclose(factorise(dense, full)(x), dense(x), atol=1e-5)
        low = factorise(dense, 2)
        again = factorise(low, 1)  # a factorised layer re-factorises from A·B
    assert isinstance(low, LowRank) and low.rank == 2 and again.rank == 1
    assert torch.equal(again.up.bias, dense.bias)
    assert torch.linalg.matrix_rank(again.up.weight.flatten(1) @ again.down.weight.flatten(1)) == 1


def test_factorise_like_rebuilds_a_checkpoints_shapes():
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10)
    mode = lowrank_mode()
    mode.check_model(model)
    factorise_round(mode, model, 2)
    state = model.state_dict()
    assert tuple(state["blocks.3.attn.qkv.down.weight"].shape) == (71, 192)
    assert tuple(state["blocks.3.attn.qkv.up.weight"].shape) == (576, 71)
    fresh = create_model("vit_tiny", 10)
    rng = torch.get_rng_state()
    assert mode.shape_model(fresh, state) and not mode.shape_model(fresh, state)
    assert torch.equal(torch.get_rng_state(), rng)  # no initialisation drawn: resume stays bit-identical
    fresh.load_state_dict(state)  # strict
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), model.eval()(images))


def test_check_model_refusals():
    with pytest.raises(UsageError,
                       match=r"--prune_type lt \(the default\): --struct lowrank retrains .* pass --prune_type pt"):
        lowrank_mode(prune_type="lt").check_model(create_model("vit_tiny", 10))

    class OnlyClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
    with pytest.raises(UsageError, match=r"--struct lowrank: --arch vit_tiny has no Linear or Conv2d layer"):
        lowrank_mode().check_model(OnlyClassifier())
    with_ends = lowrank_mode(prune_classifier=True, conv1=True)  # --fc --conv1: the classifier and stem too
    with_ends.check_model(create_model("vit_tiny", 10))
    assert with_ends.dense_shapes["head"] == (10, 192) and with_ends.dense_shapes["patch_embed.proj"] == (192, 48)
    assert len(with_ends.dense_shapes) == 38 and with_ends.ranks_for(1)["patch_embed.proj"] == 27  # 38.4 x 0.7
    resnet = LowRankFactorisation(RunConfig(arch="res20s", struct="lowrank", prune_type="pt"))
    resnet.check_model(create_model("res20s", 10))
    assert len(resnet.dense_shapes) == 20  # 18 3x3 convs + 2 1x1 shortcuts; stem and classifier stay dense


@pytest.mark.parametrize("args, message", [
    (["--struct", "lowrank"], "error: --prune_type lt (the default): --struct lowrank retrains"),
    (["--struct", "lowrank", "--prune_type", "pt", "--token_keep", "3"],
     "error: --token_keep 3: not used with --struct lowrank"),
    (["--struct", "lowrank", "--prune_type", "pt", "--vit_structured"], "error: --vit_structured: not used"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, message):
    assert_refused([*FAST, "--arch", "test_vit", *args], str(tmp_path / "run"), capsys, message)


def test_cli_two_rounds_factorise_and_report_costs(tmp_path):
    directory = str(tmp_path / "run")
    result = run_main(*LOWRANK_VIT, "--pruning_times", "2", "--epochs", "1", "--save_dir", directory)
    assert "blocks.0.attn.qkv [192x64]: dense, 24)" in result.stdout
    assert "round 1: --struct lowrank layers 192x64: rank 24, 64x64: rank 16, 64x192: rank 24" in result.stdout
    assert "round 1: --struct lowrank model: 177,866 parameters, 1.662 MFLOPs per image, eval " in result.stdout
    rounds = [r for r in read_jsonl(paths.metrics_file(directory)) if r["type"] == "round"]
    assert [r["remaining_pct"] for r in rounds] == [100.0, 50.0]
    assert [r["factorised_weights"] for r in rounds] == [245760, 122880]  # 6 x (3 x 12288 + 4096), halved
    assert rounds[0]["parameters"] - rounds[1]["parameters"] == 122880
    assert rounds[0]["flops_per_image"] > rounds[1]["flops_per_image"]
    assert all(r["eval_images_per_second"] > 0 and 0 <= r["test_top1"] <= 100 for r in rounds)
    saved = checkpoint.load(paths.round_checkpoint(directory, 1))
    assert tuple(saved["model"]["blocks.5.mlp.fc2.down.weight"].shape) == (24, 192)
    assert "blocks.5.mlp.fc2.weight" not in saved["model"] and "head.weight" in saved["model"]
    best = checkpoint.load(paths.round_best(directory, 1))
    assert tuple(best["model"]["blocks.0.attn.proj.up.weight"].shape) == (64, 16)


def resume_args(base, rounds):
    """`base` run for `rounds` rounds of 2 epochs, deterministic, an epoch checkpoint after every epoch."""
    return [*base, "--pruning_times", str(rounds), "--epochs", "2", "--deterministic", "--checkpoint_interval", "0"]


def round_outcome(directory, rounds):
    keys = ("type", "round", "epoch", "train_loss", "val_top1", "test_top1", "remaining_pct", "parameters")
    records = [{k: r.get(k) for k in keys} for r in read_jsonl(paths.metrics_file(directory))]
    models = [checkpoint.load(paths.round_checkpoint(directory, k))["model"] for k in range(rounds)]
    return records, models


def assert_same_outcome(ours, theirs):
    assert ours[0] == theirs[0]
    for mine, reference in zip(ours[1], theirs[1]):
        assert list(mine) == list(reference)
        for name in reference:
            assert torch.equal(mine[name], reference[name]), name


@pytest.mark.slow  # three runs and a resume of 2 rounds x 2 epochs: 160 s measured on 2 busy shared cores
def test_killed_and_extended_lowrank_runs_resume_bit_identically(tmp_path):
    args = resume_args(LOWRANK_VIT, 2)
    reference = str(tmp_path / "reference")
    run_main(*args, "--save_dir", reference)
    expected = round_outcome(reference, 2)
    killed = str(tmp_path / "killed")  # a kill mid-round 1: latest.pth.tar holds the factorised shapes
    latest = paths.latest_checkpoint(killed)
    kill_run_when(args, killed, lambda r: r.get("round") == 1 and r.get("epoch") == 1 and os.path.isfile(latest))
    assert "blocks.0.attn.qkv.down.weight" in checkpoint.load(latest)["model"]
    run_main(*args, "--save_dir", killed, "--resume")
    assert_same_outcome(round_outcome(killed, 2), expected)
    extended = str(tmp_path / "extended")  # round 0 finished, then resumed with one more round: factorised on resume
    run_main(*resume_args(LOWRANK_VIT, 1), "--save_dir", extended)
    run_main(*args, "--save_dir", extended, "--resume")
    assert_same_outcome(round_outcome(extended, 2), expected)


@pytest.mark.slow  # real CIFAR-10: 1,000 training images, 49,000 validation + 10,000 test images evaluated per round
def test_lowrank_rounds_on_cifar10(tmp_path, cifar10_root):
    directory = str(tmp_path / "cifar")
    run_main("--dataset", "cifar10", "--data", cifar10_root, "--arch", "test_vit", "--struct", "lowrank",
             "--prune_type", "pt", "--rate", "0.5", "--pruning_times", "2", "--epochs", "2", "--batch_size", "50",
             "--lr", "0.05", "--val_size", "49000", "--no_wandb", "--no_progress", "--save_dir", directory)
    rounds = [r for r in read_jsonl(paths.metrics_file(directory)) if r["type"] == "round"]
    assert [r["remaining_pct"] for r in rounds] == [100.0, 50.0]
    assert [r["factorised_weights"] for r in rounds] == [245760, 122880]
    assert all(r["test_top1"] > 15 for r in rounds), [r["test_top1"] for r in rounds]  # chance is 10 %
