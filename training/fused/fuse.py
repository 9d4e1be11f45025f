"""fuse_models (pick a route, build the FusedModel), route_refusal and fuse_masks."""
from typing import Dict, Optional, Sequence, Type

import torch
import torch.nn as nn

from training.fused.models import FusedModel, GroupedFusedModel
from training.fused.stacked import StreamFusedModel, VmapFusedModel
from training.fused.vit import GroupedViTFusedModel

# each route's FusedModel classes: the first that claims a model fuses it or refuses it
ROUTES = {"grouped": (GroupedViTFusedModel, GroupedFusedModel), "vmap": (VmapFusedModel,),
          "streams": (StreamFusedModel,)}


def route_class(route: str, model: nn.Module) -> Type[FusedModel]:
    """The class of `route` (a key of ROUTES) that speaks for `model`: the first one that claims it."""
    return next(kind for kind in ROUTES[route] if kind.claims(model))


def route_refusal(route: str, model: nn.Module) -> Optional[str]:
    """Why `route` (a key of ROUTES) cannot fuse copies of `model`, or None when it can. Asks about types only,
    so a meta-device model will do."""
    return route_class(route, model).refusal(model)


def auto_route(model: nn.Module, compiled: bool) -> str:
    """The route `fuse_models(route="auto")` takes: grouped for convnets (every tensor-holding module a Conv2d,
    BatchNorm2d or Linear); for timm's plain ViTs grouped when the step is torch.compiled, else streams; streams
    for anything else. Measured on an H100 (8 vit_tiny cells, batch 128, benchmarks/results/fused_speed_vit_*):
    streams 39.1k img/s and grouped 31.9k eager, grouped 57.4k compiled, against one run's 27.5k eager and
    48.0k compiled (the runner compiles on CUDA by default, and the streams route is never compiled)."""
    if GroupedFusedModel.refusal(model) is None:
        return "grouped"
    if compiled and GroupedViTFusedModel.refusal(model) is None:  # None only for a timm ViT it can take
        return "grouped"
    return "streams"


def fuse_models(models: Sequence[nn.Module], route: str = "auto", compiled: bool = False) -> FusedModel:
    """One FusedModel holding copies of `models` (N >= 1 models of one architecture, same state keys
    and shapes); the models themselves are left untouched. `route`: "grouped", "vmap", "streams" or
    "auto" (`auto_route`; `compiled`: whether the step that runs the fused model is torch.compiled).
    Raises ValueError for no models, differing architectures, or a route that cannot take them."""
    if not models:
        raise ValueError("fuse_models needs at least one model")
    shapes = {name: t.shape for name, t in models[0].state_dict().items()}
    for i, model in enumerate(models[1:], 1):
        other = {name: t.shape for name, t in model.state_dict().items()}
        if type(model) is not type(models[0]) or other != shapes:
            raise ValueError(f"model {i} differs from model 0 in type or state shapes: "
                             "cells must share one architecture")
    if route == "auto":
        route = auto_route(models[0], compiled)
    if route not in ROUTES:
        raise ValueError(f"unknown fusion route {route!r}; choose from auto, {', '.join(ROUTES)}")
    return route_class(route, models[0])(models)


def fuse_masks(fused: FusedModel, cell_masks: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Per-cell masks (N dicts name -> 0/1 tensor shaped as the cell's parameter, same names in every
    cell) -> name -> mask shaped as the fused parameter. Raises ValueError on a count or name mismatch."""
    if len(cell_masks) != fused.cells:
        raise ValueError(f"{len(cell_masks)} mask sets for {fused.cells} cells")
    params = fused.fused_params
    names = list(cell_masks[0])
    out = {}
    for name in names:
        if name not in params or any(set(masks) != set(names) for masks in cell_masks):
            raise ValueError(f"mask {name!r}: not a trainable parameter of every cell")
        tensor, index = params[name]
        out[name] = torch.empty_like(tensor, requires_grad=False)
        for i, masks in enumerate(cell_masks):
            out[name][index[i]] = masks[name]
    return out
