"""Token scoring across the timm ViT families users pick (issue 16 §2), each tiny, on the CPU: handled exactly
(prefix tokens kept and never scored as patches; CLS attention equal to the block's own attention) or refused
with one line before any work."""
import functools

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import Attention, GluMlp
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer

from tokens import apply_pruning_to_model
from tokens.backends import find_target

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)  # 16 patches
K, M = 2, 4


def wide_attention():
    """Attention width 48 (2 heads x 24) on 32-wide tokens."""
    torch.manual_seed(0)
    model = VisionTransformer(**TINY)
    for block in model.blocks:
        block.attn = Attention(32, num_heads=2, attn_head_dim=24, qkv_bias=True)
    return model


FAMILIES = {
    "distilled (cls + dist)": lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **TINY),
    "register tokens": lambda: VisionTransformer(reg_tokens=3, **TINY),
    "qk-norm": lambda: VisionTransformer(qk_norm=True, **TINY),
    "attention width != embedding width": wide_attention,
    "GLU MLP": lambda: VisionTransformer(mlp_layer=functools.partial(GluMlp, gate_last=False), act_layer=nn.SiLU,
                                         mlp_ratio=2.0, **TINY),
    "layer scale + avg pool": lambda: VisionTransformer(init_values=0.1, global_pool="avg", fc_norm=True, **TINY),
}
PREFIX = {"distilled (cls + dist)": 2, "register tokens": 4}


@torch.no_grad()
def reference_cls_attention(block, x):
    """Head-mean softmax attention of the CLS query, written out from timm's qkv layout (q/k norms applied)."""
    attn = block.attn
    batch, count, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q[:, :, :1] * attn.scale) @ k.transpose(-1, -2)).softmax(-1).mean(1)[:, 0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_scored_exactly_and_keeps_its_prefix(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    images = torch.randn(3, 3, 32, 32)
    prefix = PREFIX.get(family, 1)
    assert find_target(model).num_prefix_tokens == prefix
    entering = {}
    grab = model.blocks[0].register_forward_hook(lambda mod, args, out: entering.update(x=out))
    with torch.no_grad():
        plain = model(images)
        with apply_pruning_to_model(model, K, M, 0.5, start_block=1, record=True) as handle:
            pruned = model(images)
            record = handle.recorder.to_dict()
        restored = model(images)
    grab.remove()
    assert handle.tokens_per_block() == [16 + prefix] + [prefix + K + M] * 2
    assert torch.equal(restored, plain) and pruned.shape == plain.shape and torch.isfinite(pruned).all()
    kept, anchors = record["kept_positions"][1], record["anchor_positions"][1]
    assert kept.shape == (3, prefix + K + M)
    assert torch.equal(kept[:, :prefix], torch.arange(prefix).expand(3, -1))  # every prefix token, every image
    assert (kept[:, prefix:] >= prefix).all() and (anchors >= prefix).all()  # patches are chosen among patches
    expected = reference_cls_attention(model.blocks[1], entering["x"])
    assert torch.allclose(record["cls_attention"][1], expected, atol=1e-6)
    # patches are ranked among themselves: the anchors are the top-K patches by CLS attention
    top = expected[:, prefix:].topk(K, dim=1).indices + prefix
    assert torch.equal(anchors.sort(1).values, top.sort(1).values)


@pytest.mark.parametrize("build, message", [
    (lambda: VisionTransformer(block_fn=ResPostBlock, **TINY), "block 0 is a ResPostBlock with Attention"),
    (lambda: VisionTransformer(block_fn=ParallelScalingBlock, **TINY), "block 0 is a ParallelScalingBlock"),
    (lambda: VisionTransformer(attn_layer="diff", **TINY), "block 0 is a Block with DiffAttention"),
    (lambda: VisionTransformer(class_token=False, reg_tokens=2, global_pool="avg", **TINY),
     "anchor pruning needs a class token"),
])
def test_other_blocks_are_refused_with_one_line_before_any_work(build, message):
    torch.manual_seed(0)
    model = build().eval()
    hooks_before = [dict(block._forward_pre_hooks) for block in model.blocks]
    with pytest.raises((TypeError, ValueError)) as info:
        apply_pruning_to_model(model, K, M, 0.5)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert [dict(block._forward_pre_hooks) for block in model.blocks] == hooks_before  # nothing attached
