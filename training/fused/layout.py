"""Per-convolution memory layout on the grouped fused route (issue 15; docs/fused.md). cuDNN's grouped convs
are faster in channels_last for some shapes, in NCHW for others (H100, 8 res20s cells, bf16, fwd + bwd: 16>16 k3
s1 32x32 168 vs 366 us, 16>32 k3 s2 862 vs 465 us): a model-wide layout loses either way. `LayoutConv2d` computes
in a layout of its own and returns its input's; `tune_conv_layouts` times each conv both ways, keeps the faster."""
import copy
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from tokens.graphed import capture
from utils.timing import median_ms

LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor dense in NHWC but not NCHW order, else contiguous_format (e.g. [B, C, 1, 1])."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class LayoutConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters `weight` / `bias`, shapes and storage) that may compute in its own layout.

    `compute_layout`: None (nn.Conv2d's forward, bit for bit), "channels_last" or "contiguous": input
    [B, C_in, H, W] and weight [C_out, C_in / groups, kH, kW] are copied (differentiably; the parameter
    and, through AccumulateGrad, its grad keep their own strides) into that format, where the conv runs
    (cuDNN's NHWC kernels when either is channels_last); the output [B, C_out, H', W'] comes back in the
    input's format (`memory_format_of`). Setting another value raises ValueError."""
    _compute_layout: Optional[str] = None

    @property
    def compute_layout(self) -> Optional[str]:
        return self._compute_layout

    @compute_layout.setter
    def compute_layout(self, layout: Optional[str]) -> None:
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"compute_layout {layout!r}: choose None, {', '.join(LAYOUTS)}")
        self._compute_layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compute_layout is None:
            return super().forward(x)
        fmt = LAYOUTS[self._compute_layout]
        out = self._conv_forward(x.contiguous(memory_format=fmt), self.weight.contiguous(memory_format=fmt), self.bias)
        return out.contiguous(memory_format=memory_format_of(x))


class ConvInput(NamedTuple):
    """One conv call's input: shape [B, C, H, W], dtype, memory format, gradient needed (not for images)."""
    shape: Tuple[int, ...]
    dtype: torch.dtype
    memory_format: torch.memory_format
    needs_grad: bool


Choices = Dict[str, Tuple[str, float, float]]  # module name -> (layout, us channels_last, us contiguous)


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


def pick_layout(us_channels_last: float, us_contiguous: float) -> str:
    """The faster layout of two timings (us; a tie: "contiguous"). ValueError unless both are positive, finite."""
    for us in (us_channels_last, us_contiguous):
        if not 0 < us < float("inf"):
            raise ValueError(f"conv timing {us!r} us: expected a positive finite number")
    return "channels_last" if us_channels_last < us_contiguous else "contiguous"


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
                        time_us: Callable[[LayoutConv2d, ConvInput, str, int], float], repeats: int) -> Choices:
    """`tune_conv_layouts` with the timer `time_us(conv, input, layout, repeats) -> us` given (any device):
    each distinct (conv configuration, weight format, ConvInput) is timed once per layout."""
    convs, timings, chosen = dict(fused.named_modules()), {}, {}
    for name, spec in conv_inputs(fused, images).items():
        conv = convs[name]
        key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
               conv.groups, conv.bias is not None, conv.padding_mode, conv.weight.dtype,
               memory_format_of(conv.weight), spec)
        if key not in timings:
            timings[key] = tuple(time_us(conv, spec, layout, repeats) for layout in LAYOUTS)  # NHWC, then NCHW
        conv.compute_layout = pick_layout(*timings[key])
        chosen[name] = (conv.compute_layout, *timings[key])
    return chosen


def tune_conv_layouts(fused: nn.Module, images: torch.Tensor, repeats: int = 20) -> Choices:
    """Set each LayoutConv2d of `fused` (a grouped-route FusedModel) to compute in its faster layout.

    `images` [N, B, C, H, W] as the step gets them (dtype, device, memory format; values do not matter).
    Call it under the step's autocast (training.step.autocast) before a FusedTrainStep captures or compiles.
    Each distinct conv (`conv_inputs`) is timed fwd + bwd in both layouts, conversion copies included
    (`graph_fwd_bwd_us`); weights, grads and BatchNorm statistics are unchanged. Returns {module name:
    (layout, us channels_last, us contiguous)}; on the CPU, or without LayoutConv2d (other routes), {}
    and nothing changes. Errors of CUDA graph capture propagate."""
    if images.device.type != "cuda" or not any(isinstance(m, LayoutConv2d) for m in fused.modules()):
        return {}
    return choose_conv_layouts(fused, images, graph_fwd_bwd_us, repeats)
