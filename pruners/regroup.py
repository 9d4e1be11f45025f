"""`--struct regroup`: element-wise global L1, then dense-block regrouping per layer.

From "Coarsening the Granularity: Towards Structurally Sparse Lottery Tickets"
(Chen et al., ICML 2022): each layer's element-wise mask is regrouped into
dense (row group x column) blocks, rows partitioned with METIS (pymetis),
keeping about the element-wise surviving count so the per-round schedule of
remaining weights still roughly holds. The mask math lives in pruners/blocks.py.
"""
from pruners import STRUCTS
from pruners.base import PruneContext, StructMode
from pruners.blocks import block_structure, regroup_layer
from pruners.masks import Masks, remaining_count, total_count
from utils.errors import UsageError


@STRUCTS.register("regroup")
class Regroup(StructMode):
    name = "regroup"

    def check_model(self, model) -> None:
        """Refuse before round 0 trains when the partitioner is missing (it is first needed in round 1)."""
        super().check_model(model)
        try:
            import pymetis  # noqa: F401
        except ImportError:
            raise UsageError("--struct regroup: needs pymetis, which is not installed; "
                             "pip install '.[regroup]' (or pymetis)") from None

    def regroup(self, ctx: PruneContext, element_masks: Masks) -> Masks:
        block_size, density = self.config.block_size, self.config.block_density
        regrouped, kept_blocks, groups, survivors_in_dense = {}, 0, 0, 0.0
        for name, weight in ctx.weights.items():
            mask = element_masks[name]
            regrouped[name], row_groups = regroup_layer(mask, weight, block_size, density)
            after = block_structure(regrouped[name], row_groups)
            before = block_structure(mask, row_groups)
            kept_blocks += after.dense_blocks
            groups += after.groups
            # Survivors of the element-wise mask that already sat in dense blocks: how much
            # structure L1 alone found, against 100 % after the regroup.
            survivors_in_dense += before.dense_fraction * int((mask != 0).sum())
        element, blocked = remaining_count(element_masks), remaining_count(regrouped)
        total = total_count(element_masks)
        ctx.log(f"[regroup] round {ctx.round_index} block_size={block_size} block_density={density}: "
                f"density element-wise {100 * element / max(total, 1):.2f}% -> "
                f"block {100 * blocked / max(total, 1):.2f}%, {kept_blocks} dense blocks kept "
                f"in {groups} row groups over {len(regrouped)} layers "
                f"(element-wise survivors already in dense blocks: {100 * survivors_in_dense / max(element, 1):.1f}%)")
        return regrouped

    def describe(self) -> str:
        return f"regroup(block_size={self.config.block_size}, block_density={self.config.block_density})"
