"""One FLOP counter (utils.flops): timm attention counted on the CPU, the same number from every path."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from models import create_model
from pruners.base import PruneContext
from pruners.lowrank import LowRankFactorisation
from pruners.masks import dense_masks
from utils.config import RunConfig
from utils.flops import flops_per_image, unfused_attention

# vit_tiny on 32x32: patch 4 -> 64 patches + cls = 65 tokens, dim 192, MLP 384, 9 blocks, 10 classes
TOKENS, DIM, HIDDEN, DEPTH, CLASSES = 65, 192, 384, 9, 10


def linear(fan_in, out, rank=None, tokens=TOKENS):
    """FLOPs of a Linear [out, fan_in] on `tokens` rows (2 per multiply-add), or of its rank-r factors."""
    return 2 * tokens * (fan_in * out if rank is None else rank * (fan_in + out))


def vit_tiny_flops(ranks=(None, None, None)):
    """Analytic FLOPs of one vit_tiny image; `ranks`: (qkv, proj, fc1 = fc2) of lowrank's factors."""
    patch_embed = 64 * 2 * (3 * 4 * 4) * DIM
    attention = 2 * (2 * TOKENS * TOKENS * DIM)  # q @ k^T and attn @ v over all heads
    block = (linear(DIM, 3 * DIM, ranks[0]) + attention + linear(DIM, DIM, ranks[1])
             + linear(DIM, HIDDEN, ranks[2]) + linear(HIDDEN, DIM, ranks[2]))
    return patch_embed + DEPTH * block + linear(DIM, CLASSES, tokens=1)  # the head sees the class token only


@pytest.fixture(scope="module")
def vit_tiny():
    torch.manual_seed(0)
    return create_model("vit_tiny", CLASSES)


def test_vit_tiny_count_is_linear_layers_plus_attention_matmuls(vit_tiny, one_thread):
    assert vit_tiny_flops() == 375_433_728
    assert flops_per_image(vit_tiny, (3, 32, 32)) == vit_tiny_flops()


def test_lowrank_round_costs_count_the_same_flops_as_compact(vit_tiny, one_thread):
    model = create_model("vit_tiny", CLASSES)
    model.load_state_dict(vit_tiny.state_dict())
    config = RunConfig(arch="vit_tiny", struct="lowrank", prune_type="pt", rate=0.3, pruning_times=3)
    mode = LowRankFactorisation(config)
    mode.check_model(model)
    flops = []
    for round_index in (0, 1):
        if round_index:  # round 0 trains the dense model
            mode.plan_round(PruneContext(model=model, weights={}, config=config, round_index=round_index,
                                         calibration_batches=lambda: iter(()), log=lambda _: None), dense_masks({}))
        mode.configure_model(model, round_index, lambda _: None)
        with torch.no_grad():
            model.eval()(torch.randn(2, 3, 32, 32))  # records the image shape the round counts with
        flops.append(mode.round_metrics()["flops_per_image"])
        assert flops[-1] == flops_per_image(model, (3, 32, 32))
        mode.stop_measuring()
    assert flops == [vit_tiny_flops(), vit_tiny_flops((101, 67, 90))] == [375_433_728, 272_548_608]


def test_unfused_attention_switches_every_timm_attention_and_restores_it(vit_tiny):
    vit_tiny.blocks[3].attn.fused_attn = False  # a module's own setting comes back as it was
    vit_tiny.blocks[0].fused_attn = "not a flag"  # not timm's bool: left alone
    try:
        with unfused_attention(vit_tiny) as switched:
            assert switched == DEPTH
            assert [block.attn.fused_attn for block in vit_tiny.blocks] == [False] * DEPTH
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                vit_tiny.eval()(torch.zeros(1, 3, 32, 32))
            assert counter.get_total_flops() == vit_tiny_flops()
        assert [block.attn.fused_attn for block in vit_tiny.blocks] == [True] * 3 + [False] + [True] * 5
        with pytest.raises(RuntimeError, match="boom"), unfused_attention(vit_tiny):
            raise RuntimeError("boom")
        assert vit_tiny.blocks[0].attn.fused_attn is True and vit_tiny.blocks[0].fused_attn == "not a flag"
    finally:
        vit_tiny.blocks[3].attn.fused_attn = True
        del vit_tiny.blocks[0].fused_attn


def test_models_without_attention_and_the_train_mode_are_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).train()
    with unfused_attention(model) as switched:
        assert switched == 0
    assert flops_per_image(model, (3, 8, 8)) == 2 * 64 * 27 * 4 + 2 * 256 * 5
    assert model.training
