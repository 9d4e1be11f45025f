"""Checks of the Triton grouped-conv kernels run by Triton's interpreter on the CPU: tests/test_fused_triton_conv.py
runs this file in a subprocess with TRITON_INTERPRET=1 (it must be set before triton is first imported) and reads
the JSON it prints: {check name: number}. Shapes stay tiny: the interpreter runs each program in numpy."""
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from models import create_model  # noqa: E402
from training.fused import fuse_models  # noqa: E402
from training.fused import triton_conv as kernels  # noqa: E402
from training.fused.layout import LayoutConv2d  # noqa: E402

CASES = {  # name -> groups, per-group in, per-group out, kernel, stride, padding, side, channels_last input
    "k3s1": (2, 16, 16, 3, 1, 1, 6, True),
    "k3s2_widen": (2, 16, 32, 3, 2, 1, 6, True),
    "k1s2_shortcut": (3, 32, 16, 1, 2, 0, 5, True),
    "k3s1_nchw_input": (2, 16, 16, 3, 1, 1, 5, False),
    "k5s1p2_odd_side": (2, 16, 16, 5, 1, 2, 5, True),
    "k3s2_odd_side": (2, 16, 16, 3, 2, 1, 7, True),  # stride classes of unequal sizes (4 and 3 a side)
    "k3s3_no_padding": (2, 16, 16, 3, 3, 0, 8, True),  # taps reaching no class at stride 3
    "k1s1_two_pixel_splits": (2, 16, 16, 1, 1, 0, 64, True),  # 8,192 pixels: the grad-weight sum in 2 ranges
}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def relative_diff(a: torch.Tensor, reference: torch.Tensor) -> float:
    """max |a - reference| over max |reference|: fp32 rounding of sums grows with their terms."""
    return max_diff(a, reference) / reference.abs().max().item()


def kernel_checks(results: dict) -> None:
    """Forward, input gradient and weight gradient of each case against torch's conv2d in float64 (fp32 inputs),
    relative to the reference's largest entry."""
    for name, (groups, per_in, per_out, kernel, stride, padding, side, channels_last) in CASES.items():
        gen = torch.Generator().manual_seed(len(name))
        x = torch.randn(2, groups * per_in, side, side, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(groups * per_out, per_in, kernel, kernel, generator=gen)
        geometry = ((stride, stride), (padding, padding), groups)
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
        reference = F.conv2d(xd, wd, None, stride, padding, 1, groups)
        grad = torch.randn(reference.shape, generator=gen)
        reference.backward(grad.double())
        results[f"{name}.forward"] = relative_diff(kernels.conv_forward(x, w, *geometry), reference)
        results[f"{name}.grad_input"] = relative_diff(kernels.conv_grad_input(grad, w, x.shape, *geometry), xd.grad)
        dw = kernels.conv_grad_weight(grad, x, w.shape, *geometry)
        results[f"{name}.grad_weight"] = relative_diff(dw, wd.grad)
        results[f"{name}.grad_weight_repeat_bitwise"] = max_diff(kernels.conv_grad_weight(grad, x, w.shape, *geometry), dw)


def layout_checks(results: dict) -> None:
    """LayoutConv2d computing `triton` against nn.Conv2d's own forward: output, memory format, every gradient;
    then the same under torch.compile(fullgraph=True) (the operators' fake rules: no graph break)."""
    torch.manual_seed(0)
    conv = LayoutConv2d(32, 64, 3, 2, 1, groups=2, bias=True)
    triton_conv = copy.deepcopy(conv)
    triton_conv.compute_layout = "triton"
    results["layouts_offered"] = conv.layouts().index("triton")
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for module in (conv, triton_conv, torch.compile(copy.deepcopy(triton_conv), backend="aot_eager",
                                                    fullgraph=True)):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.square().sum().backward()
        params = module.parameters()
        outs.append(out)
        grads.append([xi.grad, *[p.grad for p in params]])
    for label, index in (("eager", 1), ("compiled", 2)):
        results[f"layout_{label}.forward"] = max_diff(outs[index], outs[0])
        results[f"layout_{label}.grads"] = max(max_diff(a, b) for a, b in zip(grads[index], grads[0]))
        results[f"layout_{label}.channels_last_out"] = float(outs[index].is_contiguous(memory_format=torch.channels_last))


def opcheck(results: dict) -> None:
    """torch.library.opcheck: schema, fake tensor rule, autograd registration of the forward operator."""
    x = torch.randn(1, 32, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(32, 16, 3, 3, requires_grad=True)
    report = torch.library.opcheck(torch.ops.imp_runner.grouped_conv2d.default, (x, w, [1, 1], [1, 1], 2))
    results["opcheck_failures"] = float(sum(value != "SUCCESS" for value in report.values()))


def fused_model_check(results: dict) -> None:
    """Two res20s cells fused on the grouped route, every conv that offers `triton` computing in it, against the
    default layout: logits, and each parameter's gradient relative to its largest entry (16x16 images, batch 2)."""
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(create_model("res20s", 10))
    reference = fuse_models(models).train()
    model = copy.deepcopy(reference)
    convs = [m for m in model.modules() if isinstance(m, LayoutConv2d) and "triton" in m.layouts()]
    for conv in convs:
        conv.compute_layout = "triton"
    results["fused_convs_on_triton"] = float(len(convs))
    images = torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    outputs = []
    for fused in (reference, model):
        logits = fused(images)
        logits.square().sum().backward()
        outputs.append((logits, {name: p.grad for name, p in fused.named_parameters()}))
    results["fused_logits"] = max_diff(outputs[1][0], outputs[0][0])
    results["fused_grads_relative"] = max(max_diff(grad, outputs[0][1][name]) / outputs[0][1][name].abs().max().item()
                                          for name, grad in outputs[1][1].items())


if __name__ == "__main__":
    found: dict = {}
    for check in (kernel_checks, layout_checks, opcheck, fused_model_check):
        check(found)
    print(json.dumps(found))
