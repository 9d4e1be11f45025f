"""Physical compaction of timm ViTs: attention heads and MLP hidden neurons removed, per block.

Exactness (compact == masked, up to float rounding):
- head h of a block is removed when its `proj` input columns are all zero (its output is multiplied by
  zero) or when its v rows of `qkv` are all zero: then every token's value is the bias b_v, softmax
  rows sum to 1, so the head outputs b_v whatever q and k are, and proj[:, head h] @ b_v is added to
  proj's bias (needs proj to have a bias);
- hidden neuron j of a timm `Mlp` (fc1 -> act -> fc2, no norm between) is removed when fc2's column j
  is all zero, or when fc1's row j is: the neuron is then the constant act(b1_j) and
  fc2[:, j] * act(b1_j) is added to fc2's bias.
A block keeps at least one head / neuron. Each block's attention gets its own `num_heads` (timm's
Attention reshapes by `num_heads`, `head_dim` and `attn_dim`, timm >= 1.0.16). GLU MLPs and layouts
pruners/groups.py refuses stay as they are.
"""
from typing import Dict, List

import torch
import torch.nn as nn

from compact.surgery import alive_columns, alive_rows, keep_list, slice_linear
from pruners.groups import UnsupportedLayout, find_attention_groups, find_mlp_groups


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _groups(find, model: nn.Module) -> list:
    """`find(model)` (pruners.groups' layout finders), a layout they refuse as ValueError."""
    try:
        return find(model)
    except UnsupportedLayout as exc:
        raise ValueError(str(exc)) from None


def attention_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{attention module name: module} of the blocks whose heads we can remove."""
    found = {}
    for group in _groups(find_attention_groups, model):
        module = model.get_submodule(_parent(group.qkv))
        if not hasattr(module, "attn_dim"):
            raise ValueError(f"{_parent(group.qkv)} ({type(module).__name__}): no attn_dim attribute; per-block "
                             f"head counts need timm >= 1.0.16's Attention")
        found[_parent(group.qkv)] = module
    return found


def mlp_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{MLP module name: module} of the plain fc1 -> act -> fc2 MLPs (GLUs are left as they are)."""
    found = {}
    for group in _groups(find_mlp_groups, model):
        module = model.get_submodule(_parent(group.fc2))
        plain = group.rows == (group.fc1,) and model.get_submodule(group.fc1).out_features == group.hidden
        if plain and isinstance(getattr(module, "act", None), nn.Module):
            found[_parent(group.fc2)] = module
    return found


def _dead_heads(attn: nn.Module) -> Dict[str, torch.Tensor]:
    """bool [heads] masks: "silent" (proj columns all zero) and "constant" (v rows all zero)."""
    heads, width = attn.num_heads, attn.attn_dim
    silent = ~alive_columns(attn.proj.weight).view(heads, -1).any(1)
    constant = ~alive_rows(attn.qkv.weight)[2 * width:].view(heads, -1).any(1)
    if attn.proj.bias is None and attn.qkv.bias is not None:
        constant = torch.zeros_like(constant)  # b_v would have nowhere to go
    return {"silent": silent, "constant": constant}


def _dead_neurons(mlp: nn.Module) -> Dict[str, torch.Tensor]:
    silent = ~alive_columns(mlp.fc2.weight)
    constant = ~alive_rows(mlp.fc1.weight)
    if mlp.fc2.bias is None and mlp.fc1.bias is not None:
        constant = torch.zeros_like(constant)
    return {"silent": silent, "constant": constant}


def plan(model: nn.Module, input_shape=None) -> dict:
    """JSON-able plan of a masked ViT: {"attention": {name: {"num_heads": H, "keep": [...]}},
    "mlp": {name: {"hidden": N, "keep": [...]}}} (kept heads / neurons, sorted)."""
    attention = {}
    for name, attn in attention_modules(model).items():
        dead = _dead_heads(attn)
        attention[name] = {"num_heads": int(attn.num_heads), "keep": keep_list(~(dead["silent"] | dead["constant"]))}
    mlp = {}
    for name, module in mlp_modules(model).items():
        dead = _dead_neurons(module)
        mlp[name] = {"hidden": int(module.fc2.in_features), "keep": keep_list(~(dead["silent"] | dead["constant"]))}
    return {"attention": attention, "mlp": mlp}


@torch.no_grad()
def _shrink_attention(attn: nn.Module, keep: List[int]) -> None:
    heads, head_dim, width = attn.num_heads, attn.head_dim, attn.attn_dim
    device = attn.qkv.weight.device
    kept = torch.zeros(heads, dtype=torch.bool, device=device)
    kept[torch.tensor(keep, device=device)] = True
    dead = _dead_heads(attn)
    folded = dead["constant"].to(device) & ~dead["silent"].to(device) & ~kept
    features = kept.repeat_interleave(head_dim)  # [attn_dim]
    rows = torch.nonzero(features.repeat(3)).flatten()  # [3, heads, head_dim] layout
    columns = torch.nonzero(features).flatten()
    proj = slice_linear(attn.proj, columns=columns)
    if attn.qkv.bias is not None and bool(folded.any()):
        value_bias = attn.qkv.bias[2 * width:] * folded.repeat_interleave(head_dim).to(attn.qkv.bias.dtype)
        proj.bias.add_(attn.proj.weight @ value_bias)
    attn.qkv = slice_linear(attn.qkv, rows=rows)
    attn.proj = proj
    attn.num_heads, attn.attn_dim = len(keep), len(keep) * head_dim


@torch.no_grad()
def _shrink_mlp(mlp: nn.Module, keep: List[int]) -> None:
    device = mlp.fc1.weight.device
    kept = torch.zeros(mlp.fc2.in_features, dtype=torch.bool, device=device)
    kept[torch.tensor(keep, device=device)] = True
    dead = _dead_neurons(mlp)
    folded = dead["constant"].to(device) & ~dead["silent"].to(device) & ~kept
    index = torch.nonzero(kept).flatten()
    fc2 = slice_linear(mlp.fc2, columns=index)
    if mlp.fc1.bias is not None and bool(folded.any()):
        constant = mlp.act(mlp.fc1.bias) * folded.to(mlp.fc1.bias.dtype)
        fc2.bias.add_(mlp.fc2.weight @ constant)
    mlp.fc1 = slice_linear(mlp.fc1, rows=index)
    mlp.fc2 = fc2


def shrink(model: nn.Module, layout: dict) -> nn.Module:
    """Give `model` (a masked ViT, in place) the heads and neurons of `layout` (from `plan`), folding the
    constant outputs of removed ones into proj / fc2 biases. Returns the model."""
    for name, spec in layout.get("attention", {}).items():
        if len(spec["keep"]) < spec["num_heads"]:
            _shrink_attention(model.get_submodule(name), spec["keep"])
    for name, spec in layout.get("mlp", {}).items():
        if len(spec["keep"]) < spec["hidden"]:
            _shrink_mlp(model.get_submodule(name), spec["keep"])
    return model


def check_plan(layout: dict, model: nn.Module) -> str:
    """'' when `layout` fits `model`'s attention / MLP modules, else what does not."""
    attention, mlps = attention_modules(model), mlp_modules(model)
    for kind, found, size in (("attention", attention, lambda m: m.num_heads),
                              ("mlp", mlps, lambda m: m.fc2.in_features)):
        for name, spec in layout.get(kind, {}).items():
            if name not in found:
                return f"{kind} {name} is not in the model"
            total = size(found[name])
            if spec.get("num_heads", spec.get("hidden")) != total or not spec.get("keep") or not all(
                    isinstance(i, int) and 0 <= i < total for i in spec["keep"]):
                return f"{name}: keep does not fit its {total} {'heads' if kind == 'attention' else 'neurons'}"
    return ""

