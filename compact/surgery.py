"""Small pure helpers for physical compaction: which rows/columns of a weight are alive, and copies of
conv / linear / BatchNorm layers restricted to kept output rows and input columns."""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn


def alive_rows(weight: torch.Tensor) -> torch.Tensor:
    """bool [C_out]: output rows of `weight` [C_out, ...] with any nonzero entry."""
    return weight.detach().flatten(1).ne(0).any(1)


def alive_columns(weight: torch.Tensor) -> torch.Tensor:
    """bool [C_in]: input columns of `weight` [C_out, C_in, ...] with any nonzero entry."""
    return weight.detach().transpose(0, 1).flatten(1).ne(0).any(1)


def keep_list(alive: torch.Tensor) -> List[int]:
    """Sorted indices of the True entries; [0] when none is (a layer keeps at least one channel, computed
    as in the masked model, so the result stays exact)."""
    kept = [int(i) for i in torch.nonzero(alive.cpu()).flatten()]
    return kept or [0]


def _index(keep: Optional[Sequence[int]], device) -> Optional[torch.Tensor]:
    return None if keep is None else torch.tensor(list(keep), dtype=torch.long, device=device)


@torch.no_grad()
def slice_conv(conv: nn.Conv2d, rows: Optional[Sequence[int]] = None,
               columns: Optional[Sequence[int]] = None) -> nn.Conv2d:
    """A new Conv2d (groups 1) holding conv's output channels `rows` and input channels `columns`
    (None: all), same kernel, stride, padding, dilation, device and dtype."""
    weight = conv.weight
    if rows is not None:
        weight = weight.index_select(0, _index(rows, weight.device))
    if columns is not None:
        weight = weight.index_select(1, _index(columns, weight.device))
    new = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device=weight.device,
                    dtype=weight.dtype)
    new.weight.copy_(weight)
    if conv.bias is not None:
        new.bias.copy_(conv.bias if rows is None else conv.bias.index_select(0, _index(rows, weight.device)))
    return new


@torch.no_grad()
def slice_linear(linear: nn.Linear, rows: Optional[torch.Tensor] = None,
                 columns: Optional[torch.Tensor] = None) -> nn.Linear:
    """A new Linear holding `linear`'s output `rows` and input `columns` (long index tensors; None: all)."""
    weight, bias = linear.weight, linear.bias
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = None if bias is None else bias.index_select(0, rows.to(weight.device))
    if columns is not None:
        weight = weight.index_select(1, columns.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


@torch.no_grad()
def slice_norm(norm: nn.BatchNorm2d, keep: Sequence[int]) -> nn.BatchNorm2d:
    """A new BatchNorm2d over channels `keep` of `norm` (affine parameters and running statistics)."""
    index = _index(keep, norm.running_mean.device if norm.running_mean is not None else norm.weight.device)
    new = nn.BatchNorm2d(len(keep), norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                         device=index.device, dtype=norm.weight.dtype if norm.affine else None)
    for name in ("weight", "bias", "running_mean", "running_var"):
        source = getattr(norm, name)
        if source is not None:
            getattr(new, name).copy_(source.index_select(0, index))
    if norm.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    new.train(norm.training)
    return new


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (dotted path) of `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
