"""apply_pruning_to_model on timm and open_clip ViTs: real token removal, per-sample choice, exact restore."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from open_clip.transformer import Transformer, VisionTransformer as ClipViT  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from models import create_model  # noqa: E402
from tokens import apply_pruning_to_model  # noqa: E402
from tokens.anchor import gather_tokens, select_tokens  # noqa: E402
from tokens.patching import fit_mask, pruning_attached  # noqa: E402


def count_tokens(blocks, sequence_first=False):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0 if sequence_first else 1]))
             for b in blocks]
    return seen, hooks


@pytest.fixture(scope="module")
def vit_tiny():
    torch.manual_seed(0)
    return create_model("vit_tiny", 10).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@torch.no_grad()
def reference_timm_forward(model, x, k, m, alpha, start_block):
    """Pruning written out with timm's own qkv layout and full queries, for comparison."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for index, block in enumerate(model.blocks):
        if index >= start_block and t.shape[1] > 1 + k + m:
            attn = block.attn
            batch, count, _ = t.shape
            qkv = attn.qkv(block.norm1(t)).reshape(batch, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            t = gather_tokens(t, select_tokens(t, qkv[1], qkv[0], k, m, alpha).keep)
        t = block(t)
    return model.forward_head(model.norm(t))


@torch.no_grad()
def test_vit_tiny_restore_is_bit_identical(vit_tiny, images):
    before = vit_tiny(images)
    originals = list(vit_tiny.blocks)
    state = {k: v.clone() for k, v in vit_tiny.state_dict().items()}
    handle = apply_pruning_to_model(vit_tiny, k_anchors=10, top_m=20, alpha=0.5)
    pruned = vit_tiny(images)
    assert not torch.allclose(pruned, before)
    handle.restore()
    assert torch.equal(vit_tiny(images), before)
    assert all(a is b for a, b in zip(vit_tiny.blocks, originals))
    assert all(torch.equal(v, state[k]) for k, v in vit_tiny.state_dict().items())


@torch.no_grad()
def test_vit_tiny_later_blocks_run_on_1_plus_k_plus_m_tokens(vit_tiny, images):
    seen, hooks = count_tokens(list(vit_tiny.blocks))
    with apply_pruning_to_model(vit_tiny, 10, 20, 0.5, start_block=2) as handle:
        vit_tiny(images)
        assert handle.tokens_per_block() == [65, 65] + [31] * 7
    for hook in hooks:
        hook.remove()
    assert seen == [65, 65] + [31] * 7
    assert not pruning_attached(vit_tiny)
    assert not any(b._forward_pre_hooks for b in vit_tiny.blocks)  # every hook is gone


@torch.no_grad()
def test_vit_tiny_matches_reference_with_full_queries(vit_tiny, images):
    expected = reference_timm_forward(vit_tiny, images, 10, 20, 0.3, 1)
    with apply_pruning_to_model(vit_tiny, 10, 20, 0.3):
        got = vit_tiny(images)
    assert torch.allclose(got, expected, atol=1e-5)


@torch.no_grad()
def test_vit_tiny_selection_is_per_sample(vit_tiny, images):
    with apply_pruning_to_model(vit_tiny, 10, 20, 0.5, record=True) as handle:
        batch = vit_tiny(images)
        alone = vit_tiny(images[2:3])
        kept = handle.recorder.to_dict()["kept_positions"][1]
    assert torch.allclose(batch[2:3], alone, atol=1e-5)
    assert kept.shape == (4, 31)  # 3 images, then 1
    assert not torch.equal(kept[0], kept[1]) and torch.equal(kept[2], kept[3])


@torch.no_grad()
def test_timm_attention_mask_follows_the_kept_tokens(vit_tiny, images):
    with apply_pruning_to_model(vit_tiny, 10, 20, 0.5):
        plain = vit_tiny.forward_features(images)
        masked = vit_tiny.forward_features(images, attn_mask=torch.zeros(65, 65))
    assert masked.shape == (3, 31, 192)
    assert torch.allclose(plain, masked, atol=1e-5)


def test_fit_mask_gathers_rows_and_columns_per_sample():
    mask = (10 * torch.arange(5)[:, None] + torch.arange(5)[None, :]).float()
    positions = torch.tensor([[0, 2, 3], [0, 1, 4]])
    out = fit_mask(mask, positions, num_heads=2, flat_heads=False)
    assert out.shape == (2, 1, 3, 3)
    assert out[0, 0].tolist() == [[0, 2, 3], [20, 22, 23], [30, 32, 33]]
    assert out[1, 0].tolist() == [[0, 1, 4], [10, 11, 14], [40, 41, 44]]
    flat = fit_mask(mask, positions, num_heads=2, flat_heads=True)
    assert flat.shape == (4, 3, 3) and torch.equal(flat[1], out[0, 0]) and torch.equal(flat[2], out[1, 0])


@pytest.mark.parametrize("name, tokens, k, m, batch", [("ViT-B-32", 50, 10, 20, 2), ("ViT-B-16", 197, 10, 50, 1)])
@torch.no_grad()
def test_open_clip_random_weights_prune_and_restore(name, tokens, k, m, batch):
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    with pytest.raises(ValueError, match=rf"keeps {tokens + 1} tokens.*only {tokens} tokens"):
        apply_pruning_to_model(model, k, tokens - k, 0.5)
    assert not pruning_attached(model)
    image = torch.randn(batch, 3, 224, 224)
    before = model.encode_image(image)
    seen, hooks = count_tokens(list(model.visual.transformer.resblocks))
    with apply_pruning_to_model(model, k, m, 0.5):
        pruned = model.encode_image(image)
    for hook in hooks:
        hook.remove()
    assert seen == [tokens] + [1 + k + m] * 11
    assert pruned.shape == before.shape and not torch.allclose(pruned, before)
    assert torch.equal(model.encode_image(image), before)


def small_clip_vit(**kwargs):
    torch.manual_seed(0)
    return ClipViT(image_size=32, patch_size=4, width=64, layers=3, heads=2, mlp_ratio=2.0, output_dim=32,
                   **kwargs).eval()


@torch.no_grad()
def test_open_clip_cls_attention_matches_multihead_attention_weights():
    visual = small_clip_vit()
    image = torch.randn(2, 3, 32, 32)
    inputs = []
    hook = visual.transformer.resblocks[1].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with apply_pruning_to_model(visual, 4, 8, 0.5, prune=False, record=True) as handle:
        visual(image)
        recorded = handle.recorder.to_dict()["cls_attention"][1]
    hook.remove()
    block = visual.transformer.resblocks[1]
    h = block.ln_1(inputs[0])
    _, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=True)
    assert torch.allclose(recorded, weights[:, 0], atol=1e-5)


@torch.no_grad()
def test_open_clip_sequence_first_blocks_give_the_same_result():
    batch_first = small_clip_vit()
    sequence_first = small_clip_vit()
    sequence_first.transformer = Transformer(64, 3, 2, 2.0, batch_first=False)
    sequence_first.load_state_dict(batch_first.state_dict())
    image = torch.randn(2, 3, 32, 32)
    assert torch.allclose(sequence_first(image), batch_first(image), atol=1e-5)
    seen, hooks = count_tokens(list(sequence_first.transformer.resblocks), sequence_first=True)
    with apply_pruning_to_model(batch_first, 4, 8, 0.5), apply_pruning_to_model(sequence_first, 4, 8, 0.5):
        expected, got = batch_first(image), sequence_first(image)
    for hook in hooks:
        hook.remove()
    assert seen == [65, 13, 13]
    assert torch.allclose(got, expected, atol=1e-5)


@torch.no_grad()
def test_open_clip_custom_attention_blocks_with_qk_norm():
    # (open_clip 3.3.0's own scaled-cosine path fails on 4-D tensors, so only qk_norm is exercised here)
    visual = small_clip_vit(block_type="custom", qk_norm=True)
    image = torch.randn(2, 3, 32, 32)
    before = visual(image)
    with apply_pruning_to_model(visual, 4, 8, 0.5, record=True) as handle:
        visual(image)
        record = handle.recorder.to_dict()
    assert [t.shape[1] for t in record["kept_positions"]] == [65, 13, 13]
    assert torch.allclose(record["cls_attention"][1].sum(1), torch.ones(2), atol=1e-5)
    assert torch.equal(visual(image), before)


def test_bad_arguments_and_models_are_rejected(vit_tiny):
    with pytest.raises(ValueError, match="start_block"):
        apply_pruning_to_model(vit_tiny, 4, 8, 0.5, start_block=9)
    with pytest.raises(ValueError, match="alpha"):
        apply_pruning_to_model(vit_tiny, 4, 8, 1.5)
    with pytest.raises(TypeError, match="timm VisionTransformer and open_clip"):
        apply_pruning_to_model(torch.nn.Linear(2, 2), 4, 8, 0.5)
    no_cls = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False,
                               global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        apply_pruning_to_model(no_cls, 2, 3, 0.5)
    with pytest.raises(ValueError, match="top_m must be >= 0"):
        apply_pruning_to_model(vit_tiny, 4, -1, 0.5)
    with apply_pruning_to_model(vit_tiny, 60, 20, 0.5, prune=False, record=True):  # recording only: no budget
        pass
    with apply_pruning_to_model(vit_tiny, 4, 8, 0.5):
        with pytest.raises(RuntimeError, match="already has anchor pruning"):
            apply_pruning_to_model(vit_tiny, 4, 8, 0.5)


@torch.no_grad()
def test_open_clip_scaled_cosine_reader_matches_the_formula():
    from tokens.anchor import attention_rows
    from tokens.backends import find_target
    visual = small_clip_vit(block_type="custom", scaled_cosine_attn=True)
    block, reader = visual.transformer.resblocks[1], find_target(visual).readers[1]
    x = torch.randn(2, 17, 64)
    keys, rows = reader(x)
    got = attention_rows(rows(torch.zeros(2, 1, dtype=torch.long)), keys, logit_scale=reader.logit_scale_value())
    q, k, _ = torch.nn.functional.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, -1)
    q, k = (t.unflatten(-1, (2, 32)).transpose(1, 2) for t in (q, k))
    scale = torch.clamp(block.attn.logit_scale, max=block.attn.logit_scale_max).exp()
    cosine = torch.nn.functional.normalize(q[:, :, :1], dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-1, -2)
    expected = torch.softmax(cosine * scale, dim=-1).mean(1)
    assert torch.allclose(got, expected, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("library", ["timm", "open_clip", "open_clip_mha"])
def test_folded_key_attention_matches_explicit_keys(library, vit_tiny):
    """QKReader.attend folds the query rows into W_k (no key tensor, key bias dropped by the softmax);
    it must give the same head-mean attention as q . k with the biased keys."""
    from tokens.anchor import attention_rows
    from tokens.backends import find_target
    import copy
    model = {"timm": lambda: copy.deepcopy(vit_tiny), "open_clip": lambda: small_clip_vit(block_type="custom"),
             "open_clip_mha": small_clip_vit}[library]()
    reader = find_target(model).readers[1]
    weight, bias = reader.weights()
    with torch.no_grad():
        bias.normal_(0, 0.5)  # a key bias that is far from zero: the fold must not depend on it
    x = torch.randn(3, 17, weight.shape[1])
    positions = torch.tensor([[0, 4, 9], [0, 1, 16], [0, 7, 7]])
    keys, rows = reader(x)
    expected = attention_rows(rows(positions), keys, reader.scale)
    got = reader.attend(x)(positions)
    assert got.shape == (3, 3, 17) and torch.allclose(got.sum(-1), torch.ones(3, 3))
    assert torch.allclose(got, expected, atol=1e-6)
