"""timm families beyond the five built-in models (issue 16, section 2): each representative, built tiny
at 32x32, goes through head/neuron regrouping with every criteria and keeps its stem and classifier
head(s) dense, or is refused before any work with one line naming --arch and the reason."""
import functools

import pytest
import timm
import torch
from timm.layers import Attention, SwiGLU

from conftest import FAST, run_main
from models import classifier_modules, dense_modules, stem_modules
from pruners.base import PruneContext
from pruners.criteria import CRITERIA
from pruners.groups import find_attention_groups, find_mlp_groups
from pruners.heads import is_head_structured
from pruners.masks import dense_masks, prunable_weights
from pruners.refill import Refill
from utils import checkpoint, paths
from utils.cli import parse_config
from utils.errors import UsageError


def build(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, img_size=32, **kwargs)


def wide_attention():
    """Attention width 2 x 16 = 32 inside a 64-wide embedding."""
    model = build("vit_tiny_patch16_224", depth=1, embed_dim=64, num_heads=2)
    model.blocks[0].attn = Attention(64, num_heads=2, attn_head_dim=16, qkv_bias=True)
    return model


FAMILIES = {
    "distilled": (functools.partial(build, "deit_tiny_distilled_patch16_224", depth=1), CRITERIA),
    "registers": (functools.partial(build, "vit_base_patch16_reg4_gap_256", depth=1, embed_dim=64, num_heads=2),
                  ("magnitude", "l2")),
    "swiglu": (functools.partial(build, "vit_tiny_patch16_224", depth=1, mlp_layer=SwiGLU), CRITERIA),
    "packed_glu_eva02": (functools.partial(build, "eva02_tiny_patch14_224", depth=1), ("remain", "magnitude")),
    "qk_norm": (functools.partial(build, "vit_tiny_patch16_224", depth=1, qk_norm=True), ("magnitude", "saliency")),
    "attention_width": (wide_attention, ("remain", "l1")),
}
# every criteria on two families, two each on the others (the criteria math itself: test_fidelity.py)
CASES = [(family, criteria) for family, (_, allowed) in FAMILIES.items() for criteria in allowed]


def context(model, arch, criteria, *extra):
    config = parse_config(["--arch", "vit_tiny", "--dataset", "synthetic", "--struct", "refill", "--criteria",
                           criteria, "--rate", "0.5", *extra]).replace(arch=arch)  # the arch only names errors
    weights = prunable_weights(model, exclude=dense_modules(model, config.conv1, config.prune_classifier))
    batches = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.arange(4)) for i in
               range(2)]
    logs = []
    return PruneContext(model=model, weights=weights, config=config, round_index=1,
                        calibration_batches=lambda: iter(batches), log=logs.append), logs


@pytest.mark.parametrize("family,criteria", CASES)
def test_family_regroups_to_whole_heads_and_neurons(family, criteria):
    model = FAMILIES[family][0]()
    ctx, logs = context(model, family, criteria, "--vit_structured", "--fillback_rate", "0.2")
    mode = Refill(ctx.config)
    mode.check_model(model)
    plan = mode.plan_round(ctx, dense_masks(ctx.weights))
    masks = plan.final_masks
    for group in find_attention_groups(model):
        assert is_head_structured(masks[f"{group.qkv}.weight"], masks[f"{group.proj}.weight"], group.num_heads)
    groups = find_mlp_groups(model)
    assert groups
    for group in groups:
        fc1 = torch.cat([masks[f"{row}.weight"] for row in group.rows]).bool()
        per_neuron = fc1.all(1).view(-1, group.hidden)
        assert torch.equal(fc1.all(1), fc1.any(1)) and bool((per_neuron == per_neuron[0]).all())
        assert torch.equal(masks[f"{group.fc2}.weight"].bool().all(0), per_neuron[0])
        assert 0 < int(per_neuron[0].sum()) < group.hidden
    assert not set(masks) & {"head.weight", "head_dist.weight", "patch_embed.proj.weight"}
    assert "fillback_rate=0.2" in logs[0]


def test_distilled_model_keeps_both_classifier_heads_and_the_stem_dense():
    model = build("deit_tiny_distilled_patch16_224", depth=1)
    assert classifier_modules(model) == [model.head, model.head_dist]
    assert stem_modules(model) == [model.patch_embed.proj]
    names = set(prunable_weights(model, exclude=dense_modules(model)))
    assert not names & {"head.weight", "head_dist.weight", "patch_embed.proj.weight"}
    assert {"head.weight", "head_dist.weight"} <= set(prunable_weights(model, exclude=dense_modules(model, False, True)))
    assert "patch_embed.proj.weight" in prunable_weights(model, exclude=dense_modules(model, True, False))


def test_timm_resnet18_at_32px_channel_refill_keeps_stem_and_fc_dense():
    model = timm.create_model("resnet18", num_classes=10, stem_width=8, channels=(8, 16, 16, 16))
    assert model.eval().forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (1, 1)  # 1x1 final maps
    assert stem_modules(model) == [model.conv1] and classifier_modules(model) == [model.fc]
    for criteria in ("magnitude", "l2", "saliency"):
        ctx, logs = context(model, "resnet18", criteria)
        mode = Refill(ctx.config)
        mode.check_model(model)
        masks = mode.plan_round(ctx, dense_masks(ctx.weights)).final_masks
        assert "conv1.weight" not in masks and "fc.weight" not in masks
        for name, mask in masks.items():
            rows = mask.reshape(mask.shape[0], -1).bool()
            assert torch.equal(rows.all(1), rows.any(1)), (criteria, name)
    with pytest.raises(UsageError, match="--vit_structured: --arch resnet18 has no ViT attention blocks"):
        Refill(context(model, "resnet18", "l1", "--vit_structured")[0].config).check_model(model)


def scale_norm_model():
    model = build("vit_tiny_patch16_224", depth=1, embed_dim=64, num_heads=2)
    model.blocks[0].attn = Attention(64, num_heads=2, scale_norm=True, norm_layer=torch.nn.LayerNorm)
    return model


def gated_model():
    model = build("vit_tiny_patch16_224", depth=1, embed_dim=64, num_heads=2)
    model.blocks[0].attn = Attention(64, num_heads=2, gated=True)
    return model


@pytest.mark.parametrize("make,criteria,message", [
    (scale_norm_model, "magnitude", r"blocks\.0\.attn \(Attention\): a norm over all heads' outputs"),
    (gated_model, "magnitude", r"blocks\.0\.attn \(Attention\): gated attention"),
    (functools.partial(build, "eva02_tiny_patch14_224", depth=1, qkv_fused=False), "magnitude",
     r"blocks\.0\.attn \(EvaAttention\) has attention heads but no fused qkv \+ proj"),
    (functools.partial(build, "vit_base_patch16_siglip_224", depth=1, embed_dim=64, num_heads=2), "remain",
     r"attn_pool \(AttentionPoolLatent\) has attention heads but no fused qkv"),
    (functools.partial(build, "eva02_tiny_patch14_224", depth=1), "l1",
     r"--criteria l1: --arch x: blocks\.0\.attn\.qkv is never called as a module"),
    (functools.partial(build, "vit_tiny_patch16_224", depth=1, scale_mlp_norm=True), "magnitude",
     r"blocks\.0\.mlp \(Mlp\): a norm over the hidden features"),
])
def test_layouts_that_cannot_be_masked_exactly_are_refused_before_work(make, criteria, message):
    model = make()
    config = context(model, "x", criteria, "--vit_structured")[0].config
    with pytest.raises(UsageError, match=message) as error:
        Refill(config).check_model(model)
    assert "\n" not in str(error.value)
    if "never called" not in message:
        assert str(error.value).startswith("--vit_structured: --arch x: ")


def test_distilled_run_in_process_leaves_both_heads_dense(tmp_path, monkeypatch):
    """The issue's example with a one-block DeiT (the full model: test below, slow)."""
    import training.rounds
    monkeypatch.setattr(training.rounds, "create_model", lambda arch, classes: timm.create_model(
        arch, num_classes=classes, img_size=32, depth=1))
    config = parse_config(["--arch", "deit_tiny_distilled_patch16_224", "--dataset", "synthetic", "--struct", "none",
                           "--pruning_times", "2", "--epochs", "1", "--rate", "0.5", "--no_wandb", "--no_progress",
                           "--save_dir", str(tmp_path / "run"), "--batch_size", "256"])
    directory = training.rounds.run(config)
    final = checkpoint.load(paths.round_checkpoint(directory, 1))
    assert not set(final["masks"]) & {"head.weight", "head_dist.weight", "patch_embed.proj.weight"}
    for name in ("head.weight", "head_dist.weight", "patch_embed.proj.weight"):
        assert int((final["model"][name] == 0).sum()) == 0, name
    assert sum(int((~m).sum()) for m in final["masks"].values()) == pytest.approx(
        0.5 * sum(m.numel() for m in final["masks"].values()), abs=1)


@pytest.mark.slow
def test_distilled_cli_example_leaves_both_heads_dense(tmp_path):
    directory = str(tmp_path / "deit")
    run_main(*FAST, "--arch", "deit_tiny_distilled_patch16_224", "--struct", "none", "--pruning_times", "2",
             "--epochs", "1", "--rate", "0.5", "--save_dir", directory, timeout=1800)
    final = checkpoint.load(paths.round_checkpoint(directory, 1))
    for name in ("head.weight", "head_dist.weight"):
        assert name not in final["masks"] and int((final["model"][name] == 0).sum()) == 0
