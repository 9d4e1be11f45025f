"""`--struct refill`: element-wise IMP regrouped to whole channels or heads each round.

From "Coarsening the Granularity: Towards Structurally Sparse Lottery Tickets"
(Chen et al., ICML 2022): after the global L1 step, each layer keeps the
number of whole output channels that hold its surviving weights, plus
(C_out - n) x `--fillback_rate` ("refill+"), chosen by `--criteria`. With
`--vit_structured` the regroup is to attention heads and MLP neurons instead.
"""
import torch.nn as nn

from pruners import STRUCTS
from pruners.base import PruneContext, StructMode
from pruners.masks import Masks
from pruners.structure import create_structure


@STRUCTS.register("refill")
class Refill(StructMode):
    name = "refill"
    accepts_vit_structured = True

    def __init__(self, config):
        super().__init__(config)
        self.structure = create_structure(config, self.name.upper() if self.regularized else self.name)

    def check_model(self, model: nn.Module) -> None:
        self.structure.check_model(model)

    def regroup(self, ctx: PruneContext, element_masks: Masks) -> Masks:
        return self.structure(ctx, element_masks)

    def round_metrics(self) -> dict:
        # the RSST code logged this flag so head-level runs can be told apart in wandb
        return {"struct_head": 1} if self.config.vit_structured else {}

    def describe(self) -> str:
        return f"{self.name} ({'head/neuron' if self.config.vit_structured else 'channel'}-level, " \
               f"criteria {self.config.criteria})"
