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


def fuse_models(models: Sequence[nn.Module], route: str = "auto") -> FusedModel:
    """One FusedModel holding copies of `models` (N >= 1 models of one architecture, same state keys
    and shapes); the models themselves are left untouched. `route`: "grouped", "vmap", "streams" or
    "auto" (grouped when every tensor-holding module is a Conv2d, BatchNorm2d or Linear, else streams:
    on an H100, 8 vit_tiny cells at batch 128 trained 1.42x one run on streams, 0.87x on vmap; timm ViTs
    take the grouped route when asked for it: training/fused/vit.py).
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
        route = "streams" if GroupedFusedModel.refusal(models[0]) else "grouped"
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
