"""`--struct merge`: the learnable merger between ViT blocks, tokens per round, training, checkpoints, resume."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, assert_refused, kill_run_when, read_jsonl, run_main
from models import create_model
from pruners.base import PruneContext
from pruners.masks import dense_masks
from pruners.merge import MERGER, MergeBeforeBlock, TokenMerging, merge_temperature
from test_struct_lowrank import assert_same_outcome, resume_args, round_outcome
from utils import checkpoint, paths
from utils.config import RunConfig
from utils.errors import UsageError
from vlm.merger import LearnableTokenMerger

# test_vit: 4 patches + cls, 6 blocks, dim 64; 600 training images
MERGE_VIT = [*FAST, "--arch", "test_vit", "--struct", "merge", "--prune_type", "pt", "--token_keep", "3,2",
             "--val_size", "2400"]


def merge_mode(**fields):
    return TokenMerging(RunConfig(**{"arch": "vit_tiny", "struct": "merge", "prune_type": "pt", "rate": 0.5,
                                     "pruning_times": 3, **fields}))


def start_round(mode, model, round_index):
    ctx = PruneContext(model=model, weights={}, config=mode.config, round_index=round_index,
                       calibration_batches=lambda: iter(()), log=lambda message: None)
    if round_index:
        mode.plan_round(ctx, dense_masks({}))
    mode.configure_model(model, round_index, lambda message: None)


def test_merge_hook_keeps_the_class_token_aside():
    torch.manual_seed(0)
    merger = LearnableTokenMerger(8, 6, target_merge_tokens=2, d_internal=8).eval()
    tokens = torch.randn(3, 7, 8)  # cls + 6 patches
    (merged,) = MergeBeforeBlock(merger, 1)(None, (tokens,))
    assert merged.shape == (3, 3, 8)
    assert torch.equal(merged[:, 0], tokens[:, 0])
    assert torch.allclose(merged[:, 1:], merger(tokens[:, 1:], 1.0).merged)


def test_temperature_anneals_over_the_merge_rounds():
    assert [merge_temperature(k, 5) for k in (1, 2, 3, 4)] == [1.0, pytest.approx(0.55), 0.1, 0.1]
    assert merge_temperature(1, 2) == 1.0


def test_rounds_merge_fewer_tokens_and_the_merger_trains():
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10)
    mode = merge_mode()
    mode.check_model(model)
    seen = []
    # on each block's first layer: it sees what the block runs on, after the merge hook of the block
    hooks = [b.norm1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks]
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    metrics = []
    for round_index in range(3):
        start_round(mode, model, round_index)
        seen.clear()
        with torch.no_grad():
            model.eval()(images)
        assert seen[0] == 65 and set(seen[1:]) == {[65, 33, 17][round_index]}  # merged before block 1
        metrics.append(mode.round_metrics())
    for hook in hooks:
        hook.remove()
    assert [m["tokens_kept"] for m in metrics] == [65, 33, 17]
    assert [m["token_budget_fraction"] for m in metrics] == [1.0, 0.5, 0.25]
    # query / key 192x192 each; scorer: a 192x192 projection (+ bias), a layer norm, a 192x192 + 192x1 MLP
    merger_parameters = 2 * 192 * 192 + (192 * 193 + 384 + 192 * 193 + 193)
    assert [m["merger_parameters"] for m in metrics] == [0, merger_parameters, merger_parameters]
    assert metrics[1]["parameters"] - metrics[0]["parameters"] == metrics[1]["merger_parameters"]
    assert metrics[0]["flops_per_image"] > metrics[1]["flops_per_image"] > metrics[2]["flops_per_image"]
    assert [m.get("merge_temperature") for m in metrics] == [None, 1.0, 0.1]
    model.train()
    F.cross_entropy(model(images), labels).backward()  # Gumbel-top-k in training, gradients into the merger
    merger = getattr(model, MERGER)
    assert float(merger.assign_query.weight.grad.abs().sum()) > 0
    assert all(float(p.grad.abs().sum()) > 0 for p in merger.scorer.parameters() if p.dim() == 2)


def test_a_checkpoint_holds_the_merger_and_a_fresh_model_takes_it():
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10)
    mode = merge_mode()
    mode.check_model(model)
    start_round(mode, model, 1)
    state = model.state_dict()
    assert any(key.startswith("token_merger.assign_key") for key in state)
    fresh, other = create_model("vit_tiny", 10), merge_mode()
    other.check_model(fresh)
    assert other.shape_model(fresh, state) and not other.shape_model(fresh, state)
    fresh.load_state_dict(state)  # strict
    other.configure_model(fresh, 1, lambda message: None)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), model.eval()(images))


def test_check_model_refusals():
    vit = create_model("vit_tiny", 10)
    with pytest.raises(UsageError, match=r"^--struct merge: needs a ViT with a class token, e.g. --arch vit_tiny; "
                                         r"--arch res20s: the token merger supports timm VisionTransformer"):
        TokenMerging(RunConfig(arch="res20s", struct="merge", prune_type="pt")).check_model(create_model("res20s", 10))
    with pytest.raises(UsageError, match=r"--token_keep 40,64: round 2 would merge the 64 patch tokens"):
        merge_mode(token_keep=(40, 64)).check_model(vit)
    with pytest.raises(UsageError, match=r"--token_start_block 9: .* has 9 blocks"):
        merge_mode(token_start_block=9).check_model(vit)
    with pytest.raises(UsageError, match=r"--prune_type lt \(the default\): --struct merge retrains"):
        merge_mode(prune_type="lt").check_model(vit)


@pytest.mark.parametrize("args, message", [
    (["--k_anchors", "5"], "error: --k_anchors 5: not used with --struct merge"),
    (["--token_keep", "4"], "error: --token_keep 4: round 1 would merge the 4 patch tokens of --arch test_vit into 4 "),
    (["--fc"], "error: --fc/--prune_classifier: not used with --struct merge"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, message):
    argv = [*FAST, "--arch", "test_vit", "--struct", "merge", "--prune_type", "pt", *args]
    assert_refused(argv, str(tmp_path / "run"), capsys, message)


def test_cli_rounds_merge_tokens_and_save_the_merger(tmp_path):
    directory = str(tmp_path / "run")
    result = run_main(*MERGE_VIT, "--pruning_times", "3", "--epochs", "1", "--save_dir", directory)
    assert "patch tokens after merging per round: 4, 3, 2" in result.stdout
    assert "round 2: --struct merge runs 1 prefix + 2 patch tokens (4 patch tokens merged into 2" in result.stdout
    assert "round 2: --struct merge model: 317,451 parameters, 2.168 MFLOPs per image, eval " in result.stdout
    rounds = [r for r in read_jsonl(paths.metrics_file(directory)) if r["type"] == "round"]
    assert [r["tokens_kept"] for r in rounds] == [5, 4, 3]
    assert [r["mean_tokens_per_block"] for r in rounds] == [5.0, 4.17, 3.33]  # block 0 sees all 5
    assert all(r["remaining_pct"] == 100.0 and r["eval_images_per_second"] > 0 for r in rounds)
    saved = checkpoint.load(paths.round_checkpoint(directory, 2))["model"]
    assert tuple(saved["token_merger.assign_query.weight"].shape) == (64, 64)


@pytest.mark.slow  # three runs and a resume of 2 rounds x 2 epochs: 160 s measured on 2 busy shared cores
def test_killed_and_extended_merge_runs_resume_bit_identically(tmp_path):
    args = resume_args(MERGE_VIT, 2)
    reference = str(tmp_path / "reference")
    run_main(*args, "--save_dir", reference)
    expected = round_outcome(reference, 2)
    killed = str(tmp_path / "killed")  # a kill mid-round 1: latest.pth.tar holds the merger
    latest = paths.latest_checkpoint(killed)
    kill_run_when(args, killed, lambda r: r.get("round") == 1 and r.get("epoch") == 1 and os.path.isfile(latest))
    assert "token_merger.assign_key.weight" in checkpoint.load(latest)["model"]
    run_main(*args, "--save_dir", killed, "--resume")
    assert_same_outcome(round_outcome(killed, 2), expected)
    extended = str(tmp_path / "extended")  # round 0 finished, then one more round: the merger made on resume
    run_main(*resume_args(MERGE_VIT, 1), "--save_dir", extended)
    run_main(*args, "--save_dir", extended, "--resume")
    assert_same_outcome(round_outcome(extended, 2), expected)


def test_a_checkpoint_of_another_struct_is_refused_naming_both_structs():
    """A --struct lowrank run branched or resumed from a merge checkpoint: its model lacks the merger."""
    from utils.errors import CheckpointError
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10)
    mode = merge_mode()
    mode.check_model(model)
    start_round(mode, model, 1)
    payload = {"model": model.state_dict(), "config": mode.config.to_dict()}
    ours = RunConfig(arch="vit_tiny", struct="lowrank", prune_type="pt").to_dict()
    with pytest.raises(CheckpointError, match=r"^c\.pth\.tar: the checkpoint was saved by --struct merge and this "
                                              r"run is --struct lowrank; their models differ \(\['token_merger\."):
        checkpoint.check_compatible("c.pth.tar", payload, create_model("vit_tiny", 10).state_dict(), ours)
