"""Truncated-SVD factorisation of Linear and Conv2d layers (`--struct lowrank`), as pure functions.

A dense layer with weight W [out, fan_in] (a Conv2d's W [out, in, kh, kw] read as [out, in*kh*kw])
is replaced by two layers holding the rank-r factors of W ≈ A·B (Eckart–Young: the truncated SVD
is the best rank-r approximation in Frobenius norm):
  B [r, fan_in]  `down`: Linear(fan_in -> r), or a Conv2d(in -> r) with the layer's kernel/stride/padding;
  A [out, r]     `up`:   Linear(r -> out), or a 1x1 Conv2d(r -> out); it carries the layer's bias.
The factors share the singular values evenly (A = U_r·√S_r, B = √S_r·V_rᵀ), so both train at
similar scales. Factorised layers keep their place in the model, so their state_dict keys become
`<layer>.down.weight`, `<layer>.up.weight` and `<layer>.up.bias`: a checkpoint holds the
factorised shapes, and `factorise_like` rebuilds them from it.
"""
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

FACTORISABLE = (nn.Linear, nn.Conv2d)


def truncated_svd_factors(weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A [out, rank], B [rank, in]) with A·B the best rank-`rank` approximation of `weight` [out, in].

    The SVD runs in float64 on the CPU (deterministic, so a resumed run factorises bit-identically);
    the factors come back in `weight`'s dtype and device. ValueError for a non-2-D weight or a rank
    outside [1, min(out, in)].
    """
    if weight.dim() != 2:
        raise ValueError(f"truncated_svd_factors: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"truncated_svd_factors: rank {rank} outside [1, {min(weight.shape)}] for a weight of "
                         f"shape {tuple(weight.shape)}")
    u, s, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    a, b = u[:, :rank] * root, root[:, None] * vh[:rank]
    return a.to(weight), b.to(weight)


def equivalent_rank(out_features: int, fan_in: int) -> float:
    """The rank at which the two factors hold as many weights as the dense layer: out·in / (out + in)."""
    return out_features * fan_in / (out_features + fan_in)


class LowRank(nn.Module):
    """A layer factorised as `up(down(x))`; see the module docstring for the shapes."""

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        self.down, self.up = down, up

    @property
    def rank(self) -> int:
        return self.down.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def dense_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, fan_in]: a dense layer's own, or A·B of a factorised one."""
    if isinstance(layer, LowRank):
        return dense_matrix(layer.up) @ dense_matrix(layer.down)
    return layer.weight.flatten(1)


def _shell(layer: nn.Module) -> Tuple[nn.Module, int]:
    """The dense layer a (possibly factorised) layer stands for: its kernel settings and out width."""
    down = layer.down if isinstance(layer, LowRank) else layer
    out = (layer.up if isinstance(layer, LowRank) else layer).weight.shape[0]
    return down, out


def empty_factorised(layer: nn.Module, rank: int) -> LowRank:
    """A LowRank for `layer` (dense or factorised) at `rank`, weights uninitialised (no RNG is drawn), on
    the layer's device and dtype."""
    down_of, out = _shell(layer)
    bias = (layer.up if isinstance(layer, LowRank) else layer).bias is not None
    kw = {"device": down_of.weight.device, "dtype": down_of.weight.dtype}
    if isinstance(down_of, nn.Linear):
        down = nn.utils.skip_init(nn.Linear, down_of.in_features, rank, bias=False, **kw)
        up = nn.utils.skip_init(nn.Linear, rank, out, bias=bias, **kw)
    else:
        down = nn.utils.skip_init(nn.Conv2d, down_of.in_channels, rank, down_of.kernel_size, stride=down_of.stride,
                                  padding=down_of.padding, dilation=down_of.dilation, bias=False,
                                  padding_mode=down_of.padding_mode, **kw)
        up = nn.utils.skip_init(nn.Conv2d, rank, out, 1, bias=bias, **kw)
    return LowRank(down, up)


@torch.no_grad()
def factorise(layer: nn.Module, rank: int) -> LowRank:
    """`layer` (dense, or factorised at a higher rank) as a LowRank of rank `rank` holding the truncated
    SVD of its weight; the bias is kept. ValueError for a rank outside [1, min(out, fan_in)]."""
    a, b = truncated_svd_factors(dense_matrix(layer), rank)
    result = empty_factorised(layer, rank)
    result.down.weight.copy_(b.view_as(result.down.weight))
    result.up.weight.copy_(a.view_as(result.up.weight))
    bias = (layer.up if isinstance(layer, LowRank) else layer).bias
    if bias is not None:
        result.up.bias.copy_(bias)
    return result


def dense_shape(layer: nn.Module) -> Tuple[int, int]:
    """(out, fan_in) of the dense weight matrix a (possibly factorised) layer stands for."""
    down, out = _shell(layer)
    return out, down.weight[0].numel()


def factorisable_layers(model: nn.Module, dense: Iterable[nn.Module] = ()) -> Dict[str, nn.Module]:
    """Layers `--struct lowrank` factorises, by module name, in model order: every LowRank, and every
    Linear and ungrouped Conv2d that is neither inside a LowRank nor inside a module of `dense`
    (the stem and the classifier heads unless --conv1 / --fc)."""
    skipped = {id(inner) for module in dense for inner in module.modules()}
    found: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if id(module) in skipped:
            continue
        if isinstance(module, LowRank):
            skipped.update(id(inner) for inner in module.modules())
            found[name] = module
        elif isinstance(module, FACTORISABLE) and getattr(module, "groups", 1) == 1:
            found[name] = module
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def factorised_ranks(state: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """{layer name: rank} of the factorised layers a state_dict holds (found by their `.down.weight`)."""
    suffix = ".down.weight"
    return {key[:-len(suffix)]: int(value.shape[0]) for key, value in state.items()
            if key.endswith(suffix) and key[:-len(suffix)] + ".up.weight" in state}


def factorise_like(model: nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    """Give `model` the factorised layers (names and ranks) of `state` (a checkpoint's model state), with
    uninitialised weights for load_state_dict to fill; returns the names of the layers it replaced."""
    modules = dict(model.named_modules())
    changed = []
    for name, rank in factorised_ranks(state).items():
        layer = modules.get(name)
        if layer is None or (isinstance(layer, LowRank) and layer.rank == rank):
            continue
        replace_module(model, name, empty_factorised(layer, rank))
        changed.append(name)
    return changed
