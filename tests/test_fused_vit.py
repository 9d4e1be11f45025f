"""The grouped route for timm ViTs (training/fused/vit.py): N ViTs as one model of N-times-wide tokens compute what
the N models compute, for the ViT variants it takes, and refuse the others in one line."""
import pytest
import torch
from timm.layers import DropPath, SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer

from training.fused import fuse_models
from training.fused.fuse import route_refusal
from training.fused.vit import FusedDropPath, FusedLayerNorm

pytestmark = pytest.mark.usefixtures("one_thread")


def vits(seeds, **kwargs):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                                  **kwargs)
        for p in model.parameters():  # timm inits cls/pos/LayerScale to constants: make every cell's numbers its own
            p.data.add_(0.05 * torch.randn_like(p))
        models.append(model)
    return models


@pytest.mark.parametrize("kwargs", [{}, {"init_values": 0.1, "global_pool": "avg", "fc_norm": True},
                                    {"global_pool": "avg", "fc_norm": False, "qkv_bias": False},
                                    {"drop_path_rate": 0.2, "patch_drop_rate": 0.25}])
def test_fused_vit_variants_match_each_model(kwargs):
    models = [model.eval() for model in vits([1, 2, 3], **kwargs)]  # eval: no dropout, DropPath, PatchDropout
    fused = fuse_models(models, "grouped").eval()
    assert type(fused).__name__ == "GroupedViTFusedModel" and fused.route == "grouped"
    images = torch.randn(3, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = fused(images)
        expected = torch.stack([model(x) for model, x in zip(models, images)])
    assert logits.shape == (3, 5, 10)
    assert (logits - expected).abs().max() <= 1e-5
    assert (expected[0] - expected[1]).abs().max() > 1e-2  # the cells differ
    # where the tensors live: stacked cls / pos, batched Linears, LayerNorm (and LayerScale) gammas end to end
    state = fused.fused_state
    assert state["cls_token"][0].shape == (3, 1, 32) and state["pos_embed"][0].shape == (3, 17, 32)
    assert state["blocks.0.attn.qkv.weight"][0].shape == (3, 96, 32)
    assert state["blocks.1.norm2.weight"][0].shape == (96,)
    assert state["blocks.1.norm2.weight"][1][2] == slice(64, 96)
    if "init_values" in kwargs:
        assert state["blocks.0.ls1.gamma"][0].shape == (96,)


def test_gradients_reach_each_cell_as_in_its_own_model():
    models = vits([1, 2], init_values=0.1)
    fused = fuse_models(models, "grouped")
    images = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (2, 4), generator=torch.Generator().manual_seed(2))
    torch.nn.functional.cross_entropy(fused(images).flatten(0, 1), labels.flatten(), reduction="sum").backward()
    for i, model in enumerate(models):
        torch.nn.functional.cross_entropy(model(images[i]), labels[i], reduction="sum").backward()
        for name, (tensor, index) in fused.fused_params.items():
            own = dict(model.named_parameters())[name].grad
            assert (tensor.grad[index[i]] - own).abs().max() <= 1e-5 * (1 + own.abs().max()), (i, name)


def test_random_drops_are_drawn_per_cell_and_sample():
    """DropPath keeps each (cell, sample) with probability 1 - p on its own (scaled by 1 / keep); PatchDropout
    keeps its share of each cell's patches; the training forward runs."""
    drop = FusedDropPath(DropPath(0.5)).train()
    out = drop(torch.ones(2, 4000, 3, 5))
    kept = out[:, :, 0, 0]
    assert set(out.unique().tolist()) == {0.0, 2.0} and torch.equal(out, out[:, :, :1, :1].expand_as(out))
    assert abs(float((kept > 0).float().mean()) - 0.5) < 0.03 and not torch.equal(kept[0], kept[1])
    assert torch.equal(drop.eval()(out), out)
    models = vits([1, 2], drop_path_rate=0.2, patch_drop_rate=0.5)
    fused = fuse_models(models, "grouped").train()
    assert type(fused.model.blocks[1].drop_path1) is FusedDropPath
    logits = fused(torch.randn(2, 3, 3, 32, 32))
    assert logits.shape == (2, 3, 10) and torch.isfinite(logits).all()


def test_fused_layer_norm_normalises_each_cell_alone():
    norm = torch.nn.LayerNorm(4)
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 100.0, 100.0, 100.0, 101.0]])
    first = torch.nn.functional.layer_norm(x[:, :4], (4,), eps=norm.eps) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    second = torch.nn.functional.layer_norm(x[:, 4:], (4,), eps=norm.eps) + 0.5
    assert float(second[0, 3]) == pytest.approx(3 ** 0.5 + 0.5, rel=1e-4)  # cell 1's statistics, not the row's
    for stacked in (False, True):
        fused = FusedLayerNorm(2, norm, stacked=stacked)
        fused.weight.data = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0])
        fused.bias.data = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
        if stacked:  # [N, 1, D]: each cell's row, each cell's weight and bias
            out = fused(x.view(2, 1, 4))
            assert torch.allclose(out, torch.stack([first, second]), atol=1e-6)
        else:  # [1, N*D]: cell-major features
            assert torch.allclose(fused(x), torch.cat([first, second], dim=1), atol=1e-6)


def test_refusals_name_what_the_route_cannot_take():
    swiglu = vits([1], mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2.0)[0]
    assert route_refusal("grouped", swiglu) == \
        "grouped ViT fusion takes timm's plain ViT; this one differs in: blocks.0.mlp (GluMlp); blocks.1.mlp (GluMlp)"
    map_pool = vits([1], global_pool="map")[0]
    assert route_refusal("grouped", map_pool).startswith("grouped ViT fusion takes timm's plain ViT; this one differs "
                                                         "in: global_pool 'map'")
    assert route_refusal("grouped", vits([1], qk_norm=True)[0]) == "grouped ViT fusion takes timm's plain ViT; " \
        "this one differs in: blocks.0.attn (q/k norm or gate); blocks.1.attn (q/k norm or gate)"
    no_class_token = vits([1], class_token=False, global_pool="avg")[0]
    assert route_refusal("grouped", no_class_token).endswith("differs in: no class token")
    assert route_refusal("streams", map_pool) is None  # the way out the error names
    fused = fuse_models(vits([1, 2], dynamic_img_size=True), "grouped")  # timm's own PatchEmbed would take 40 px
    with pytest.raises(ValueError, match=r"^images of \(40, 40\) give 25 patches; the fused ViT was built for 16$"):
        fused(torch.zeros(2, 1, 3, 40, 40))


def test_auto_takes_the_grouped_vit_route_when_the_step_compiles():
    from models import create_model
    from training.fused.fuse import auto_route
    with torch.device("meta"):
        vit, resnet, reg_tokens = (create_model(arch, 10) for arch in ("vit_tiny", "res20s", "test_vit2"))
    assert [auto_route(vit, compiled) for compiled in (False, True)] == ["streams", "grouped"]
    assert [auto_route(resnet, compiled) for compiled in (False, True)] == ["grouped", "grouped"]
    assert auto_route(reg_tokens, compiled=True) == "streams"  # the grouped ViT route refuses register tokens
    assert type(fuse_models(vits([1, 2]), compiled=True)).__name__ == "GroupedViTFusedModel"
    assert fuse_models(vits([1, 2])).route == "streams"
