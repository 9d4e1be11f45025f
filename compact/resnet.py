"""Physical compaction of the CIFAR ResNets (res20s, res56s; res18 = torchvision's BasicBlock ResNet).

Own code, not Torch-Pruning's DependencyGraph: the runner's channel masks are per layer, so a channel
of the residual stream is almost never dead in every layer that writes it (stem, every conv2 of the
stage, the projection shortcut), and DependencyGraph removes a coupled channel from all of them or from
none. We shrink each conv + BatchNorm pair on its own and keep the masked model's output exactly:

- a conv output channel whose weights are all zero still leaves its BatchNorm as the constant
  BN(0) = beta - gamma * mean / sqrt(var + eps) at every pixel;
- block-internal channels (conv1 -> bn1 -> relu -> conv2): a channel is kept only if conv1's row and
  conv2's input column are both alive. A dropped channel whose conv2 column is alive feeds conv2 the
  constant relu(BN(0)); with zero padding that contribution is a fixed map [C_out, H, W] (not a per-
  channel bias: border pixels see fewer taps), added after the shrunk conv2 (`ConvPlusMap`);
- channels written into the residual stream (stem, conv2 -> bn2, shortcut conv -> bn): the stream keeps
  its width; the conv and BN compute only the alive channels and `ScatterChannels` writes them into a
  full-width tensor whose other channels hold their constants BN(0).

A unit with no dead channel is left untouched; one with every channel dead keeps channel 0.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from compact.surgery import alive_columns, alive_rows, keep_list, set_module, slice_conv, slice_norm

ARCHS = ("res20s", "res56s", "res18")


class ScatterChannels(nn.Module):
    """BatchNorm over the kept channels, written into a full-width output.

    x [B, k, H, W] -> [B, C, H, W]: channel `index[i]` = norm(x)[:, i]; every other channel c holds
    `constant[c]` (what the masked model's BN makes of an all-zero conv channel).
    """

    def __init__(self, norm: nn.BatchNorm2d, index: torch.Tensor, constant: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("index", index)
        self.register_buffer("constant", constant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        out = y.new_empty((y.shape[0], self.constant.numel(), y.shape[2], y.shape[3]))
        out.copy_(self.constant.to(y.dtype).view(1, -1, 1, 1).expand_as(out))
        return out.index_copy_(1, self.index, y)


class ConvPlusMap(nn.Module):
    """conv(x) + map: `map` [C_out, H, W] is the fixed contribution of dropped constant input channels.
    Accepts only inputs of the spatial size the model was compacted for (arch.json's input_shape)."""

    def __init__(self, conv: nn.Conv2d, contribution: torch.Tensor):
        super().__init__()
        self.conv = conv
        self.register_buffer("map", contribution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.map


# ---- where the conv + BN pairs are ---------------------------------------------------------------
def _pair(model: nn.Module, conv: str, bn: str) -> Tuple[str, str]:
    modules = dict(model.named_modules())
    if not isinstance(modules.get(conv), nn.Conv2d) or not isinstance(modules.get(bn), nn.BatchNorm2d):
        raise ValueError(f"{conv} / {bn}: not a Conv2d + BatchNorm2d pair")
    if modules[conv].groups != 1:
        raise ValueError(f"{conv}: grouped convolutions are not compacted")
    return conv, bn


def find_blocks(model: nn.Module) -> Tuple[Tuple[str, str], List[dict]]:
    """(stem pair, blocks): each block {"name", "inner": (conv1, bn1), "out": (conv2, bn2),
    "shortcut": (conv, bn) or None}, module names. ValueError for a block layout we cannot compact."""
    stem = _pair(model, "conv1", "bn1")
    blocks = []
    for name, module in model.named_modules():
        if not (name and isinstance(getattr(module, "conv2", None), nn.Conv2d)):
            continue
        if hasattr(module, "conv3"):
            raise ValueError(f"{name}: bottleneck blocks are not compacted")
        short = getattr(module, "shortcut", None) or getattr(module, "downsample", None)
        short_name = "shortcut" if getattr(module, "shortcut", None) is not None else "downsample"
        shortcut = _pair(model, f"{name}.{short_name}.0", f"{name}.{short_name}.1") if short is not None and len(
            short) else None
        blocks.append({"name": name, "inner": _pair(model, f"{name}.conv1", f"{name}.bn1"),
                       "out": _pair(model, f"{name}.conv2", f"{name}.bn2"), "shortcut": shortcut})
    return stem, blocks


# ---- plan: which channels stay (from the masked weights) --------------------------------------------
@torch.no_grad()
def _norm_of_empty_conv(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> torch.Tensor:
    """[C] what eval-mode `norm` outputs for a conv channel whose weights are all zero (its bias, if any)."""
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=conv.weight.device)
    was = norm.training
    norm.eval()
    try:
        return norm(bias.to(conv.weight.dtype).view(1, -1, 1, 1)).view(-1)
    finally:
        norm.train(was)


@torch.no_grad()
def _conv_input_sizes(model: nn.Module, names: List[str], input_shape) -> Dict[str, Tuple[int, int]]:
    modules = dict(model.named_modules())
    sizes, hooks = {}, []
    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(
            lambda m, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[2:]))))
    was = model.training
    model.eval()
    try:
        weight = next(model.parameters())
        model(torch.zeros((1, *input_shape), device=weight.device, dtype=weight.dtype))
    finally:
        model.train(was)
        for hook in hooks:
            hook.remove()
    return sizes


def plan(model: nn.Module, input_shape) -> dict:
    """JSON-able plan of a masked ResNet (weights zero outside the masks): for every conv of a unit,
    {"out_channels": C, "keep": sorted kept channels}; for a conv2 fed dropped constant channels,
    "map": [kept, H, W] and "map_input": [H, W] (its input size)."""
    modules = dict(model.named_modules())
    stem, blocks = find_blocks(model)
    layers = {stem[0]: {"out_channels": modules[stem[0]].out_channels,
                        "keep": keep_list(alive_rows(modules[stem[0]].weight))}}
    sizes = _conv_input_sizes(model, [b["out"][0] for b in blocks], input_shape)
    for block in blocks:
        conv1, bn1 = (modules[n] for n in block["inner"])
        conv2 = modules[block["out"][0]]
        inner = alive_rows(conv1.weight) & alive_columns(conv2.weight)
        keep2 = keep_list(alive_rows(conv2.weight))
        layers[block["inner"][0]] = {"out_channels": conv1.out_channels, "keep": keep_list(inner)}
        layers[block["out"][0]] = {"out_channels": conv2.out_channels, "keep": keep2}
        keep1 = layers[block["inner"][0]]["keep"]
        size = sizes[block["out"][0]]
        if bool((_feeds(conv1, bn1, keep1) != 0).any()):
            shape = _contribution(conv1, bn1, conv2, keep1, keep2, size).shape
            layers[block["out"][0]].update(map=list(shape), map_input=list(size))
        if block["shortcut"]:
            conv = modules[block["shortcut"][0]]
            layers[block["shortcut"][0]] = {"out_channels": conv.out_channels,
                                            "keep": keep_list(alive_rows(conv.weight))}
    return {"layers": layers}


# ---- shrink: rebuild the modules to the plan ---------------------------------------------------------
def _feeds(conv1: nn.Conv2d, bn1: nn.BatchNorm2d, keep1: List[int]) -> torch.Tensor:
    """[C] the constant relu(BN(0)) each dropped channel feeds conv2; 0 for the kept ones."""
    feeds = F.relu(_norm_of_empty_conv(conv1, bn1))
    feeds[torch.tensor(keep1, device=feeds.device)] = 0
    return feeds


@torch.no_grad()
def _contribution(conv1: nn.Conv2d, bn1: nn.BatchNorm2d, conv2: nn.Conv2d, keep1: List[int], keep2: List[int],
                  size: List[int]) -> torch.Tensor:
    """[len(keep2), H, W]: what conv2 makes of conv1's dropped channels, each the constant relu(BN(0))."""
    feeds = _feeds(conv1, bn1, keep1)
    image = feeds.view(1, -1, 1, 1).expand(1, -1, *size)
    out = F.conv2d(image, conv2.weight, None, conv2.stride, conv2.padding, conv2.dilation)
    return out[0, torch.tensor(keep2, device=out.device)].clone()


def _scatter(model: nn.Module, modules: Dict[str, nn.Module], pair: Tuple[str, str], keep: List[int],
             conv: nn.Conv2d) -> None:
    """Replace a residual-stream writer (conv -> bn; `modules`: the originals) by the shrunk `conv` and
    ScatterChannels over the kept channels."""
    bn = modules[pair[1]]
    constant = _norm_of_empty_conv(modules[pair[0]], bn).clone()
    index = torch.tensor(keep, dtype=torch.long, device=constant.device)
    set_module(model, pair[0], conv)
    set_module(model, pair[1], ScatterChannels(slice_norm(bn, keep), index, constant))


def shrink(model: nn.Module, layout: dict) -> nn.Module:
    """Give `model` (a masked ResNet, in place) the widths of `layout` (from `plan`); folded constants
    are computed from its current weights. Returns the model."""
    modules = dict(model.named_modules())
    layers = layout["layers"]
    stem, blocks = find_blocks(model)
    full = lambda name: len(layers[name]["keep"]) == layers[name]["out_channels"]  # noqa: E731
    if not full(stem[0]):
        keep = layers[stem[0]]["keep"]
        _scatter(model, modules, stem, keep, slice_conv(modules[stem[0]], rows=keep))
    for block in blocks:
        (c1, b1), c2 = block["inner"], block["out"][0]
        conv1, bn1, conv2 = modules[c1], modules[b1], modules[c2]
        keep1, keep2 = layers[c1]["keep"], layers[c2]["keep"]
        spec2 = layers[c2]
        new2 = slice_conv(conv2, rows=keep2, columns=keep1)
        if "map" in spec2:
            new2 = ConvPlusMap(new2, _contribution(conv1, bn1, conv2, keep1, keep2, spec2["map_input"]))
        if not full(c1):
            set_module(model, c1, slice_conv(conv1, rows=keep1))
            set_module(model, b1, slice_norm(bn1, keep1))
        if full(c2):
            set_module(model, c2, new2)
        else:
            _scatter(model, modules, block["out"], keep2, new2)
        if block["shortcut"] and not full(block["shortcut"][0]):
            keep = layers[block["shortcut"][0]]["keep"]
            _scatter(model, modules, block["shortcut"], keep, slice_conv(modules[block["shortcut"][0]], rows=keep))
    return model


def check_plan(layout: dict, model: nn.Module) -> str:
    """'' when `layout` fits `model`'s convs, else what does not (for arch.json validation)."""
    modules = dict(model.named_modules())
    for name, spec in layout.get("layers", {}).items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            return f"{name} is not a conv of the model"
        if spec.get("out_channels") != conv.out_channels or not spec.get("keep") or not all(
                isinstance(i, int) and 0 <= i < conv.out_channels for i in spec["keep"]):
            return f"{name}: keep / out_channels do not fit its {conv.out_channels} channels"
    return ""
