"""The two fusion routes that keep every cell's tensors stacked along a new dim 0 ([N, *cell_shape]).

- `vmap` (models without BatchNorm running statistics, e.g. timm ViTs with LayerNorm):
  torch.func.stack_module_state + vmap(functional_call), PyTorch's ensembling recipe. It needs no
  knowledge of the model's internals (timm's Attention differs between versions), which is why the
  ViTs take it instead of a hand-fused attention.
- `streams` (any model, BatchNorm included): one functional_call per cell on views of the stacked
  tensors; on CUDA cell i runs on CUDA stream i, so a captured step holds N independent branches that
  the GPU runs side by side (the concurrency N separate processes cannot get: the GPU time-slices
  between processes). Each backward op runs on its forward op's stream (PyTorch's stream semantics),
  so the backward is concurrent too. Kernels stay those of one plain run: no grouped convolution.
"""
import copy
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from training.fused.models import FusedModel


class Float32Attention(TorchFunctionMode):
    """Inside it, F.scaled_dot_product_attention runs on float32 copies of its floating-point tensors (q, k, v,
    a float mask) with autocast off and returns the query's dtype: the attention of the vmap route under bf16
    autocast (see VmapFusedModel.forward)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)

        def as_float(value):
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        with torch.autocast(args[0].device.type, enabled=False):
            out = func(*map(as_float, args), **{name: as_float(v) for name, v in kwargs.items()})
        return out.to(args[0].dtype)


class StackedFusedModel(FusedModel):
    """Stacked [N, ...] parameters (a ParameterList) and buffers, and a meta-device copy of the cell
    model that functional_call runs on them. Subclasses define forward."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__(models)
        params, buffers = stack_module_state(list(models))
        self.stacked = nn.ParameterList([nn.Parameter(params[name]) for name in params])
        self._param_keys = list(params)
        self._buffer_keys = list(buffers)
        for k, name in enumerate(self._buffer_keys):
            self.register_buffer(f"stacked_buffer_{k}", buffers[name])
        self._base = [copy.deepcopy(models[0]).to("meta")]  # a list: not a submodule, holds no tensors

    def train(self, mode: bool = True):
        super().train(mode)
        self._base[0].train(mode)
        return self

    def _stacked_buffers(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, f"stacked_buffer_{k}") for k, name in enumerate(self._buffer_keys)}

    def _fused_tensors(self) -> Dict[str, torch.Tensor]:
        tensors = dict(zip(self._param_keys, self.stacked))
        tensors.update(self._stacked_buffers())
        return {name: tensors[name] for name in self.cell_shapes if name in tensors}


class VmapFusedModel(StackedFusedModel):
    """torch.func route: one vmapped functional_call per forward."""
    route = "vmap"

    @staticmethod
    def refusal(model: nn.Module) -> Optional[str]:
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules()):
            return "vmap fusion cannot update BatchNorm running statistics"
        return None

    def __init__(self, models: Sequence[nn.Module]):
        reason = self.refusal(models[0])
        if reason:
            raise ValueError(f"{reason}; use route='grouped'")
        super().__init__(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, B, C, H, W] -> logits [N, B, classes]; stochastic layers draw per cell."""
        params = dict(zip(self._param_keys, self.stacked))
        base = self._base[0]

        def one_cell(cell_params, cell_buffers, cell_images):
            return functional_call(base, (cell_params, cell_buffers), (cell_images,))
        if images.device.type != "cuda":
            return vmap(one_cell, randomness="different")(params, self._stacked_buffers(), images)
        # CUDA: vmap folds the cell dim into SDPA's batch, and the fused kernels' backward then refuses the
        # folded layout ("LSE is not correctly aligned (strideH)", torch 2.11, fp32 and bf16 alike); the math
        # kernel is plain batched matmuls and softmax, cheap at a ViT-Tiny's 65 tokens, but under bf16
        # autocast its vmapped softmax backward fails on a dtype check, so it runs in float32
        with sdpa_kernel(SDPBackend.MATH), Float32Attention():
            return vmap(one_cell, randomness="different")(params, self._stacked_buffers(), images)


def cell_channels_last(stacked: torch.Tensor) -> torch.Tensor:
    """A copy of a stacked conv weight [N, out, in, kh, kw] laid out [N, out, kh, kw, in] in memory, so each
    cell's [out, in, kh, kw] view is channels_last; tensors of another rank are returned as they are."""
    if stacked.dim() != 5:
        return stacked
    cells, out_channels, in_channels, kh, kw = stacked.shape
    out = torch.empty((cells, out_channels, kh, kw, in_channels), dtype=stacked.dtype, device=stacked.device)
    return out.permute(0, 1, 4, 2, 3).copy_(stacked)


class StreamFusedModel(StackedFusedModel):
    """Streams route: per cell one functional_call on its views of the stacked tensors, cell i on CUDA
    stream i (sequential on the CPU). BatchNorm running statistics and counters are per cell ([N] and
    [N, C] buffers, updated in place through the views)."""
    route = "streams"

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__(models)
        self._streams: List[torch.cuda.Stream] = []

    @torch.no_grad()
    def to_channels_last(self) -> "StreamFusedModel":
        """Lay out every stacked conv weight so each cell's view is channels_last (as a plain run's model
        after .to(memory_format=torch.channels_last)); returns self."""
        for param in self.stacked:
            param.data = cell_channels_last(param.data)
        self.channels_last = True
        return self

    def stack_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """[N, B, C, H, W]; after `to_channels_last` each cell's [B, C, H, W] is channels_last (stored [N, B, H, W, C])."""
        if not self.channels_last:
            return super().stack_images(images)
        return torch.stack([x.permute(0, 2, 3, 1) for x in images]).permute(0, 1, 4, 2, 3)

    def _cell_streams(self, device: torch.device) -> Optional[List[torch.cuda.Stream]]:
        if device.type != "cuda" or self.cells == 1:
            return None
        if len(self._streams) != self.cells or self._streams[0].device != device:
            self._streams = [torch.cuda.Stream(device) for _ in range(self.cells)]
        return self._streams

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, B, C, H, W] -> logits [N, B, classes]."""
        params = [p.unbind(0) for p in self.stacked]  # one backward node per parameter (a stack of N grads)
        buffers = self._stacked_buffers()
        streams = self._cell_streams(images.device)
        main = torch.cuda.current_stream(images.device) if streams else None
        logits = []
        for i in range(self.cells):
            cell_params = {name: views[i] for name, views in zip(self._param_keys, params)}
            cell_buffers = {name: tensor[i] for name, tensor in buffers.items()}  # in-place updates land in the stack
            if streams:
                streams[i].wait_stream(main)
            with torch.cuda.stream(streams[i]) if streams else nullcontext():
                out = functional_call(self._base[0], (cell_params, cell_buffers), (images[i],))
            if streams:
                out.record_stream(main)
            logits.append(out)
        for stream in streams or []:
            main.wait_stream(stream)
        return torch.stack(logits)
