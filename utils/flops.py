"""FLOPs of a model's forward, the same on every device: the one place that counts them.

Counted by torch.utils.flop_counter.FlopCounterMode (a multiply-add is 2 FLOPs; only matmuls and convs
count, so softmax, norms and activations are free). timm's attention modules run
F.scaled_dot_product_attention when their `fused_attn` attribute is True (timm.layers.Attention and the
other timm attention classes read it per forward). The counter knows the CUDA kernels behind it (flash,
memory-efficient, cuDNN: 2·2·T²·d per head) but not the CPU one, which it counts as 0, so a ViT counted on
the CPU would miss its attention matmuls. `unfused_attention` therefore switches `fused_attn` off while
counting: the same q @ kᵀ and attn @ v run as two explicit matmuls, which the counter sees everywhere.
Every FLOP count of a model in the runner (round records of the struct modes, compact exports, the epoch
benchmark) goes through `flops_per_image`.
"""
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

# the attribute timm's attention modules read in forward (timm >= 0.9; `timm.layers.use_fused_attn()` sets
# its value at construction, so the global `timm.layers.set_fused_attn` does not reach built models)
FUSED_ATTRIBUTE = "fused_attn"


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[int]:
    """Within the block, every submodule of `model` with a bool `fused_attn` (timm's attention modules)
    has it False; each module's own value is restored on exit, exceptions included. Yields how many
    modules were switched (0 for a model without timm attention, which is left untouched)."""
    switched: List[Tuple[nn.Module, bool]] = [
        (module, value) for module in model.modules()
        if isinstance(value := getattr(module, FUSED_ATTRIBUTE, None), bool)]
    try:
        for module, _ in switched:
            setattr(module, FUSED_ATTRIBUTE, False)
        yield len(switched)
    finally:
        for module, value in switched:
            setattr(module, FUSED_ATTRIBUTE, value)


@torch.no_grad()
def flops_per_image(model: nn.Module, image_shape: Tuple[int, ...]) -> int:
    """FLOPs of one eval-mode forward of one input of `image_shape` (one image without its batch dimension,
    e.g. (3, 32, 32), or (tokens, dim) for a token model), zeros on the model's device and dtype, counted
    by FlopCounterMode with timm attention unfused (see the module docstring), so the count is the same on
    the CPU and on CUDA. The model's train/eval mode and `fused_attn` flags are restored. Raises
    StopIteration for a model without parameters."""
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        counter = FlopCounterMode(display=False)
        with unfused_attention(model), counter:
            model(torch.zeros((1, *image_shape), device=parameter.device, dtype=parameter.dtype))
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)
