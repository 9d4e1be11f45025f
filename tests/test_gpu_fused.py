"""On CUDA: the graph-captured FusedTrainStep computes what the eager one computes, on every fusion route
(grouped convolutions for res20s, also channels_last with tuned per-convolution layouts; for vit_tiny the
grouped ViT and vmap with CUDA SDPA; one CUDA stream per cell for both), and every cell's masks hold."""
import warnings

import pytest
import torch

from models import create_model, dense_modules
from pruners.base import RoundPlan
from pruners.masks import prunable_weights
from training.fused import FusedTrainStep, fuse_models
from training.fused.layout import LayoutConv2d, tune_conv_layouts
from training.step import autocast

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
ROUTE = {"res20s": "grouped", "vit_tiny": "streams"}


def make(arch, graph, amp, route="auto", channels_last=False, tuned=False):
    """Two cells (seeds 0 and 1) fused, each with its own 50 % masks and penalty masks."""
    models, plans = [], []
    generator = torch.Generator().manual_seed(1)
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(create_model(arch, 10))
        weights = prunable_weights(models[-1], exclude=dense_modules(models[-1]))
        masks = {n: (torch.rand(w.shape, generator=generator) > 0.5).float() for n, w in weights.items()}
        penalty = {n: m * (torch.rand(m.shape, generator=generator) > 0.5).float() for n, m in masks.items()}
        plans.append(RoundPlan(train_masks=masks, final_masks=masks, penalty_masks=penalty))
    fused = fuse_models(models, route).to(CUDA)
    assert fused.route == (ROUTE[arch] if route == "auto" else route)
    if channels_last:
        fused.to_channels_last()
    if tuned is True:  # as the runner does: each grouped conv in its faster layout, timed before the capture
        with autocast(CUDA, amp):
            chosen = tune_conv_layouts(fused, fused.stack_images([torch.zeros(32, 3, 32, 32, device=CUDA)] * 2))
        offered = {name: fused.get_submodule(name).layouts() for name in chosen}
        assert len(chosen) == 21 and all(sorted(us) == sorted(offered[name]) and min(us.values()) > 0
                                         for name, (_, us) in chosen.items())
        assert sum("triton" in layouts for layouts in offered.values()) == 20  # all but the stem
    elif tuned:  # {module name: layout} chosen before: the same kernels in every run of a test
        for name, layout in tuned.items():
            fused.get_submodule(name).compute_layout = layout
    step = FusedTrainStep(fused, list(plans[0].train_masks), CUDA, amp, 0.9, [1e-4, 5e-4], regularized=True,
                          use_graph=graph)
    step.start_round(plans)
    return fused, plans, step


def train(arch, graph, amp, steps, route="auto", channels_last=False, tuned=False):
    """`steps` steps of growing, per-cell learning rates; returns (loss sums, correct, fused parameters)."""
    fused, plans, step = make(arch, graph, amp, route, channels_last, tuned)
    generator = torch.Generator(device="cuda").manual_seed(2)
    for i in range(steps):
        images = fused.stack_images(list(torch.randn(2, 32, 3, 32, 32, device="cuda", generator=generator)))
        labels = torch.randint(0, 10, (2, 32), device="cuda", generator=generator)
        step(images, labels, lr=[0.05 * (i + 1), 0.02 * (i + 1)], reg_lambda=[0.5, 0.1])
    assert (step.graph is not None) == graph
    loss_sum, correct, bad = step.read_epoch()
    assert bad == [None, None]
    for state, plan in zip(fused.unfuse(), plans):  # each cell's pruned weights stayed zero
        for name, mask in plan.train_masks.items():
            assert torch.all(state[name][mask.to(CUDA) == 0] == 0), name
    return loss_sum, correct, [p.detach().clone() for p in fused.parameters()]


@pytest.mark.parametrize("arch,route", [("res20s", "auto"), ("vit_tiny", "auto"), ("res20s", "streams"),
                                        ("vit_tiny", "vmap"), ("vit_tiny", "grouped")])
def test_fused_graph_replay_matches_eager(arch, route):
    torch.backends.cudnn.deterministic = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager_loss, eager_correct, eager = train(arch, graph=False, amp="none", steps=6, route=route)
        graph_loss, graph_correct, graphed = train(arch, graph=True, amp="none", steps=6, route=route)
    fallbacks = [str(w.message) for w in caught if "batching rule" in str(w.message)]
    assert not fallbacks, fallbacks[0]  # vmap ran every op (SDPA included) batched, not as a per-cell loop
    assert graph_loss == pytest.approx(eager_loss, rel=1e-3)
    assert all(a > 0 for a in graph_loss) and graph_loss[0] != graph_loss[1]  # two different cells
    for a, b in zip(eager, graphed):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("route", ["vmap", "auto", "grouped"])
def test_vit_tiny_fused_bf16_graph_runs(route):
    """bf16 autocast picks the flash / memory-efficient SDPA kernels: vmap must batch and capture them (the
    streams route, auto's choice for ViTs, runs them per cell; the grouped route once over the N*B sequences)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_sum, correct, params = train("vit_tiny", graph=True, amp="bf16", steps=3, route=route)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    assert all(torch.isfinite(torch.tensor(loss_sum))) and min(loss_sum) > 0
    assert all(0 <= c <= 3 * 32 for c in correct)


def test_res20s_streams_bf16_channels_last_graph_trains():
    """The streams route as the benchmark runs it: bf16, channels_last cell views, one captured graph."""
    loss_sum, correct, params = train("res20s", graph=True, amp="bf16", steps=3, route="streams", channels_last=True)
    assert all(torch.isfinite(torch.tensor(loss_sum))) and min(loss_sum) > 0 and loss_sum[0] != loss_sum[1]
    assert params[0][1].is_contiguous(memory_format=torch.channels_last)


def test_res20s_grouped_channels_last_tuned_graph_matches_eager():
    """The runner's grouped route on CUDA: channels_last model and batches, per-convolution layouts tuned,
    graph replay == eager (fp32) and each cell's pruned weights stay zero."""
    torch.backends.cudnn.deterministic = True
    fused = make("res20s", graph=False, amp="none", channels_last=True, tuned=True)[0]
    layouts = {name: m.compute_layout for name, m in fused.named_modules() if isinstance(m, LayoutConv2d)}
    eager_loss, _, eager = train("res20s", graph=False, amp="none", steps=4, channels_last=True, tuned=layouts)
    graph_loss, _, graphed = train("res20s", graph=True, amp="none", steps=4, channels_last=True, tuned=layouts)
    assert graph_loss == pytest.approx(eager_loss, rel=1e-3) and graph_loss[0] != graph_loss[1]
    for a, b in zip(eager, graphed):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)


def test_res20s_grouped_triton_kernels_match_cudnn():
    """Every conv that offers the Triton grouped kernels computing in them (channels_last, fp32 with cuDNN's TF32
    off; eager and graph replay) trains as cuDNN's default layout does; under bf16 autocast too, within bf16's
    rounding (the CPU interpreter cannot check bf16 tiles: Triton 3.8's interpreter multiplies them as raw bits)."""
    fused = make("res20s", graph=False, amp="none", channels_last=True)[0]
    triton_layouts = {name: "triton" for name, m in fused.named_modules()
                      if isinstance(m, LayoutConv2d) and "triton" in m.layouts()}
    assert len(triton_layouts) == 20
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        reference_loss, _, reference = train("res20s", graph=False, amp="none", steps=4, channels_last=True)
        for graph in (False, True):
            loss, _, params = train("res20s", graph=graph, amp="none", steps=4, channels_last=True,
                                    tuned=triton_layouts)
            assert loss == pytest.approx(reference_loss, rel=1e-4), graph
            for a, b in zip(reference, params):
                assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), graph
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    reference_loss, _, _ = train("res20s", graph=True, amp="bf16", steps=3, channels_last=True)
    loss, _, _ = train("res20s", graph=True, amp="bf16", steps=3, channels_last=True, tuned=triton_layouts)
    assert all(torch.isfinite(torch.tensor(loss))) and loss[0] != loss[1]
    assert loss == pytest.approx(reference_loss, rel=2e-2)
