"""N same-shaped models as one module ("horizontal fusion", HFTA: Wang et al., MLSys 2021).

Three routes, one interface (`FusedModel`): images [N, B, C, H, W] -> logits [N, B, classes], where
cell i sees only its own images and its own weights.

- `grouped` (CNNs with BatchNorm, e.g. res20s): activations run as [B, N*C, H, W], cell-major
  channels. Each Conv2d becomes one Conv2d with N times the channels and groups=N*groups (so no
  channel of one cell ever meets another cell's); each BatchNorm2d one BatchNorm2d over N*C channels
  (per-channel batch statistics and running statistics are exactly those of the separate models);
  each Linear a batched matmul over [N, out, in] weights. Functional ops in `forward` (relu, adds,
  pooling, flatten) act per channel or element, so they need no change.
- `vmap` and `streams` (training/fused/stacked.py): every tensor stacked [N, *cell_shape], run by
  vmap(functional_call) or by one functional_call per cell on its own CUDA stream.

Every fused tensor holds its cells along dim 0, cell-major: cell i's tensor is `fused[index]` with
index i (stacked [N, ...] tensors) or slice(i*k, (i+1)*k) (conv / BatchNorm tensors of N*k rows),
a view shaped exactly as the cell's tensor; `fused.view(N, -1)[i]` is the same numbers flattened.
On the grouped route BatchNorm's `num_batches_tracked` is one shared counter (index ()): cells step in
lockstep; the stacked routes keep one per cell.
"""
import copy
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from training.fused.layout import LayoutConv2d

Index = Union[int, slice, Tuple[()]]


def copy_tensors(targets: List[torch.Tensor], sources: List[torch.Tensor]) -> None:
    """targets[k].copy_(sources[k]) for every k, as multi-tensor copies, one per (device, dtype) of the
    sources: the lockstep driver copies some 10^3 tensors around each fused epoch, and CUDA's fused
    multi-tensor kernel takes a list only when its tensors share device and dtype (pairs of unlike strides
    still go one copy each, inside the same call)."""
    groups: Dict[tuple, Tuple[list, list]] = {}
    for target, source in zip(targets, sources):
        pair = groups.setdefault((source.device, source.dtype, target.dtype), ([], []))
        pair[0].append(target)
        pair[1].append(source)
    for group_targets, group_sources in groups.values():
        torch._foreach_copy_(group_targets, group_sources)


def cell_index(fused_shape: torch.Size, cell_shape: torch.Size, cells: int, cell: int) -> Index:
    """Where cell `cell` of `cells` lives in a fused tensor: i for [N, *cell_shape], a slice of
    dim 0 for [N*k, *cell_shape[1:]], () for a shared 0-dim tensor. Raises ValueError otherwise."""
    fused_shape, cell_shape = tuple(fused_shape), tuple(cell_shape)
    if fused_shape == (cells, *cell_shape):
        return cell
    if cell_shape and fused_shape == (cells * cell_shape[0], *cell_shape[1:]):
        return slice(cell * cell_shape[0], (cell + 1) * cell_shape[0])
    if fused_shape == cell_shape == ():
        return ()
    raise ValueError(f"fused shape {fused_shape} does not hold {cells} cells of shape {cell_shape}")


class FusedLinear(nn.Module):
    """N Linear layers as one batched matmul, weight [N, out, in], bias [N, out]. Activations cell-major
    in the features, [..., N*in] -> [..., N*out] (as the grouped route's flattened channels are), or with
    `stacked` the cells along dim 0, [N, ..., in] -> [N, ..., out] (no transposing copies)."""

    def __init__(self, cells: int, in_features: int, out_features: int, bias: bool, stacked: bool = False):
        super().__init__()
        self.cells, self.in_features, self.out_features, self.stacked = cells, in_features, out_features, stacked
        self.weight = nn.Parameter(torch.empty(cells, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(cells, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            rows = x.reshape(self.cells, -1, self.in_features)  # [N, M, in]
        else:
            rows = x.reshape(-1, self.cells, self.in_features).transpose(0, 1)
        if self.bias is None:
            out = torch.bmm(rows, self.weight.transpose(1, 2))
        else:  # one kernel, and under autocast the output stays in the autocast dtype (as nn.Linear's does)
            out = torch.baddbmm(self.bias[:, None, :], rows, self.weight.transpose(1, 2))
        if self.stacked:
            return out.view(*x.shape[:-1], self.out_features)
        return out.transpose(0, 1).reshape(*x.shape[:-1], self.cells * self.out_features)


def grouped_conv(conv: nn.Conv2d, cells: int) -> LayoutConv2d:
    # LayoutConv2d: an nn.Conv2d (same parameters) whose compute layout training/fused/layout.py may tune
    return LayoutConv2d(cells * conv.in_channels, cells * conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, conv.dilation, cells * conv.groups, conv.bias is not None, conv.padding_mode)


def wide_batchnorm(bn: nn.BatchNorm2d, cells: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(cells * bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)


def fused_linear(linear: nn.Linear, cells: int, stacked: bool = False) -> FusedLinear:
    return FusedLinear(cells, linear.in_features, linear.out_features, linear.bias is not None, stacked)


# exact types only: a subclass may change forward (e.g. a LoRA or masked Linear)
GROUPED_LAYERS = {nn.Conv2d: grouped_conv, nn.BatchNorm2d: wide_batchnorm, nn.Linear: fused_linear}


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def grouped_unsupported(model: nn.Module) -> List[str]:
    """Names of the modules holding tensors that the grouped route cannot widen (empty: it can)."""
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in model.named_modules()
            if _holds_tensors(m) and type(m) not in GROUPED_LAYERS]


class FusedModel(nn.Module, ABC):
    """N cells of one architecture in one module; see the module docstring for the layout.

    `fused_params` / `fused_state`: cell name -> (fused tensor, [index of cell 0..N-1]).
    `unfuse()`: N state_dicts equal to the cells' (exact: the fused tensors hold the same numbers).
    """
    route = "base"
    channels_last = False  # set by to_channels_last on the routes that lay convs out channels_last

    @staticmethod
    def claims(model: nn.Module) -> bool:
        """Whether this class speaks for its route about `model` (a route may hold several classes, e.g. one
        for CNNs and one for timm ViTs: the first that claims a model fuses it or refuses it)."""
        return True

    @staticmethod
    def refusal(model: nn.Module) -> Optional[str]:
        """Why this route cannot fuse copies of `model` (a text without advice), or None when it can."""
        return None

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        self.cells = len(models)
        state = models[0].state_dict()
        self.cell_shapes = {name: tensor.shape for name, tensor in state.items()}
        self.param_names = [name for name, p in models[0].named_parameters() if p.requires_grad]

    def to_channels_last(self) -> "FusedModel":
        """Lay out the conv weights as a plain run's channels_last model (a no-op on this route); returns self."""
        return self

    def stack_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """The cells' batches (N tensors [B, C, H, W]) -> [N, B, C, H, W] in the memory layout this route's
        forward reads without a copy (after `to_channels_last`: channels_last per cell or per fused input)."""
        return torch.stack(list(images))

    @abstractmethod
    def _fused_tensors(self) -> Dict[str, torch.Tensor]:
        """Cell state name -> the fused tensor holding it (parameters as the Parameters themselves)."""

    @property
    def fused_state(self) -> Dict[str, Tuple[torch.Tensor, List[Index]]]:
        return {name: (tensor, [cell_index(tensor.shape, self.cell_shapes[name], self.cells, i)
                                for i in range(self.cells)])
                for name, tensor in self._fused_tensors().items()}

    @property
    def fused_params(self) -> Dict[str, Tuple[torch.Tensor, List[Index]]]:
        """Each trainable cell parameter name -> (fused Parameter, per-cell index), in the cells'
        `parameters()` order (the order of a TrainStep's momentum buffers)."""
        state = self.fused_state
        return {name: state[name] for name in self.param_names}

    def unfuse(self) -> List[Dict[str, torch.Tensor]]:
        """N state_dicts (CPU-independent clones, the cells' key order) loadable into the cell model."""
        state = self.fused_state
        return [{name: tensor[index[i]].detach().clone() for name, (tensor, index) in state.items()}
                for i in range(self.cells)]

    def _check_states(self, states: Sequence[Dict[str, torch.Tensor]]) -> None:
        if len(states) != self.cells:
            raise ValueError(f"{len(states)} cell states for {self.cells} cells")
        for i, cell_state in enumerate(states):
            if set(cell_state) != set(self.cell_shapes):
                missing = sorted(set(self.cell_shapes) ^ set(cell_state))
                raise ValueError(f"cell {i}: state keys differ from the fused model's ({', '.join(missing[:5])})")

    def _cell_pairs(self, states: Sequence[Dict[str, torch.Tensor]]):
        """(fused views, cell tensors) of every per-cell entry, and the shared counters' (name, fused, cell 0's)."""
        views, cell_tensors, shared = [], [], []
        for name, (tensor, index) in self.fused_state.items():
            if index[0] == ():  # shared counter (num_batches_tracked): the cells run in lockstep
                shared.append((name, tensor, states[0][name]))
                continue
            views += [tensor[index[i]] for i in range(self.cells)]
            cell_tensors += [states[i][name] for i in range(self.cells)]
        return views, cell_tensors, shared

    @torch.no_grad()
    def load_cells(self, states: Sequence[Dict[str, torch.Tensor]]) -> None:
        """Copy N cell state_dicts into the fused tensors (shared counters from cell 0), in one multi-tensor copy.
        Raises ValueError on a count/key mismatch."""
        self._check_states(states)
        views, cell_tensors, shared = self._cell_pairs(states)
        copy_tensors(views + [fused for _, fused, _ in shared], cell_tensors + [cell for _, _, cell in shared])

    @torch.no_grad()
    def store_cells(self, states: Sequence[Dict[str, torch.Tensor]]) -> None:
        """Copy the fused tensors into N cell state_dicts in place, the inverse of `load_cells` in one
        multi-tensor copy: pass each cell model's `state_dict()` (its tensors alias the model's) to update the
        models. A shared counter (num_batches_tracked on the grouped route) adds its change since `load_cells`
        (fused minus cell 0's value) to every cell's own. Raises ValueError on a count/key mismatch."""
        self._check_states(states)
        views, cell_tensors, shared = self._cell_pairs(states)
        changes = [fused - cell_zero for _, fused, cell_zero in shared]  # before cell 0's own value is stored
        copy_tensors(cell_tensors, views)
        if shared:
            torch._foreach_add_([state[name] for state in states for name, _, _ in shared], changes * len(states))


class GroupedFusedModel(FusedModel):
    """The structural route: grouped convolutions, wide BatchNorms, batched Linears."""
    route = "grouped"

    @staticmethod
    def refusal(model: nn.Module) -> Optional[str]:
        unsupported = grouped_unsupported(model)
        return f"grouped fusion cannot widen {', '.join(unsupported[:3])}" if unsupported else None

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__(models)
        reason = self.refusal(models[0])
        if reason:
            raise ValueError(f"{reason}; use route='vmap'")
        self.model = copy.deepcopy(models[0])
        for name, module in list(self.model.named_modules()):
            widen = GROUPED_LAYERS.get(type(module))
            if widen is not None:
                reference = next(t for t in module.state_dict().values() if t.is_floating_point())
                self.model.set_submodule(name, widen(module, self.cells).to(reference.device, reference.dtype))
        self.load_cells([m.state_dict() for m in models])

    def _fused_tensors(self) -> Dict[str, torch.Tensor]:
        return dict(self.model.state_dict(keep_vars=True))

    def to_channels_last(self) -> "GroupedFusedModel":
        """Conv weights channels_last, and `stack_images` lays the batch out so that the fused input
        [B, N*C, H, W] is channels_last without a copy (stored as [B, H, W, N, C]); returns self."""
        self.model.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def stack_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.channels_last:
            return super().stack_images(images)
        stored = torch.stack([x.permute(0, 2, 3, 1) for x in images], dim=3)  # [B, H, W, N, C]
        return stored.permute(3, 0, 4, 1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, B, C, H, W] -> logits [N, B, classes]."""
        cells, batch = images.shape[:2]
        logits = self.model(images.transpose(0, 1).reshape(batch, cells * images.shape[2], *images.shape[3:]))
        return logits.view(batch, cells, -1).transpose(0, 1)
