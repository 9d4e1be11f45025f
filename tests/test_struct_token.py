"""`--struct token`: the kept-token schedule, model checks, checkpoint-stable hooks, training, CLI and resume."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, kill_run_when, read_jsonl, run_main
from models import create_model
from pruners.base import PruneContext
from pruners.masks import dense_masks, prunable_weights
from pruners.token import TokenPruning, token_budget
from tokens.anchor import gather_tokens, select_tokens
from tokens.patching import pruning_attached
from utils import checkpoint, paths
from utils.config import RunConfig
from utils.errors import UsageError

# test_vit: patch 16 on 32x32 -> 4 patches + cls; a small train split (600 images) keeps an epoch at seconds
TOKEN_VIT = [*FAST, "--arch", "test_vit", "--struct", "token", "--rate", "0.5", "--token_keep", "3,2",
             "--val_size", "2400"]


def token_mode(**fields):
    return TokenPruning(RunConfig(**{"arch": "vit_tiny", "struct": "token", "pruning_times": 3, **fields}))


@pytest.fixture(scope="module")
def vit_tiny():
    torch.manual_seed(0)
    return create_model("vit_tiny", 10)


def test_budget_compounds_the_rate_and_follows_token_keep():
    assert [token_budget(k, 64, 0.5) for k in range(4)] == [64, 32, 16, 8]
    assert [token_budget(k, 64, 0.3) for k in range(3)] == [64, 45, 31]  # round(44.8), round(31.36)
    assert token_budget(12, 64, 0.5) == 1  # never below one patch token
    assert [token_budget(k, 64, 0.5, (40, 20)) for k in range(5)] == [64, 40, 20, 20, 20]  # the last value repeats


def test_check_model_rejects_resnets_and_budgets_that_prune_nothing(vit_tiny):
    with pytest.raises(UsageError, match=r"--struct token: needs a ViT.*--arch res20s"):
        TokenPruning(RunConfig(arch="res20s", struct="token")).check_model(create_model("res20s", 10))
    with pytest.raises(UsageError, match=r"--token_keep 40,64: round 2 would keep 64 of the 64 patch tokens"):
        token_mode(token_keep=(40, 64)).check_model(vit_tiny)
    with pytest.raises(UsageError, match=r"--rate 0.005: round 1 would keep 64"):
        token_mode(rate=0.005).check_model(vit_tiny)
    with pytest.raises(UsageError, match=r"--token_start_block 9: .* has 9 blocks"):
        token_mode(token_start_block=9).check_model(vit_tiny)
    with pytest.raises(UsageError, match="--vit_structured"):
        token_mode(vit_structured=True).check_model(vit_tiny)
    token_mode(token_keep=(63, 1)).check_model(vit_tiny)


def test_state_dict_is_the_same_with_pruning_attached(vit_tiny):
    plain = {k: v.clone() for k, v in vit_tiny.state_dict().items()}
    names = [n for n, _ in vit_tiny.named_parameters()]
    mode = token_mode()
    mode.check_model(vit_tiny)
    mode.configure_model(vit_tiny, 1)
    try:
        attached = vit_tiny.state_dict()
        assert list(attached) == list(plain)
        assert all(torch.equal(attached[k], plain[k]) for k in plain)
        assert [n for n, _ in vit_tiny.named_parameters()] == names
        fresh = create_model("vit_tiny", 10)
        fresh.load_state_dict(attached)  # strict: a checkpoint written mid-round loads into a plain model
        vit_tiny.load_state_dict(plain)  # and a plain one into the attached model (rewinding)
    finally:
        mode.detach()
    assert not pruning_attached(vit_tiny)


def test_configure_model_swaps_budgets_each_round_and_reports_them(vit_tiny):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in vit_tiny.blocks]
    mode = token_mode(token_keep=(32, 16))
    mode.check_model(vit_tiny)
    images = torch.randn(2, 3, 32, 32)
    records = []
    try:
        for round_index in range(3):
            mode.configure_model(vit_tiny, round_index)  # detaches the previous round's pruning first
            seen.clear()
            with torch.no_grad():
                vit_tiny.eval()(images)
            records.append((seen[:2], mode.round_metrics()))
    finally:
        mode.detach()
        for hook in hooks:
            hook.remove()
    assert [r[0] for r in records] == [[65, 65], [65, 33], [65, 17]]
    metrics = [r[1] for r in records]
    assert [m["tokens_kept"] for m in metrics] == [65, 33, 17]
    assert [m["patch_tokens_kept"] for m in metrics] == [64, 32, 16]
    assert [m["token_budget_fraction"] for m in metrics] == [1.0, 0.5, 0.25]
    assert all(m["eval_images_per_second"] > 0 for m in metrics)


def test_plan_round_keeps_every_weight(vit_tiny):
    weights = prunable_weights(vit_tiny, exclude=(vit_tiny.get_classifier(),))
    masks = dense_masks(weights)
    ctx = PruneContext(model=vit_tiny, weights=weights, config=token_mode().config, round_index=1,
                       calibration_batches=lambda: iter(()), log=lambda message: None)
    plan = token_mode().plan_round(ctx, masks)
    assert plan.train_masks is masks and plan.final_masks is masks and plan.penalty_masks is None


def reference_logits(model, images, k, m, alpha, start_block):
    """The same forward written out, the kept tokens chosen without autograd and gathered with it."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for index, block in enumerate(model.blocks):
        if index == start_block:
            with torch.no_grad():
                attn = block.attn
                qkv = attn.qkv(block.norm1(t)).unflatten(-1, (3, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4)
                keep = select_tokens(t, qkv[1], qkv[0], k, m, alpha).keep
            t = gather_tokens(t, keep)
        t = block(t)
    return model.forward_head(model.norm(t))


def gradients(model, logits, labels):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(logits, labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_training_with_pruning_attached_sends_gradients_through_the_kept_tokens():
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    expected = gradients(model, reference_logits(model, images, 10, 6, 0.5, 1), labels)
    mode = token_mode(token_keep=(16,))
    mode.check_model(model)
    mode.configure_model(model, 1)
    try:
        got = gradients(model, model(images), labels)
    finally:
        mode.detach()
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name
    assert float(got["patch_embed.proj.weight"].abs().sum()) > 0


def test_cli_rounds_log_a_shrinking_token_budget(tmp_path):
    directory = str(tmp_path / "run")
    result = run_main(*TOKEN_VIT, "--pruning_times", "3", "--epochs", "1", "--save_dir", directory)
    assert "patch tokens kept per round: 4, 3, 2" in result.stdout
    assert "round 2: --struct token keeps 1 prefix + 2/4 patch tokens" in result.stdout
    records = read_jsonl(paths.metrics_file(directory))
    rounds = [r for r in records if r["type"] == "round"]
    assert [r["tokens_kept"] for r in rounds] == [5, 4, 3]
    assert all(r["remaining_pct"] == 100.0 and r["eval_images_per_second"] > 0 for r in rounds)
    assert all(r["images_per_second"] > 0 for r in records if r["type"] == "epoch")


@pytest.mark.slow  # ~36 s; the token-specific part (a checkpoint saved with pruning attached) is the
# default-suite test_state_dict_is_the_same_with_pruning_attached, the resume machinery test_crash_resume
def test_killed_token_run_resumes_bit_identically(tmp_path):
    args = [*TOKEN_VIT, "--prune_type", "pt", "--pruning_times", "2", "--epochs", "2", "--deterministic",
            "--checkpoint_interval", "0"]
    reference = str(tmp_path / "reference")
    run_main(*args, "--save_dir", reference)
    killed = str(tmp_path / "killed")
    latest = paths.latest_checkpoint(killed)  # written mid-round, with pruning attached (atomically)
    kill_run_when(args, killed, lambda r: r.get("round") == 1 and r.get("epoch") == 1 and os.path.isfile(latest))
    assert checkpoint.load(latest)["round"] == 1
    run_main(*args, "--save_dir", killed, "--resume")
    ours, theirs = (checkpoint.load(paths.round_checkpoint(d, 1)) for d in (killed, reference))
    assert list(ours["model"]) == list(theirs["model"])
    for name in theirs["model"]:
        assert torch.equal(ours["model"][name], theirs["model"][name]), name
    keys = ("type", "round", "epoch", "train_loss", "val_top1", "test_top1", "tokens_kept", "remaining_pct")

    def comparable(directory):
        return [{k: r.get(k) for k in keys} for r in read_jsonl(paths.metrics_file(directory))]
    assert comparable(killed) == comparable(reference)


@pytest.mark.slow
def test_vit_tiny_three_rounds_halve_the_tokens(tmp_path):
    directory = str(tmp_path / "vit_tiny")
    run_main("--dataset", "synthetic", "--arch", "vit_tiny", "--struct", "token", "--rate", "0.5",
             "--pruning_times", "3", "--epochs", "1", "--batch_size", "64", "--lr", "0.05", "--no_wandb",
             "--no_progress", "--val_size", "2400", "--save_dir", directory)  # 600 training images: 9 steps
    records = read_jsonl(paths.metrics_file(directory))
    rounds = [r for r in records if r["type"] == "round"]
    assert [r["tokens_kept"] for r in rounds] == [65, 33, 17]
    assert [r["patch_tokens_kept"] for r in rounds] == [64, 32, 16]
    assert all(r["remaining_pct"] == 100.0 for r in rounds)
    assert all(r["images_per_second"] > 0 for r in records if r["type"] == "epoch")
