"""A model with anchor pruning attached is still a model (issue 16 §6): deepcopy, pickle, torch.save of the
whole model and of its state_dict, dtype/device moves and train/eval switches all work on a patched model."""
import copy
import io
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from open_clip.transformer import VisionTransformer as ClipViT  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from tokens import apply_pruning_to_model  # noqa: E402
from tokens.patching import pruning_attached, pruning_handle  # noqa: E402

K, M = 2, 5  # of 16 patches (32 px, patch 8): blocks 1.. run on 1 + 2 + 5 = 8 tokens


def tiny_timm():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()


def tiny_open_clip():
    torch.manual_seed(0)
    return ClipViT(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_ratio=2.0, output_dim=8).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


def kept_positions(model, images) -> torch.Tensor:
    """Kept positions of block 1 for `images`, read from the model's own recorder."""
    handle = pruning_handle(model)
    handle.recorder.clear()
    with torch.no_grad():
        model(images)
    return handle.recorder.to_dict()["kept_positions"][1]


@pytest.mark.parametrize("build", [tiny_timm, tiny_open_clip])
def test_deepcopy_then_restore_both_is_bit_identical(build, images):
    model = build()
    with torch.no_grad():
        plain = model(images)
        handle = apply_pruning_to_model(model, K, M, 0.5, record=True)
        pruned = model(images)
        twin = copy.deepcopy(model)
        assert pruning_attached(twin)
        assert torch.equal(twin(images), pruned)
        twin_handle = pruning_handle(twin)
        assert twin_handle.plan == handle.plan and twin_handle.recorder is not handle.recorder
        twin_handle.restore()
        assert not pruning_attached(twin) and pruning_attached(model)
        assert torch.equal(twin(images), plain)
        assert torch.equal(model(images), pruned)  # the original keeps its pruning
        handle.restore()
        assert torch.equal(model(images), plain)


@pytest.mark.parametrize("build", [tiny_timm, tiny_open_clip])
def test_deepcopy_scores_with_its_own_weights(build, images):
    model = build()
    apply_pruning_to_model(model, K, M, 0.5, record=True)
    twin = copy.deepcopy(model)
    reference = copy.deepcopy(build())  # the same starting weights, never patched
    torch.manual_seed(7)
    for target in (twin, reference):  # new key weights in block 1 of the copy only
        blocks = target.blocks if hasattr(target, "blocks") else target.transformer.resblocks
        attn = blocks[1].attn
        weight = attn.qkv.weight if hasattr(attn, "qkv") else attn.in_proj_weight
        with torch.no_grad():
            width = weight.shape[0] // 3
            weight[width:2 * width] = torch.randn(width, weight.shape[1], generator=torch.Generator().manual_seed(3))
    apply_pruning_to_model(reference, K, M, 0.5, record=True)
    original, copied = kept_positions(model, images), kept_positions(twin, images)
    assert not torch.equal(original, copied)  # before the fix the copy read the original's weights
    assert torch.equal(copied, kept_positions(reference, images))


def test_torch_save_of_whole_model_and_state_dict_round_trip(images, tmp_path):
    model = tiny_timm()
    keys = list(model.state_dict())
    with torch.no_grad():
        plain = model(images)
        apply_pruning_to_model(model, K, M, 0.5, record=True)
        pruned = model(images)
    assert list(model.state_dict()) == keys  # patching adds no parameters, buffers or keys
    pickle.loads(pickle.dumps(model))
    path = tmp_path / "model.pt"
    torch.save(model, path)  # used to fail: "Can't pickle local object ... <lambda>"
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(images), pruned)
        pruning_handle(loaded).restore()
        assert torch.equal(loaded(images), plain)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # a state_dict written while pruning is active loads into a plain model
    buffer.seek(0)
    fresh = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(images), plain)


def test_dtype_moves_and_train_eval_switches_keep_pruning(images):
    model = tiny_timm()
    handle = apply_pruning_to_model(model, K, M, 0.5, record=True)
    kept = kept_positions(model, images)
    model.double()  # parameters are replaced: the readers follow the modules, not stale tensors
    assert torch.equal(kept_positions(model, images.double()), kept)
    model.float().train()
    loss = model(images).square().mean()
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # gradients pass the kept tokens
    model.eval()
    assert torch.equal(kept_positions(model, images), kept)
    handle.restore()
    assert not pruning_attached(model)


def test_pruning_handle_of_an_unpatched_model_is_refused():
    with pytest.raises(ValueError, match="no anchor pruning is attached to this VisionTransformer"):
        pruning_handle(tiny_timm())
