"""Per-convolution compute layout on the grouped fused route (issue 15; docs/fused.md). cuDNN's grouped convs
are faster in channels_last for some shapes, in NCHW for others (H100, 8 res20s cells, bf16, fwd + bwd: 16>16 k3
s1 32x32 168 vs 366 us, 16>32 k3 s2 862 vs 465 us), and for strided and 1x1 convs both lose to one dense conv
whose weight is block-diagonal (zeros between the groups: N times the FLOPs, but cuDNN's dense kernels): a
model-wide choice loses either way; Triton kernels written for many narrow groups are a fourth way
(training/fused/triton_conv.py). `LayoutConv2d` computes in a layout of its own and returns its input's
memory format; `tune_conv_layouts` times each conv every way it can compute, keeps the fastest."""
import copy
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokens.graphed import capture
from utils.timing import median_ms

try:  # the Triton kernels of the `triton` layout (triton ships with PyTorch's CUDA builds)
    from training.fused.triton_conv_op import conv_supported, grouped_conv2d
except ImportError:
    conv_supported = grouped_conv2d = None
except Exception as exc:  # noqa: BLE001 - a broken Triton install must not stop the cuDNN layouts
    warnings.warn(f"the triton conv layout is off: its kernels failed to load ({type(exc).__name__}: {exc})")
    conv_supported = grouped_conv2d = None

# compute layout -> the memory format its conv runs in; a tie between timings goes to the earlier one
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
           "block_diagonal": torch.channels_last, "triton": torch.channels_last}
MAX_DENSE_GROUPS = 32  # block_diagonal's weight holds `groups` times the grouped weight's numbers


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor dense in NHWC but not NCHW order, else contiguous_format (e.g. [B, C, 1, 1])."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight [G*O, I, kH, kW] (G = `groups`) as the dense weight [G*O, G*I, kH, kW] with group
    g's [O, I] block at rows g*O.., columns g*I.. and zeros elsewhere: conv2d(x, dense) equals conv2d(x, weight,
    groups=G). Differentiable: the gradient of `weight` is the dense gradient's diagonal blocks."""
    rows, inputs = weight.shape[:2]
    eye = torch.eye(groups, device=weight.device, dtype=weight.dtype).view(groups, 1, groups, 1, 1, 1)
    blocks = weight.view(groups, rows // groups, 1, inputs, *weight.shape[2:]) * eye
    return blocks.reshape(rows, groups * inputs, *weight.shape[2:])


class LayoutConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters `weight` / `bias`, shapes and storage) that may compute in its own layout.

    `compute_layout`: None (nn.Conv2d's forward, bit for bit), "channels_last" or "contiguous": input
    [B, C_in, H, W] and weight [C_out, C_in / groups, kH, kW] are copied (differentiably; the parameter
    and, through AccumulateGrad, its grad keep their own strides) into that format, where the conv runs
    (cuDNN's NHWC kernels when either is channels_last); "block_diagonal" (2 to MAX_DENSE_GROUPS groups):
    one dense channels_last conv of the `block_diagonal` weight, the same sums plus exact zeros; "triton"
    (where offered, `layouts`): training/fused/triton_conv.py's grouped implicit-GEMM kernels. The output
    [B, C_out, H', W'] comes back in the input's format (`memory_format_of`). Setting a value the conv cannot
    compute in raises ValueError."""
    _compute_layout: Optional[str] = None

    @property
    def compute_layout(self) -> Optional[str]:
        return self._compute_layout

    @compute_layout.setter
    def compute_layout(self, layout: Optional[str]) -> None:
        if layout is not None and layout not in self.layouts():
            raise ValueError(f"compute_layout {layout!r}: choose None, {', '.join(self.layouts())}")
        self._compute_layout = layout

    def layouts(self) -> Sequence[str]:
        """The compute layouts this conv offers: block_diagonal only with 2 to MAX_DENSE_GROUPS groups, triton
        only where training.fused.triton_conv_op.conv_supported (Triton installed, a CUDA weight, its shapes)."""
        offered = {"block_diagonal": 1 < self.groups <= MAX_DENSE_GROUPS,
                   "triton": conv_supported is not None and conv_supported(self)}
        return [layout for layout in LAYOUTS if offered.get(layout, True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compute_layout is None:
            return super().forward(x)
        fmt = LAYOUTS[self._compute_layout]
        if self._compute_layout == "triton":  # an operator outside autocast's list: cast as autocast would
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            out = grouped_conv2d(x.to(dtype=dtype, memory_format=fmt), self.weight.to(dtype), self.bias,
                                 self.stride, self.padding, self.groups)  # one copy: the cast and the layout
            return out.contiguous(memory_format=memory_format_of(x))
        inputs = x.contiguous(memory_format=fmt)
        if self._compute_layout != "block_diagonal":
            out = self._conv_forward(inputs, self.weight.contiguous(memory_format=fmt), self.bias)
        else:
            weight = block_diagonal(self.weight, self.groups).contiguous(memory_format=fmt)
            padding = self.padding
            if self.padding_mode != "zeros":
                inputs, padding = F.pad(inputs, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
            out = F.conv2d(inputs, weight, self.bias, self.stride, padding, self.dilation, 1)
        return out.contiguous(memory_format=memory_format_of(x))


class ConvInput(NamedTuple):
    """One conv call's input: shape [B, C, H, W], dtype, memory format, gradient needed (not for images)."""
    shape: Tuple[int, ...]
    dtype: torch.dtype
    memory_format: torch.memory_format
    needs_grad: bool


Choices = Dict[str, Tuple[str, Dict[str, float]]]  # module name -> (layout chosen, {layout: us fwd + bwd})


def conv_inputs(fused: nn.Module, images: torch.Tensor) -> Dict[str, ConvInput]:
    """Module name -> ConvInput of each LayoutConv2d that one forward of `images` [N, B, C, H, W] calls,
    under the caller's autocast: in eval mode (BatchNorm statistics unchanged; modes restored after),
    autograd recording (to see which inputs need a gradient) but no backward (grads untouched)."""
    names = {module: name for name, module in fused.named_modules() if isinstance(module, LayoutConv2d)}
    seen: Dict[str, ConvInput] = {}

    def hook(module, inputs):
        x = inputs[0]
        seen.setdefault(names[module], ConvInput(tuple(x.shape), x.dtype, memory_format_of(x), x.requires_grad))
    modes = {module: module.training for module in fused.modules()}
    handles = [module.register_forward_pre_hook(hook) for module in names]
    try:
        fused.eval()
        with torch.enable_grad():
            fused(images)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return seen


def pick_layout(us: Dict[str, float]) -> str:
    """The fastest layout of {layout: us} (a tie: the earlier in LAYOUTS). ValueError unless every timing is a
    positive finite number and every layout one of LAYOUTS."""
    for layout, value in us.items():
        if layout not in LAYOUTS:
            raise ValueError(f"conv layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        if not 0 < value < float("inf"):
            raise ValueError(f"conv timing {value!r} us ({layout}): expected a positive finite number")
    if not us:
        raise ValueError("no conv timings to pick from")
    return min(us, key=lambda layout: (us[layout], list(LAYOUTS).index(layout)))


def graph_fwd_bwd_us(conv: LayoutConv2d, spec: ConvInput, layout: str, repeats: int) -> float:
    """Microseconds of fwd + bwd (grads of weight, bias, and input if `spec.needs_grad`) of a copy of `conv`
    computing in `layout` on a random input as `spec`, under the caller's CUDA autocast: one CUDA graph (as
    the step is: launches do not count), the median of `repeats` replays between CUDA events. CUDA only."""
    probe = copy.deepcopy(conv)  # its own weights: the model's weights and grads stay untouched
    probe.zero_grad(set_to_none=True)
    probe.compute_layout = layout
    device = probe.weight.device
    x = torch.randn(spec.shape, device=device, dtype=spec.dtype).contiguous(memory_format=spec.memory_format)
    x.requires_grad_(spec.needs_grad)
    wanted = [t for t in (x, probe.weight, probe.bias) if t is not None and t.requires_grad]
    amp = dict(device_type="cuda", dtype=torch.get_autocast_dtype("cuda"),
               enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)  # no cached casts across replays
    with torch.no_grad(), torch.autocast(**amp):
        grad_out = torch.randn_like(probe(x))  # the output's shape, dtype and memory format

    def fwd_bwd():
        with torch.enable_grad():
            with torch.autocast(**amp):  # the forward only, as in the step (its backward runs outside)
                out = probe(x)
            return torch.autograd.grad(out, wanted, grad_out)
    graph, _ = capture(fwd_bwd, device, warmup=3)
    return 1000 * median_ms(graph.replay, device, warmup=1, iters=repeats)


def choose_conv_layouts(fused: nn.Module, images: torch.Tensor,
                        time_us: Callable[[LayoutConv2d, ConvInput, str, int], float], repeats: int,
                        exclude: Sequence[str] = ()) -> Choices:
    """`tune_conv_layouts` with the timer `time_us(conv, input, layout, repeats) -> us` given (any device):
    each distinct (conv configuration, weight format, ConvInput) is timed once per layout it offers, but those
    in `exclude`. A `triton` layout whose timing raises (its kernels failed to compile or launch) is left out
    with a warning; any other failure propagates."""
    convs, timings, chosen = dict(fused.named_modules()), {}, {}
    for name, spec in conv_inputs(fused, images).items():
        conv = convs[name]
        key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
               conv.groups, conv.bias is not None, conv.padding_mode, conv.weight.dtype,
               memory_format_of(conv.weight), spec)
        if key not in timings:
            timings[key] = {}
            for layout in [layout for layout in conv.layouts() if layout not in exclude]:
                try:
                    timings[key][layout] = time_us(conv, spec, layout, repeats)
                except Exception as exc:  # noqa: BLE001 - the Triton kernels are optional; cuDNN's are not
                    if layout != "triton":
                        raise
                    warnings.warn(f"{name}: the triton conv layout failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); timed without it")
        conv.compute_layout = pick_layout(timings[key])
        chosen[name] = (conv.compute_layout, dict(timings[key]))
    return chosen


def tune_conv_layouts(fused: nn.Module, images: torch.Tensor, repeats: int = 20,
                      exclude: Sequence[str] = ()) -> Choices:
    """Set each LayoutConv2d of `fused` (a grouped-route FusedModel) to compute in its faster layout.

    `images` [N, B, C, H, W] as the step gets them (dtype, device, memory format; values do not matter).
    Call it under the step's autocast (training.step.autocast) before a FusedTrainStep captures or compiles.
    Each distinct conv (`conv_inputs`) is timed fwd + bwd in each layout it offers, conversion copies included
    (`graph_fwd_bwd_us`); weights, grads and BatchNorm statistics are unchanged. Returns {module name:
    (layout chosen, {layout: us})}; on the CPU, or without LayoutConv2d (other routes), {}
    and nothing changes. `exclude`: layouts not to consider (e.g. ("triton",)). Errors of CUDA graph capture
    propagate (`choose_conv_layouts` says which are caught)."""
    if images.device.type != "cuda" or not any(isinstance(m, LayoutConv2d) for m in fused.modules()):
        return {}
    return choose_conv_layouts(fused, images, graph_fwd_bwd_us, repeats, exclude)


def conv_layout_summary(chosen: Choices) -> str:
    """One line for a log: how many convs compute in each layout, naming those outside the most common one,
    e.g. "20 of 21 compute channels_last, block_diagonal: model.layers.3.shortcut.0"."""
    by_layout: Dict[str, list] = {}
    for name, (layout, _) in chosen.items():
        by_layout.setdefault(layout, []).append(name)
    common = max(by_layout, key=lambda layout: len(by_layout[layout]))
    others = [f"{layout}: {', '.join(sorted(names))}" for layout, names in by_layout.items() if layout != common]
    return ", ".join([f"{len(by_layout[common])} of {len(chosen)} compute {common}", *others])
