"""The five checks users run on head-level quasi-structured ViT pruning."""
import pytest
import torch

from models import create_model, dense_modules
from pruners.base import PruneContext
from pruners.criteria import CRITERIA
from pruners.groups import find_attention_groups
from pruners.heads import combined_density, head_masks, head_scores, is_head_structured, regroup_to_heads
from pruners.masks import dense_masks, global_magnitude_masks, prunable_weights, remaining_count
from pruners.rsst import RSST
from utils.cli import parse_config


def vit_context(criteria="magnitude", rate=0.3, target="head", seed=0, struct="rsst", fillback_rate=0.0):
    torch.manual_seed(seed)
    model = create_model("vit_tiny", 10)
    weights = prunable_weights(model, exclude=dense_modules(model))
    config = parse_config(["--arch", "vit_tiny", "--dataset", "synthetic", "--struct", struct, "--vit_structured",
                           "--criteria", criteria, "--rate", str(rate), "--vit_prune_target", target,
                           "--fillback_rate", str(fillback_rate)])
    batches = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.arange(8) % 10)
               for i in range(2)]
    logs = []
    ctx = PruneContext(model=model, weights=weights, config=config, round_index=1,
                       calibration_batches=lambda: iter(batches), log=logs.append)
    return ctx, logs


def test_1_global_elementwise_l1_is_exact():
    ctx, _ = vit_context()
    weights = {name: w.detach() for name, w in ctx.weights.items()}
    masks = global_magnitude_masks(weights, dense_masks(weights), 0.3)
    total = sum(w.numel() for w in weights.values())
    assert remaining_count(masks) == total - (total - round(total * 0.7))
    kept = torch.cat([w.abs().flatten()[m.flatten() != 0] for w, m in zip(weights.values(), masks.values())])
    dropped = torch.cat([w.abs().flatten()[m.flatten() == 0] for w, m in zip(weights.values(), masks.values())])
    assert kept.min() >= dropped.max()  # one global threshold across all layers


def test_2_head_regroup_matches_density_and_picks_top_heads():
    qkv = torch.ones(3 * 12, 4)
    proj = torch.ones(12, 12)
    qkv[:, :2] = 0  # element-wise density of the block: (36*2 + 144) / (144 + 144) = 0.75
    scores = torch.tensor([5.0, 1.0, 3.0, 4.0])
    new_qkv, new_proj, keep = regroup_to_heads(qkv, proj, scores)
    assert keep.tolist() == [True, False, True, True]  # round(0.75 * 4) = 3 heads, the lowest score goes
    rows = new_qkv.view(3, 4, 3, 4)
    assert torch.all(rows[:, 1] == 0) and torch.all(rows[:, [0, 2, 3]] == 1)
    assert torch.all(new_proj.view(12, 4, 3)[:, 1] == 0) and torch.all(new_proj.view(12, 4, 3)[:, 0] == 1)
    assert head_scores(torch.arange(6.0), 2).tolist() == [0 + 2 + 4, 1 + 3 + 5]  # [3, heads, head_dim=1]


def test_2b_head_count_compounds_over_rounds():
    # 3 heads of dim 1: after a previous round kept heads 0 and 1, the block's density is 24/36
    qkv, proj = head_masks(torch.tensor([True, True, False]), torch.ones(9, 3), torch.ones(3, 3))
    assert combined_density(qkv, proj) == pytest.approx(24 / 36)
    qkv.view(-1)[torch.nonzero(qkv.view(-1))[:7, 0]] = 0  # this round's element-wise step: 17/36 ~ 0.47
    _, _, keep = regroup_to_heads(qkv, proj, torch.tensor([1.0, 2.0, 0.0]))
    assert keep.tolist() == [False, True, False]  # round(0.47 * 3) = 1 head: compounding, not stuck at 2


@pytest.mark.parametrize("criteria", CRITERIA)
def test_3_every_criteria_gives_whole_heads(criteria):
    ctx, logs = vit_context(criteria)
    plan = RSST(ctx.config).plan_round(ctx, dense_masks(ctx.weights))
    for group in find_attention_groups(ctx.model):
        assert is_head_structured(plan.final_masks[f"{group.qkv}.weight"], plan.final_masks[f"{group.proj}.weight"],
                                  group.num_heads)
    assert f"criteria={criteria}" in logs[0] and "keep 2/3 heads" in logs[0]


def test_3b_criteria_differ_where_they_should():
    ctx, _ = vit_context()
    group = find_attention_groups(ctx.model)[0]
    qkv = dict(ctx.model.named_modules())[group.qkv]
    with torch.no_grad():
        qkv.weight.view(3, 3, 64, 192)[:, 1] *= 3.0  # head 1: large weights
        qkv.bias.view(3, 3, 64)[:, 2] += 50.0  # head 2: huge outputs (bias), small weights
    from pruners.criteria import output_scores
    masks = dense_masks(ctx.weights)
    per_head = {c: head_scores(output_scores(c, {group.qkv: qkv}, masks, ctx.model, ctx.calibration_batches)
                               [group.qkv], 3) for c in CRITERIA}
    assert int(per_head["magnitude"].argmax()) == 1
    assert int(per_head["l1"].argmax()) == 2 and int(per_head["l2"].argmax()) == 2
    assert torch.allclose(per_head["remain"], torch.full((3,), 3 * 64 * 192.0))
    assert not torch.allclose(per_head["saliency"], per_head["l1"])


def test_4_masks_are_head_level_in_qkv_and_proj_for_both_targets():
    ctx, _ = vit_context(target="both", rate=0.5)
    plan = RSST(ctx.config).plan_round(ctx, dense_masks(ctx.weights))
    for group in find_attention_groups(ctx.model):
        assert is_head_structured(plan.final_masks[f"{group.qkv}.weight"], plan.final_masks[f"{group.proj}.weight"],
                                  group.num_heads)
    fc1 = plan.final_masks["blocks.0.mlp.fc1.weight"]
    fc2 = plan.final_masks["blocks.0.mlp.fc2.weight"]
    alive = fc1.all(1)
    assert torch.all(fc1.any(1) == alive) and torch.equal(fc2.bool().all(0), alive) and torch.equal(fc2.bool().any(0), alive)
    assert not is_head_structured(torch.rand(9, 3) < 0.5, torch.ones(3, 3), 3)


def test_5_mask_shapes_match_and_penalty_targets_exactly_the_dropped_heads():
    ctx, _ = vit_context(rate=0.3)
    plan = RSST(ctx.config).plan_round(ctx, dense_masks(ctx.weights))
    for name, weight in ctx.weights.items():
        for masks in (plan.train_masks, plan.final_masks, plan.penalty_masks):
            assert masks[name].shape == weight.shape
        # penalised = kept by the element-wise mask and dropped by the structure; never both trained and final
        assert torch.all(plan.penalty_masks[name] * plan.final_masks[name] == 0)
        assert torch.all(plan.train_masks[name] >= plan.final_masks[name])
        assert torch.all(plan.train_masks[name] >= plan.penalty_masks[name])
    qkv = plan.penalty_masks["blocks.0.attn.qkv.weight"].view(3, 3, 64, 192)
    dropped = [h for h in range(3) if not plan.final_masks["blocks.0.attn.qkv.weight"].view(3, 3, 64, 192)[:, h].any()]
    assert len(dropped) == 1 and qkv[:, dropped[0]].sum() > 0.6 * 3 * 64 * 192
    assert RSST(ctx.config).reg_lambda(1.0) == pytest.approx(1.0)


def test_vit_structured_needs_a_vit():
    from utils.errors import UsageError
    config = parse_config(["--arch", "res20s", "--struct", "rsst", "--vit_structured"])
    with pytest.raises(UsageError, match="--vit_structured: --arch res20s"):
        RSST(config).check_model(create_model("res20s", 10))


def test_refill_plus_adds_heads_and_neurons_with_vit_structured():
    """The mission's command (--struct refill --vit_structured --criteria magnitude --rate 0.3) with fillback
    0, 0.1 and 0.5: refill+ adds round((C - k) x fillback_rate) neurons / heads, and the header says so."""
    from pruners.refill import Refill
    kept, heads = {}, {}
    for fillback in (0.0, 0.1, 0.5):
        ctx, logs = vit_context(target="both", struct="refill", fillback_rate=fillback)
        masks = Refill(ctx.config).plan_round(ctx, dense_masks(ctx.weights)).final_masks
        kept[fillback] = int(masks["blocks.0.mlp.fc1.weight"].all(1).sum())
        heads[fillback] = int(masks["blocks.0.attn.qkv.weight"].view(3, 3, 64, 192)[0].flatten(1).all(1).sum())
        assert f"rate=0.3 fillback_rate={fillback} mode=refill" in logs[0]
        assert f"blocks.0.mlp.fc1  keep {kept[fillback]}/384 neurons" in logs[0]
    base = kept[0.0]
    assert 200 < base < 384
    assert kept[0.1] == base + round((384 - base) * 0.1) and kept[0.5] == base + round((384 - base) * 0.5)
    assert heads == {0.0: 2, 0.1: 2, 0.5: 2}  # 2 + round(1 x 0.5): round() takes the half to even, 0
