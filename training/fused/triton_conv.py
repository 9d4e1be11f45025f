"""Triton kernels for the grouped convolutions of horizontally fused cells (issue 15; docs/fused.md).

N fused res20s cells turn each conv into one conv of N groups of 16-64 channels; cuDNN's grouped kernels
treat those as small problems (training/fused/layout.py times them; README "Is 5x within reach"). Here each
group is an implicit GEMM on tensor cores: output rows = pixels (B * H' * W'), K = the group's input channels,
one `tl.dot` per kernel tap, over activations in any memory format (strides passed; channels_last is the fast
one: a pixel's group channels are contiguous). Three kernels, each with fp32 accumulation:

- `conv_forward`   y[b, g*O+o, i, j]   = sum_{c, kh, kw} x[b, g*I+c, i*s-p+kh, j*s-p+kw] * w[g*O+o, c, kh, kw]
- `conv_grad_input`  dx = the transposed conv of dy (any stride: the input pixels go by stride class, each
  class running only the taps that reach it, 1 in stride^2 of them)
- `conv_grad_weight` dw = sum over pixels of dy^T x per tap, split over pixel ranges, the partial sums added
  in a fixed order (deterministic, no atomics; its block size is fixed, so the order does not depend on what
  the autotuner picks)

The weight is read through its strides (no packed copy; it stays in L2); image sizes are compile-time
constants (index division by shifts), as is the group count.

Supported (`supported_shape`): 2-D convs, dilation 1, zero padding, per-group input and output channels in
CHANNELS. With TRITON_INTERPRET=1 set before the first import, the kernels run on CPU tensors (the tests).
"""
import os
from typing import Tuple

import torch
import triton
import triton.language as tl

CHANNELS = (16, 32, 64, 128)  # per-group channel counts the kernels take (tl.dot needs >= 16, powers of 2)
MAX_KERNEL = 7
GRAD_WEIGHT_PROGRAMS = 1024  # about how many grad-weight programs to launch (several per SM of any GPU)
GRAD_WEIGHT_BLOCK = 128  # pixels a grad-weight dot sums: fixed, so the summation order is too
MIN_SPLIT_ROWS = 4096  # a grad-weight pixel range is at least this long (fp32 partial sums stay small)
# at most 128 fp32 accumulators a thread for O = 128 (BLOCK_M * O / (32 * num_warps))
CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in ((64, 2), (128, 4), (256, 8))]
WARPS_ONLY = [triton.Config({}, num_warps=w) for w in (2, 4, 8)]
KEY = ["B", "H", "W", "HO", "WO", "G", "I", "O", "KH", "KW", "SH", "SW"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # numpy on the CPU: no autotuning (it needs a GPU)


def _tuned(configs):
    """The kernel autotuned over `configs` per problem shape (timed at its first launch), or as it is when
    interpreted."""
    def wrap(kernel):
        return kernel if INTERPRETED else triton.autotune(configs=configs, key=KEY)(kernel)
    return wrap


def supported_shape(weight_shape: Tuple[int, ...], groups: int, dilation: Tuple[int, ...], padding_mode: str) -> bool:
    """Whether these kernels compute a conv of weight [G*O, I, kH, kW] with `groups` G: per-group I and O in
    CHANNELS, kernel sides <= MAX_KERNEL, dilation 1, zero padding."""
    if len(weight_shape) != 4 or padding_mode != "zeros" or any(d != 1 for d in dilation):
        return False
    out_channels, per_group_in, kh, kw = weight_shape
    return (out_channels % groups == 0 and out_channels // groups in CHANNELS and per_group_in in CHANNELS
            and kh <= MAX_KERNEL and kw <= MAX_KERNEL)


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@triton.jit
def _pixels(m, HO: tl.constexpr, WO: tl.constexpr):
    return m // (HO * WO), (m // WO) % HO, m % WO


@triton.jit
def _group_and_block(G: tl.constexpr):
    """(group, pixel block) of a 1-D grid whose groups vary fastest: the G programs of one pixel block run
    side by side and together read whole pixel rows (G groups' channels) of a channels_last tensor."""
    pid = tl.program_id(0)
    return pid % G, pid // G


@_tuned(CONFIGS)
@triton.jit
def _forward_kernel(x, w, y, sxb, sxc, sxh, sxw, swo, swi, swh, sww, syb, syc, syh, syw, B,
                    H: tl.constexpr, W: tl.constexpr, HO: tl.constexpr, WO: tl.constexpr, G: tl.constexpr,
                    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                    KH: tl.constexpr, KW: tl.constexpr, I: tl.constexpr, O: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    g, block = _group_and_block(G)
    m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = m < B * HO * WO
    b, oh, ow = _pixels(m, HO, WO)
    c, o = tl.arange(0, I), tl.arange(0, O)
    acc = tl.zeros((BLOCK_M, O), dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih, iw = oh * SH - PH + kh, ow * SW - PW + kw
            ok = rows & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            tile = tl.load(x + b[:, None] * sxb + (g * I + c)[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                           mask=ok[:, None], other=0.0)
            taps = tl.load(w + (g * O + o)[None, :] * swo + c[:, None] * swi + kh * swh + kw * sww)  # [I, O]
            acc += tl.dot(tile, taps, input_precision=PRECISION)
    tl.store(y + b[:, None] * syb + (g * O + o)[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw,
             acc.to(y.dtype.element_ty), mask=rows[:, None])


@_tuned(CONFIGS)
@triton.jit
def _grad_input_kernel(dy, w, dx, sdb, sdc, sdh, sdw, swo, swi, swh, sww, sxb, sxc, sxh, sxw, B,
                       H: tl.constexpr, W: tl.constexpr, HO: tl.constexpr, WO: tl.constexpr, G: tl.constexpr,
                       SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                       KH: tl.constexpr, KW: tl.constexpr, I: tl.constexpr, O: tl.constexpr,
                       HC: tl.constexpr, WC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    # A program takes input pixels of one stride class (h % SH, w % SW) = (rh, rw): a tap (kh, kw) reaches
    # them all or none ((rh + PH - kh) % SH == 0), so a strided conv runs only the taps that contribute.
    # HC, WC: pixels a class has along each side (at most: ceil(H / SH), ceil(W / SW)).
    pid = tl.program_id(0)
    g, rest = pid % G, pid // G
    rh, rw, block = (rest % (SH * SW)) // SW, rest % SW, rest // (SH * SW)
    m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    b, i, j = _pixels(m, HC, WC)
    ih, iw = rh + SH * i, rw + SW * j
    rows = (m < B * HC * WC) & (ih < H) & (iw < W)
    c, o = tl.arange(0, I), tl.arange(0, O)
    acc = tl.zeros((BLOCK_M, I), dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            dh, dw = rh + PH - kh, rw + PW - kw  # oh * SH - SH * i, where this tap met these pixels
            if (dh % SH == 0) & (dw % SW == 0):
                oh, ow = i + dh // SH, j + dw // SW
                ok = rows & (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
                grads = tl.load(dy + b[:, None] * sdb + (g * O + o)[None, :] * sdc + oh[:, None] * sdh
                                + ow[:, None] * sdw, mask=ok[:, None], other=0.0)
                taps = tl.load(w + (g * O + o)[:, None] * swo + c[None, :] * swi + kh * swh + kw * sww)  # [O, I]
                acc += tl.dot(grads, taps, input_precision=PRECISION)
    tl.store(dx + b[:, None] * sxb + (g * I + c)[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
             acc.to(dx.dtype.element_ty), mask=rows[:, None])


@_tuned(WARPS_ONLY)
@triton.jit
def _grad_weight_kernel(x, dy, partial, sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw, B, ROWS,
                        H: tl.constexpr, W: tl.constexpr, HO: tl.constexpr, WO: tl.constexpr, G: tl.constexpr,
                        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                        KH: tl.constexpr, KW: tl.constexpr, I: tl.constexpr, O: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    tap, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # taps fastest: they share their tiles in L2
    kh, kw = tap // KW, tap % KW
    c, o = tl.arange(0, I), tl.arange(0, O)
    acc = tl.zeros((O, I), dtype=tl.float32)
    for start in range(split * ROWS, tl.minimum((split + 1) * ROWS, B * HO * WO), BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        rows = m < B * HO * WO
        b, oh, ow = _pixels(m, HO, WO)
        ih, iw = oh * SH - PH + kh, ow * SW - PW + kw
        ok = rows & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        tile = tl.load(x + b[:, None] * sxb + (g * I + c)[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                       mask=ok[:, None], other=0.0)
        grads = tl.load(dy + b[:, None] * sdb + (g * O + o)[None, :] * sdc + oh[:, None] * sdh + ow[:, None] * sdw,
                        mask=rows[:, None], other=0.0)
        acc += tl.dot(tl.trans(grads), tile, input_precision=PRECISION)
    # partial [splits, G, O, I, KH, KW]: summed over splits it is the weight's own layout
    tl.store(partial + (((split * G + g) * O + o[:, None]) * I + c[None, :]) * (KH * KW) + tap, acc)


def _precision(dtype: torch.dtype) -> str:
    """fp32 tiles as cuDNN's convolutions compute them (TF32 while torch.backends.cudnn.allow_tf32, the
    default); bf16 / fp16 tiles ignore it."""
    return "tf32" if dtype != torch.float32 or torch.backends.cudnn.allow_tf32 else "ieee"


def _geometry(input_shape, weight_shape, stride, padding, dtype: torch.dtype) -> dict:
    (batch, _, height, width), (out_channels, per_group_in, kh, kw) = input_shape, weight_shape
    return dict(B=batch, H=height, W=width, HO=output_size(height, kh, stride[0], padding[0]),
                WO=output_size(width, kw, stride[1], padding[1]), SH=stride[0], SW=stride[1], PH=padding[0],
                PW=padding[1], KH=kh, KW=kw, I=per_group_in, PRECISION=_precision(dtype))


def conv_forward(x: torch.Tensor, weight: torch.Tensor, stride: Tuple[int, int], padding: Tuple[int, int],
                 groups: int) -> torch.Tensor:
    """conv2d(x, weight, None, stride, padding, groups=groups) without bias: x [B, G*I, H, W] (any strides;
    channels_last is the fast layout), weight [G*O, I, kH, kW] in x's dtype -> y [B, G*O, H', W'] channels_last,
    x's dtype, fp32 accumulation. The caller checks `supported_shape`."""
    geo = _geometry(x.shape, weight.shape, stride, padding, x.dtype)
    y = torch.empty((geo["B"], weight.shape[0], geo["HO"], geo["WO"]), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    grid = lambda meta: (groups * triton.cdiv(geo["B"] * geo["HO"] * geo["WO"], meta["BLOCK_M"]),)  # noqa: E731
    _forward_kernel[grid](x, weight, y, *x.stride(), *weight.stride(), *y.stride(), G=groups,
                          O=weight.shape[0] // groups, **geo, **({"BLOCK_M": 64} if INTERPRETED else {}))
    return y


def conv_grad_input(grad: torch.Tensor, weight: torch.Tensor, input_shape: Tuple[int, ...],
                    stride: Tuple[int, int], padding: Tuple[int, int], groups: int) -> torch.Tensor:
    """Gradient of `conv_forward`'s x: grad [B, G*O, H', W'] -> [B, G*I, H, W] (`input_shape`), channels_last,
    grad's dtype."""
    dx = torch.empty(input_shape, device=grad.device, dtype=grad.dtype, memory_format=torch.channels_last)
    geo = _geometry(input_shape, weight.shape, stride, padding, grad.dtype)
    side = dict(HC=triton.cdiv(geo["H"], stride[0]), WC=triton.cdiv(geo["W"], stride[1]))  # a stride class's
    programs = groups * stride[0] * stride[1]  # a pixel block of each group and stride class
    grid = lambda meta: (programs * triton.cdiv(geo["B"] * side["HC"] * side["WC"], meta["BLOCK_M"]),)  # noqa: E731
    _grad_input_kernel[grid](grad, weight, dx, *grad.stride(), *weight.stride(), *dx.stride(), G=groups, **side,
                             O=weight.shape[0] // groups, **geo, **({"BLOCK_M": 64} if INTERPRETED else {}))
    return dx


def pixel_splits(pixels: int, programs_per_split: int) -> Tuple[int, int]:
    """(splits, pixels a split) for the grad-weight sum over `pixels` output pixels: about
    GRAD_WEIGHT_PROGRAMS programs in all, each range a multiple of GRAD_WEIGHT_BLOCK and at least MIN_SPLIT_ROWS
    long (or all the pixels), the splits covering every pixel."""
    wanted = max(1, min(triton.cdiv(GRAD_WEIGHT_PROGRAMS, programs_per_split), pixels // MIN_SPLIT_ROWS))
    rows = triton.cdiv(triton.cdiv(pixels, wanted), GRAD_WEIGHT_BLOCK) * GRAD_WEIGHT_BLOCK
    return triton.cdiv(pixels, rows), rows


def conv_grad_weight(grad: torch.Tensor, x: torch.Tensor, weight_shape: Tuple[int, ...],
                     stride: Tuple[int, int], padding: Tuple[int, int], groups: int) -> torch.Tensor:
    """Gradient of `conv_forward`'s weight: grad [B, G*O, H', W'], x [B, G*I, H, W] -> [G*O, I, kH, kW]
    (`weight_shape`) in x's dtype, summed in fp32: one program per tap, group and pixel range (`pixel_splits`),
    the ranges' partial sums then added in order (deterministic)."""
    out_channels, per_group_in, kh, kw = weight_shape
    geo = _geometry(x.shape, weight_shape, stride, padding, x.dtype)
    splits, rows = pixel_splits(geo["B"] * geo["HO"] * geo["WO"], kh * kw * groups)
    partial = torch.empty((splits, out_channels, per_group_in, kh, kw), device=x.device, dtype=torch.float32)
    _grad_weight_kernel[(kh * kw, groups, splits)](x, grad, partial, *x.stride(), *grad.stride(), ROWS=rows,
                                                   G=groups, O=out_channels // groups, BLOCK_M=GRAD_WEIGHT_BLOCK,
                                                   **geo)
    return partial.sum(0).to(x.dtype)
