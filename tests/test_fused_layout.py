"""Per-convolution layout on the grouped fused route (training/fused/layout.py): every layout computes the
default's numbers, hands back its input's memory format and leaves parameters, fused_params and unfuse as
they were; the tuner's choice logic, without a GPU."""
import copy

import pytest
import torch

from models import create_model
from pruners.base import RoundPlan
from pruners.masks import prunable_weights
from training.fused import FusedTrainStep, fuse_models
from training.fused.layout import (ConvInput, LayoutConv2d, block_diagonal, choose_conv_layouts, conv_inputs,
                                   conv_layout_summary, memory_format_of, pick_layout, tune_conv_layouts)
from training.fused.models import grouped_unsupported

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
CELLS, BATCH = 2, 4


def fused_res20s(model_format):
    """res20s, 2 cells (seeds 1, 2), train mode, fused on the grouped route in `model_format` (weights and
    the grouped [B, N*3, H, W] view of the images), with images [N, B, 3, 32, 32] to match."""
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(create_model("res20s", 10))
    fused = fuse_models(models).to(memory_format=model_format)
    stored = torch.randn(BATCH, 32, 32, CELLS, 3, generator=torch.Generator().manual_seed(0))
    images = stored.permute(3, 0, 4, 1, 2)  # [N, B, 3, H, W] whose grouped [B, N*3, H, W] view is channels_last
    images = images if model_format == torch.channels_last else images.contiguous()
    return fused.train(), images


def convs(fused):
    return {name: m for name, m in fused.named_modules() if isinstance(m, LayoutConv2d)}


def dense_strides(tensor):
    """Strides of the dims longer than 1 (a size-1 dim's stride says nothing about the memory order)."""
    return [stride for stride, size in zip(tensor.stride(), tensor.shape) if size > 1]


def forward_backward(fused, images):
    """(logits, {param name: grad}, running statistics, {conv name: (input format, output format)})."""
    formats = {}

    def hook(conv, inputs, out):
        formats[names[conv]] = (memory_format_of(inputs[0]), memory_format_of(out))
    names = {conv: name for name, conv in convs(fused).items()}
    handles = [conv.register_forward_hook(hook) for conv in names]
    logits = fused(images)
    weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
    (logits * weights).sum().backward()
    for handle in handles:
        handle.remove()
    stats = {k: v.clone() for k, v in fused.state_dict().items() if "running" in k}
    return logits.detach(), {n: p.grad for n, p in fused.named_parameters()}, stats, formats


# fp32: logits and BatchNorm statistics within 2e-6 (measured 1.0e-6: block_diagonal's dense sums add the
# zeros in another order); a weight gradient, a sum over B*H*W positions taken in another order by the other
# layout's kernel, within 1e-5 of its largest entry (measured 8.8e-6 with block_diagonal, 5e-6 otherwise);
# float64 shows the computation is the same (measured 2e-14).
TOLERANCE = {torch.float32: (2e-6, 1e-5), torch.float64: (1e-12, 1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model_format", [torch.contiguous_format, torch.channels_last])
def test_each_layout_computes_the_default(model_format, dtype):
    fused, images = fused_res20s(model_format)
    fused, images = fused.to(dtype), images.to(dtype)
    assert fused.route == "grouped" and len(convs(fused)) == 21
    params = {n: (p.shape, dense_strides(p)) for n, p in fused.named_parameters()}
    fused_params = {n: (t.shape, index) for n, (t, index) in fused.fused_params.items()}
    cells_before = fused.unfuse()
    reference = forward_backward(copy.deepcopy(fused), images)
    assert memory_format_of(fused.model.conv1.weight) == model_format
    assert set(reference[3].values()) == {(model_format, model_format)}
    absolute, relative = TOLERANCE[dtype]
    for layout in ("contiguous", "channels_last", "block_diagonal"):
        model = copy.deepcopy(fused)
        for conv in convs(model).values():
            conv.compute_layout = layout
        for cell, state in zip(cells_before, model.unfuse()):  # unfuse, load_cells: the same numbers
            assert list(cell) == list(state) and all(torch.equal(cell[k], state[k]) for k in cell)
        model.load_cells(cells_before)
        logits, grads, stats, formats = forward_backward(model, images)
        same = layout == ("channels_last" if model_format == torch.channels_last else "contiguous")  # bit for bit
        assert torch.equal(logits, reference[0]) if same else (logits - reference[0]).abs().max() <= absolute
        for name, grad in grads.items():
            scale = reference[1][name].abs().max()
            assert (grad - reference[1][name]).abs().max() <= (0 if same else relative * scale), (layout, name)
            assert dense_strides(grad) == params[name][1], name  # AccumulateGrad keeps the parameter's strides
        for name, value in stats.items():
            assert (value - reference[2][name]).abs().max() <= absolute, name
        assert formats == reference[3]  # each conv hands back its input's memory format
        assert {n: (p.shape, dense_strides(p)) for n, p in model.named_parameters()} == params
        assert {n: (t.shape, index) for n, (t, index) in model.fused_params.items()} == fused_params


def test_layout_conv_is_a_conv2d_with_its_parameters():
    conv = LayoutConv2d(6, 8, 3, padding=1, groups=2, bias=True)
    assert isinstance(conv, torch.nn.Conv2d) and conv.compute_layout is None
    assert list(dict(conv.named_parameters())) == ["weight", "bias"] and conv.weight.shape == (8, 3, 3, 3)
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=True)
    plain.load_state_dict(conv.state_dict())
    assert torch.equal(conv(x), plain(x))  # None: nn.Conv2d's forward, bit for bit
    conv.compute_layout = "contiguous"
    out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert (out - plain(x)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="compute_layout 'nhwc': choose None, contiguous, channels_last, "
                                         "block_diagonal$"):
        conv.compute_layout = "nhwc"
    assert conv.compute_layout == "contiguous"
    conv.compute_layout = "block_diagonal"  # one dense conv of the block-diagonal weight
    assert (conv(x) - plain(x)).abs().max() <= 1e-6 and conv(x).is_contiguous(memory_format=torch.channels_last)
    for mode in ("reflect", "circular"):  # padding modes other than zeros pad first, then run unpadded
        padded = LayoutConv2d(6, 8, 3, stride=2, padding=1, groups=2, padding_mode=mode)
        reference = padded(x)
        padded.compute_layout = "block_diagonal"
        assert (padded(x) - reference).abs().max() <= 1e-6, mode
    single = LayoutConv2d(6, 8, 3, padding=1)  # one group: nothing to make block-diagonal
    assert single.layouts() == ["contiguous", "channels_last"]
    with pytest.raises(ValueError, match="compute_layout 'block_diagonal': choose None, contiguous, channels_last$"):
        single.compute_layout = "block_diagonal"
    # the cell model is what the grouped route checks (exact types): its own Conv2d stays supported
    assert grouped_unsupported(create_model("res20s", 10)) == []


def test_pick_layout():
    assert pick_layout({"channels_last": 168.0, "contiguous": 366.0}) == "channels_last"
    assert pick_layout({"channels_last": 862.0, "contiguous": 465.0}) == "contiguous"
    assert pick_layout({"channels_last": 862.0, "contiguous": 465.0, "block_diagonal": 120.0}) == "block_diagonal"
    assert pick_layout({"channels_last": 100.0, "contiguous": 100.0}) == "contiguous"  # a tie: LAYOUTS' order
    assert pick_layout({"block_diagonal": 100.0, "channels_last": 100.0}) == "channels_last"
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"us \(contiguous\): expected a positive finite number"):
            pick_layout({"channels_last": 1.0, "contiguous": bad})
    with pytest.raises(ValueError, match="conv layout 'nhwc': expected one of contiguous, channels_last, block_diag"):
        pick_layout({"nhwc": 1.0})
    with pytest.raises(ValueError, match="no conv timings"):
        pick_layout({})


def test_block_diagonal_weight():
    """[G*O, I, k, k] -> [G*O, G*I, k, k]: group g's block on the diagonal, zeros elsewhere; the gradient of
    the grouped weight is the dense gradient's diagonal blocks."""
    weight = torch.arange(2 * 3 * 2 * 1 * 1, dtype=torch.float64).view(6, 2, 1, 1).requires_grad_()
    dense = block_diagonal(weight, 2)
    assert dense.shape == (6, 4, 1, 1)
    expected = torch.zeros(6, 4, dtype=torch.float64)
    expected[:3, :2], expected[3:, 2:] = weight.detach()[:3, :, 0, 0], weight.detach()[3:, :, 0, 0]
    assert torch.equal(dense[..., 0, 0], expected)
    grad = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    dense.backward(grad)
    assert torch.equal(weight.grad[:3], grad[:3, :2]) and torch.equal(weight.grad[3:], grad[3:, 2:])


def test_conv_layout_summary():
    chosen = {"a": ("channels_last", {}), "b": ("block_diagonal", {}), "c": ("channels_last", {}),
              "d": ("contiguous", {}), "e": ("block_diagonal", {}), "f": ("channels_last", {})}
    assert conv_layout_summary(chosen) == ("3 of 6 compute channels_last, block_diagonal: b, e, contiguous: d")
    assert conv_layout_summary({"a": ("contiguous", {})}) == "1 of 1 compute contiguous"


def test_tune_on_cpu_changes_nothing():
    fused, images = fused_res20s(torch.contiguous_format)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    assert tune_conv_layouts(fused, images) == {}
    assert all(conv.compute_layout is None for conv in convs(fused).values())
    assert all(torch.equal(v, fused.state_dict()[k]) for k, v in state.items())
    vmap = fuse_models([create_model("test_vit", 10)] * 2)
    assert tune_conv_layouts(vmap, images) == {}


def test_choice_logic_with_a_fake_timer():
    """choose_conv_layouts on the CPU with a timer that favours channels_last at 32x32 and 8x8 inputs: each
    distinct conv timed once per layout, each conv set, and nothing of the model changed."""
    fused, images = fused_res20s(torch.contiguous_format)
    fused.model.bn1.running_mean.normal_()
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    calls = []

    def fake_us(conv, spec, layout, repeats):
        calls.append((conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, spec, layout, repeats))
        if layout == "block_diagonal":  # wins for the strided convs only
            return 50.0 if conv.stride == (2, 2) else 300.0
        nhwc_wins = spec.shape[-1] in (32, 8)
        return 100.0 if (layout == "channels_last") == nhwc_wins else 200.0
    inputs = conv_inputs(fused, images)
    assert inputs["model.conv1"] == ConvInput((BATCH, CELLS * 3, 32, 32), torch.float32, torch.contiguous_format, False)
    assert [spec.needs_grad for spec in inputs.values()].count(False) == 1
    assert sorted({spec.shape[-1] for spec in inputs.values()}) == [8, 16, 32]
    chosen = choose_conv_layouts(fused, images, fake_us, repeats=7)
    assert set(chosen) == set(convs(fused)) == set(inputs)
    distinct = {c[:5] for c in calls}
    assert len(calls) == 3 * len(distinct) and {c[-1] for c in calls} == {7}  # 2 groups: block_diagonal too
    assert len(distinct) == 8  # res20s: stem, 3 stage convs, 2 strided 3x3 and 2 1x1 shortcuts (issue 15's table)
    for name, (layout, us) in chosen.items():
        strided = convs(fused)[name].stride == (2, 2)
        expected = "block_diagonal" if strided else "channels_last" if inputs[name].shape[-1] in (32, 8) else "contiguous"
        assert layout == expected == convs(fused)[name].compute_layout
        assert sorted(us) == ["block_diagonal", "channels_last", "contiguous"]
        assert min(us["channels_last"], us["contiguous"]) == 100.0 and max(us["channels_last"], us["contiguous"]) == 200.0
    layouts = {name: conv.compute_layout for name, conv in convs(fused).items()}
    assert layouts["model.layers.4.conv1"] == "contiguous" and layouts["model.layers.3.shortcut.0"] == "block_diagonal"
    assert list(layouts.values()).count("block_diagonal") == 4
    assert all(torch.equal(v, fused.state_dict()[k]) for k, v in state.items())  # weights, BN statistics
    assert all(p.grad is None for p in fused.parameters()) and fused.training and fused.model.bn1.training


def test_fused_step_with_mixed_layouts_matches_the_default():
    """One masked SGD step (FusedTrainStep, eager) with half the convs in the other layout: the same update."""
    results = []
    for mixed in (False, True):
        fused, images = fused_res20s(torch.channels_last)
        if mixed:
            for k, conv in enumerate(convs(fused).values()):
                conv.compute_layout = ("contiguous", "channels_last")[k % 2]
        masks = {n: torch.ones_like(w) for n, w in prunable_weights(create_model("res20s", 10)).items()}
        step = FusedTrainStep(fused, list(masks), CPU, "none", 0.9, [5e-4, 1e-3], regularized=False, use_graph=False)
        step.start_round([RoundPlan(train_masks=masks, final_masks=masks)] * CELLS)
        step(images, torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), lr=[0.1, 0.05], reg_lambda=[0.0, 0.0])
        results.append(fused.unfuse())
    for plain, mixed in zip(*results):
        assert all((plain[k].double() - mixed[k].double()).abs().max() <= 1e-6 for k in plain)


@pytest.mark.parametrize("route", ["grouped", "streams"])
def test_stack_images_lays_the_batch_out_for_the_route(route):
    """After to_channels_last, stack_images gives [N, B, 3, H, W] with the cells' numbers, whose grouped
    [B, N*3, H, W] view (grouped) or each cell's [B, 3, H, W] (streams) is channels_last without a copy;
    without it, a plain contiguous stack."""
    models = [create_model("res20s", 10) for _ in range(CELLS)]
    fused = fuse_models(models, route)
    batches = [torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(CELLS)]
    plain = fused.stack_images(batches)
    assert plain.is_contiguous() and torch.equal(plain, torch.stack(batches))
    assert fused.to_channels_last() is fused and fused.channels_last
    laid_out = fused.stack_images(batches)
    assert laid_out.shape == (CELLS, BATCH, 3, 32, 32) and torch.equal(laid_out, plain)
    if route == "grouped":
        grouped = laid_out.transpose(0, 1).reshape(BATCH, CELLS * 3, 32, 32)
        assert grouped.data_ptr() == laid_out.data_ptr()  # a view, not a copy
        assert memory_format_of(grouped) == torch.channels_last
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in fused.parameters() if w.dim() == 4)
    else:
        assert all(memory_format_of(laid_out[i]) == torch.channels_last for i in range(CELLS))
