"""`grouped_conv2d`: the Triton grouped-conv kernels (training/fused/triton_conv.py) as PyTorch operators
with their gradient, so autograd, CUDA graph capture and torch.compile (no graph break: the operators carry
fake-tensor rules) take them like any conv. The `triton` compute layout of training/fused/layout.py calls it;
the layout tuner keeps it only for the convs where it times faster than cuDNN."""
from typing import List, Optional, Sequence

import torch

from training.fused import triton_conv as kernels


@torch.library.custom_op("imp_runner::grouped_conv2d", mutates_args=())
def _conv(x: torch.Tensor, weight: torch.Tensor, stride: List[int], padding: List[int], groups: int) -> torch.Tensor:
    return kernels.conv_forward(x, weight, tuple(stride), tuple(padding), groups)


@_conv.register_fake
def _conv_fake(x, weight, stride, padding, groups):
    (batch, _, height, width), (out_channels, _, kh, kw) = x.shape, weight.shape
    shape = (batch, out_channels, kernels.output_size(height, kh, stride[0], padding[0]),
             kernels.output_size(width, kw, stride[1], padding[1]))
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)


@torch.library.custom_op("imp_runner::grouped_conv2d_grad_input", mutates_args=())
def _grad_input(grad: torch.Tensor, weight: torch.Tensor, input_shape: List[int], stride: List[int],
                padding: List[int], groups: int) -> torch.Tensor:
    return kernels.conv_grad_input(grad, weight, tuple(input_shape), tuple(stride), tuple(padding), groups)


@_grad_input.register_fake
def _grad_input_fake(grad, weight, input_shape, stride, padding, groups):
    return torch.empty(input_shape, device=grad.device, dtype=grad.dtype, memory_format=torch.channels_last)


@torch.library.custom_op("imp_runner::grouped_conv2d_grad_weight", mutates_args=())
def _grad_weight(grad: torch.Tensor, x: torch.Tensor, weight_shape: List[int], stride: List[int],
                 padding: List[int], groups: int) -> torch.Tensor:
    return kernels.conv_grad_weight(grad, x, tuple(weight_shape), tuple(stride), tuple(padding), groups)


@_grad_weight.register_fake
def _grad_weight_fake(grad, x, weight_shape, stride, padding, groups):
    return torch.empty(weight_shape, device=x.device, dtype=x.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, stride, padding, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (list(stride), list(padding), groups)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, groups = ctx.geometry
    dx = _grad_input(grad, weight, list(x.shape), stride, padding, groups) if ctx.needs_input_grad[0] else None
    dw = _grad_weight(grad, x, list(weight.shape), stride, padding, groups) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None


_conv.register_autograd(_backward, setup_context=_setup_context)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: a CUDA GPU, or any device with TRITON_INTERPRET=1 (CPU tests)."""
    return kernels.INTERPRETED or device.type == "cuda"


def conv_supported(conv: torch.nn.Conv2d) -> bool:
    """Whether `grouped_conv2d` computes this conv on its weight's device: 2 or more groups, numeric padding
    (not "same" / "valid"), the shapes training.fused.triton_conv.supported_shape takes. (Whether an input is
    small enough for 32-bit indexing is checked per call.)"""
    return (conv.groups > 1 and runs_on(conv.weight.device)
            and all(isinstance(p, int) for p in conv.padding)
            and kernels.supported_shape(tuple(conv.weight.shape), conv.groups, conv.dilation, conv.padding_mode))


def _span(tensor_shape: Sequence[int], strides: Sequence[int]) -> int:
    """Elements between a tensor's first and last addressed element, plus one: what its int32 offsets reach."""
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor_shape, strides))


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                   padding: Sequence[int], groups: int) -> torch.Tensor:
    """conv2d(x, weight, bias, stride, padding, groups=groups) on the Triton kernels: x [B, G*I, H, W] (any
    strides; channels_last is fast), weight [G*O, I, kH, kW] and x of one dtype -> [B, G*O, H', W']
    channels_last, fp32 accumulation; differentiable in x, weight and bias.

    Raises ValueError for a conv the kernels do not take (`conv_supported`'s shape rules), dtypes that differ,
    or an activation whose offsets reach 2**31 elements. (Gradients arrive as autograd hands them over; an
    output the size of this conv's output stays within that bound.)"""
    if not kernels.supported_shape(tuple(weight.shape), groups, (1, 1), "zeros"):
        raise ValueError(f"grouped_conv2d: weight {tuple(weight.shape)} with {groups} groups: the kernels take "
                         f"per-group channels in {kernels.CHANNELS} and kernels up to {kernels.MAX_KERNEL}")
    if x.dtype != weight.dtype:
        raise ValueError(f"grouped_conv2d: x is {x.dtype}, weight {weight.dtype}: cast them to one dtype")
    out = (kernels.output_size(x.shape[2], weight.shape[2], stride[0], padding[0])
           * kernels.output_size(x.shape[3], weight.shape[3], stride[1], padding[1]))
    if max(_span(x.shape, x.stride()), x.numel(), x.shape[0] * weight.shape[0] * out) >= 2 ** 31:
        raise ValueError(f"grouped_conv2d: input {tuple(x.shape)} too large for 32-bit indexing")
    y = torch.ops.imp_runner.grouped_conv2d(x, weight, list(stride), list(padding), groups)
    return y if bias is None else y + bias.to(y.dtype).view(1, -1, 1, 1)
