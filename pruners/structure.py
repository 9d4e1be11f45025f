"""Regroupers: element-wise masks -> channel- or head-level masks for a whole model.

`ChannelStructure` regroups every prunable layer to output channels (refill);
`VitStructure` regroups attention blocks to heads and MLPs to neurons
(`--vit_structured`, `--vit_prune_target`). Both score groups with
`--criteria` on the trained weights, print a per-layer report and return new
masks; the pure math lives in channels.py and heads.py.
"""
from typing import Dict, List

import torch
import torch.nn as nn

from pruners.base import PruneContext
from pruners.channels import regroup_to_channels
from pruners.criteria import ACTIVATION_CRITERIA, output_scores, uncalled_modules
from pruners.groups import UnsupportedLayout, find_attention_groups, find_mlp_groups
from pruners.heads import format_head_report, head_scores, neuron_scores, regroup_to_heads, regroup_to_neurons
from pruners.masks import PRUNABLE_MODULES, Masks
from utils.errors import UsageError

CALIBRATION_SHAPE = (2, 3, 32, 32)  # CIFAR-shaped, as every dataset of the runner


def _weight(name: str) -> str:
    return f"{name}.weight"


def _sparsity(*masks) -> float:
    return 1.0 - sum(float((m != 0).sum()) for m in masks) / sum(m.numel() for m in masks)


class ChannelStructure:
    label = "Channel-level Structured Pruning"

    def __init__(self, config, mode_label: str):
        self.config, self.mode_label = config, mode_label

    def check_model(self, model: nn.Module) -> None:
        """Any conv/linear model works, unless an activation criteria cannot see a layer's outputs."""
        layers = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_MODULES)}
        check_called(self.config, model, layers)

    def __call__(self, ctx: PruneContext, element: Masks) -> Masks:
        modules = dict(ctx.model.named_modules())
        layers = {name[:-len(".weight")]: modules[name[:-len(".weight")]] for name in element}
        scores = output_scores(self.config.criteria, layers, element, ctx.model, ctx.calibration_batches)
        out = dict(element)
        lines = [f"[{self.label}] criteria={self.config.criteria} rate={self.config.rate} "
                 f"fillback_rate={self.config.fillback_rate} count={self.config.refill_count} mode={self.mode_label}"]
        for name in layers:
            key = _weight(name)
            out[key] = regroup_to_channels(element[key], scores[name], self.config.fillback_rate,
                                           self.config.refill_count)
            kept = int((out[key].reshape(out[key].shape[0], -1)[:, 0] != 0).sum())
            lines.append(f"  {name}  keep {kept}/{element[key].shape[0]} channels  sparsity: element-wise "
                         f"{100 * _sparsity(element[key]):.2f}% -> channel-level {100 * _sparsity(out[key]):.2f}%")
        ctx.log("\n".join(lines))
        return out


class VitStructure:
    label = "ViT Head-level Quasi-Structured Pruning"

    def __init__(self, config, mode_label: str):
        self.config, self.mode_label = config, mode_label

    def check_model(self, model: nn.Module) -> None:
        """Refuse, before any work, a model without the blocks `--vit_prune_target` regroups, with a
        layout pruners/groups.py cannot mask exactly, or with layers activation criteria cannot see."""
        arch, target = self.config.arch, self.config.vit_prune_target
        try:
            attention = find_attention_groups(model) if target in ("head", "both") else []
            mlps = find_mlp_groups(model) if target in ("mlp", "both") else []
        except UnsupportedLayout as exc:
            raise UsageError(f"--vit_structured: --arch {arch}: {exc}") from None
        if target != "mlp" and not attention:
            raise UsageError(f"--vit_structured: --arch {arch} has no ViT attention blocks "
                             f"(modules with qkv, proj and num_heads); use it with vit_tiny, vit_small or a timm ViT")
        if target == "mlp" and not mlps:
            raise UsageError(f"--vit_structured --vit_prune_target mlp: --arch {arch} has no ViT MLP blocks "
                             f"(fc1 -> fc2)")
        modules = dict(model.named_modules())
        scored = [g.qkv for g in attention] + [row for g in mlps for row in g.rows]
        check_called(self.config, model, {name: modules[name] for name in scored})

    def __call__(self, ctx: PruneContext, element: Masks) -> Masks:
        out = dict(element)
        target = self.config.vit_prune_target
        lines = [f"[{self.label}] criteria={self.config.criteria} rate={self.config.rate} "
                 f"fillback_rate={self.config.fillback_rate} mode={self.mode_label} (mask only) target={target}"]
        if target in ("head", "both"):
            lines += self._heads(ctx, element, out)
        if target in ("mlp", "both"):
            lines += self._neurons(ctx, element, out)
        ctx.log("\n".join(lines))
        return out

    def _scores(self, ctx: PruneContext, names: List[str], element: Masks) -> Dict:
        modules = dict(ctx.model.named_modules())
        return output_scores(self.config.criteria, {n: modules[n] for n in names}, element, ctx.model,
                             ctx.calibration_batches)

    def _heads(self, ctx: PruneContext, element: Masks, out: Masks) -> List[str]:
        groups = [g for g in find_attention_groups(ctx.model) if _weight(g.qkv) in element and _weight(g.proj)
                  in element]
        row_scores = self._scores(ctx, [g.qkv for g in groups], element)
        lines = []
        for group in groups:
            qkv, proj = element[_weight(group.qkv)], element[_weight(group.proj)]
            scores = head_scores(row_scores[group.qkv], group.num_heads)
            new_qkv, new_proj, keep = regroup_to_heads(qkv, proj, scores, self.config.fillback_rate)
            out[_weight(group.qkv)], out[_weight(group.proj)] = new_qkv, new_proj
            lines.append(format_head_report(group.qkv, qkv.shape, group.num_heads, scores, keep,
                                            _sparsity(qkv, proj), _sparsity(new_qkv, new_proj)))
        return lines

    def _neurons(self, ctx: PruneContext, element: Masks, out: Masks) -> List[str]:
        groups = [g for g in find_mlp_groups(ctx.model)
                  if all(_weight(name) in element for name in (*g.rows, g.fc2))]
        row_scores = self._scores(ctx, [row for g in groups for row in g.rows], element)
        lines = []
        for group in groups:
            # a GLU's row layers stack into one packed fc1 [chunks * hidden, dim]: neuron j owns rows j, hidden + j
            fc1 = torch.cat([element[_weight(row)] for row in group.rows])
            fc2 = element[_weight(group.fc2)]
            scores = neuron_scores(torch.cat([row_scores[row] for row in group.rows]), group.hidden)
            new_fc1, new_fc2, keep = regroup_to_neurons(fc1, fc2, scores, self.config.fillback_rate)
            for row, part in zip(group.rows, new_fc1.split([element[_weight(r)].shape[0] for r in group.rows])):
                out[_weight(row)] = part.clone()
            out[_weight(group.fc2)] = new_fc2
            lines.append(f"{'+'.join(group.rows)}  keep {int(keep.sum())}/{keep.numel()} neurons  sparsity: "
                         f"element-wise {100 * _sparsity(fc1, fc2):.2f}% -> neuron-level "
                         f"{100 * _sparsity(new_fc1, new_fc2):.2f}%")
        return lines


def check_called(config, model: nn.Module, layers: Dict[str, nn.Module]) -> None:
    """Raise UsageError when `--criteria` reads activations of a layer the model never calls as a module."""
    if config.criteria not in ACTIVATION_CRITERIA or not layers:
        return
    device = next(model.parameters()).device
    silent = uncalled_modules(model, layers, torch.zeros(CALIBRATION_SHAPE, device=device))
    if silent:
        raise UsageError(f"--criteria {config.criteria}: --arch {config.arch}: {silent[0]} is never called as a "
                         f"module (its weight is applied functionally), so its outputs cannot be scored; "
                         f"use --criteria remain or magnitude")


def create_structure(config, mode_label: str):
    return (VitStructure if config.vit_structured else ChannelStructure)(config, mode_label)
