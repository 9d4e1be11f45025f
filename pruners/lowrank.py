"""`--struct lowrank`: the round loop shrinks the rank of the model's layers instead of masking weights.

Round 0 trains the dense model. Round k >= 1 replaces every Linear and ungrouped Conv2d layer (not the
stem or the classifier heads unless --conv1 / --fc; for vit_tiny: each block's attention qkv / proj and
MLP fc1 / fc2) by the truncated SVD of its trained weight, W [out, in] ≈ A [out, r]·B [r, in], as two
layers (pruners/factorise.py), and retrains the factors. The rank compounds like the pruning modes'
remaining weights: r_k = max(1, round(r_eq·(1 − rate)^k)) with r_eq = out·in/(out + in), the rank at
which the factors hold as many weights as the dense layer, so a factorised layer keeps about
(1 − rate)^k of its weights after round k (a rank above r_eq would add weights, not remove them).
Each round re-factorises the previous round's A·B at the smaller rank; no weight is masked.
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from models import dense_modules
from pruners import STRUCTS
from pruners.base import PruneContext, RoundPlan
from pruners.factorise import LowRank, dense_shape, equivalent_rank, factorisable_layers, factorise, \
    factorise_like, replace_module
from pruners.masks import Masks
from pruners.reshaping import ShapeChangingMode
from utils.errors import UsageError


def scheduled_rank(round_index: int, out_features: int, fan_in: int, rate: float) -> Optional[int]:
    """The rank of an [out, in] layer in `round_index`: None (dense) in round 0, else
    max(1, round(out·in/(out + in)·(1 − rate)^round_index))."""
    if round_index == 0:
        return None
    return max(1, round(equivalent_rank(out_features, fan_in) * (1.0 - rate) ** round_index))


def layer_weights(layer: nn.Module) -> int:
    """Weights (no bias) of a dense or factorised layer."""
    if isinstance(layer, LowRank):
        return layer.down.weight.numel() + layer.up.weight.numel()
    return layer.weight.numel()


@STRUCTS.register("lowrank")
class LowRankFactorisation(ShapeChangingMode):
    name = "lowrank"

    def __init__(self, config):
        super().__init__(config)
        self.dense_shapes: Dict[str, tuple] = {}  # layer name -> (out, fan_in) of the dense model

    def layers(self, model: nn.Module) -> Dict[str, nn.Module]:
        return factorisable_layers(model, dense_modules(model, self.config.conv1, self.config.prune_classifier))

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        self.dense_shapes = {name: dense_shape(layer) for name, layer in self.layers(model).items()}
        if not self.dense_shapes:
            raise UsageError(f"--struct lowrank: --arch {self.config.arch} has no Linear or Conv2d layer to "
                             f"factorise besides its stem and classifier (--conv1 / --fc include those)")

    def ranks_for(self, round_index: int) -> Dict[str, Optional[int]]:
        return {name: scheduled_rank(round_index, out, fan_in, self.config.rate)
                for name, (out, fan_in) in self.dense_shapes.items()}

    def dense_weights(self) -> int:
        return sum(out * fan_in for out, fan_in in self.dense_shapes.values())

    def plan_round(self, ctx: PruneContext, masks: Masks) -> RoundPlan:
        """Factorise every layer to this round's rank (in place); the loop then trains all of the new
        layers' weights."""
        ranks = self.ranks_for(ctx.round_index)
        for name, layer in self.layers(ctx.model).items():
            replace_module(ctx.model, name, factorise(layer, ranks[name]))
        return RoundPlan(train_masks=masks, final_masks=masks)

    def shape_model(self, model: nn.Module, state: Dict[str, torch.Tensor]) -> bool:
        return bool(factorise_like(model, state))

    def configure_model(self, model: nn.Module, round_index: int, log: Callable[[str], None] = print) -> None:
        self.measure(model, round_index, log)
        ranks = {name: (layer.rank if isinstance(layer, LowRank) else None)
                 for name, layer in self.layers(model).items()}
        shown = "dense" if not any(ranks.values()) else ", ".join(
            f"{shape[0]}x{shape[1]}: rank {rank}" for shape, rank in self._ranks_by_shape(ranks).items())
        log(f"round {round_index}: --struct lowrank layers {shown}; their weights "
            f"{self.remaining_pct(None):.2f}% of the dense layers'")

    def _ranks_by_shape(self, ranks: Dict[str, Optional[int]]) -> dict:
        by_shape = {}
        for name, rank in ranks.items():
            by_shape.setdefault(self.dense_shapes[name], rank)
        return by_shape

    def remaining_pct(self, masks: Optional[Masks]) -> float:
        """% of the dense layers' weights the (factorised) layers hold now."""
        current = sum(layer_weights(layer) for layer in self.layers(self.model).values())
        return 100.0 * current / self.dense_weights()

    def round_metrics(self) -> dict:
        layers = self.layers(self.model)
        ranks = {name: layer.rank for name, layer in layers.items() if isinstance(layer, LowRank)}
        return {"remaining_pct": self.remaining_pct(None), "factorised_layers": len(ranks),
                "layer_ranks": ranks, "factorised_weights": sum(map(layer_weights, layers.values())),
                **self.cost_metrics()}

    def describe(self) -> str:
        if not self.dense_shapes:
            return "lowrank"
        name, (out, fan_in) = next(iter(self.dense_shapes.items()))
        schedule = ", ".join(str(scheduled_rank(k, out, fan_in, self.config.rate) or "dense")
                             for k in range(self.config.pruning_times))
        return (f"lowrank (truncated SVD of {len(self.dense_shapes)} layers, rank x (1 - {self.config.rate}) per "
                f"round from the weight-equivalent rank out*in/(out+in); e.g. {name} [{out}x{fan_in}]: {schedule})")
