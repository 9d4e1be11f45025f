"""`--struct merge`: a learnable token merger between ViT blocks, fewer merged tokens each round.

Round 0 trains the ViT with all tokens. Round 1 puts a `vlm.merger.LearnableTokenMerger` (V1:
importance scorer, no question) in front of block `--token_start_block`: the class token is kept
aside, the N patch tokens are merged into M centres (Gumbel-top-k centres in training, the top M at
eval; soft assignment softmax(QKᵀ/√d/τ)), and that block and every later one run on 1 + M tokens.
The merger trains with the classifier loss together with the model (same optimiser). M follows the
token schedule of `--struct token`: `--token_keep`[k-1] when given, else round(N·(1 − rate)^k).
The same merger serves every round (its weights do not depend on M). Its temperature is constant
within a round, so a round's training step stays one CUDA graph: τ follows the VLM schedule
(vlm.schedule.temperature_at: 1.0 -> 0.1 over the first half) over the merge rounds,
progress (k − 1)/(rounds − 1) in round k. The merger is a submodule `token_merger` of the model,
so checkpoints hold it; no weight is masked (remaining_pct stays 100).
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from pruners import STRUCTS
from pruners.base import PruneContext, RoundPlan
from pruners.masks import Masks
from pruners.reshaping import ShapeChangingMode
from pruners.token import check_budgets, check_token_vit, token_budget
from tokens.backends import find_target

MERGER = "token_merger"  # the merger's attribute on the model (its state_dict prefix)


def merge_temperature(round_index: int, rounds: int) -> float:
    """The merger's temperature in `round_index` >= 1 of a run of `rounds` rounds (round 0 has no merger)."""
    from vlm.schedule import temperature_at
    return temperature_at((round_index - 1) / max(rounds - 1, 1))


class MergeBeforeBlock:
    """Forward pre-hook of the start block: [B, P + N, D] -> [B, P + M, D], the P prefix tokens unmerged."""

    def __init__(self, merger: nn.Module, num_prefix: int):
        self.merger, self.num_prefix = merger, num_prefix
        self.temperature = 1.0

    def __call__(self, module, args):
        tokens = args[0]
        prefix, patches = tokens[:, :self.num_prefix], tokens[:, self.num_prefix:]
        merged = self.merger(patches, self.temperature).merged
        return (torch.cat([prefix, merged], dim=1), *args[1:])


@STRUCTS.register("merge")
class TokenMerging(ShapeChangingMode):
    name = "merge"

    def __init__(self, config):
        super().__init__(config)
        self.num_patches: Optional[int] = None
        self.num_prefix = 1
        self.hook: Optional[MergeBeforeBlock] = None
        self.handle = None
        self.centres: Optional[int] = None

    def budget_for(self, round_index: int) -> int:
        return token_budget(round_index, self.num_patches, self.config.rate, self.config.token_keep)

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        self.num_prefix, self.num_patches = check_token_vit(model, self.config, "merge", "merge")
        check_budgets(self.config, self.budget_for, self.num_patches,
                      lambda centres: (f"merge the {self.num_patches} patch tokens of --arch {self.config.arch} "
                                       f"into {centres} centres; it must be fewer than {self.num_patches}"))

    # ---- the merger on the model ----------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Add a fresh merger to `model` (module `token_merger`) and hook it before the start block."""
        from vlm.merger import LearnableTokenMerger
        dim = model.embed_dim
        parameter = next(model.parameters())
        merger = LearnableTokenMerger(dim, self.num_patches, target_merge_tokens=self.budget_for(1),
                                      d_internal=dim).to(device=parameter.device, dtype=parameter.dtype)
        model.add_module(MERGER, merger)
        self.hook_onto(model)

    def hook_onto(self, model: nn.Module) -> None:
        if self.handle is not None:
            self.handle.remove()
        block = find_target(model).blocks[self.config.token_start_block]
        self.hook = MergeBeforeBlock(getattr(model, MERGER), self.num_prefix)
        self.handle = block.register_forward_pre_hook(self.hook)

    def plan_round(self, ctx: PruneContext, masks: Masks) -> RoundPlan:
        if not hasattr(ctx.model, MERGER):
            self.attach(ctx.model)
        return RoundPlan(train_masks=masks, final_masks=masks)

    def shape_model(self, model: nn.Module, state: Dict[str, torch.Tensor]) -> bool:
        if hasattr(model, MERGER) or not any(key.startswith(MERGER + ".") for key in state):
            return False
        self.attach(model)
        return True

    def configure_model(self, model: nn.Module, round_index: int, log: Callable[[str], None] = print) -> None:
        merger = getattr(model, MERGER, None)
        if merger is None:
            self.centres = None
            how = "all tokens"
        else:
            self.centres = merger.num_centres = self.budget_for(round_index)
            self.hook.temperature = merge_temperature(round_index, self.config.pruning_times)
            how = (f"{self.num_patches} patch tokens merged into {self.centres} before block "
                   f"{self.config.token_start_block}, temperature {self.hook.temperature:.3g}")
        self.measure(model, round_index, log, find_target(model))
        log(f"round {round_index}: --struct merge runs {self.num_prefix} prefix + "
            f"{self.centres or self.num_patches} patch tokens ({how})")

    def round_metrics(self) -> dict:
        kept = self.centres or self.num_patches
        metrics = {"tokens_kept": self.num_prefix + kept, "patch_tokens_kept": kept,
                   "token_budget_fraction": kept / self.num_patches,
                   "merger_parameters": sum(p.numel() for p in getattr(self.model, MERGER).parameters())
                   if hasattr(self.model, MERGER) else 0}
        if self.hook is not None and self.centres is not None:
            metrics["merge_temperature"] = self.hook.temperature
        if self.stats is not None and any(count is not None for count in self.stats.tokens):
            metrics["mean_tokens_per_block"] = self.stats.summary()["mean_tokens_per_block"]
        return {**metrics, **self.cost_metrics()}

    def describe(self) -> str:
        rounds = range(self.config.pruning_times)
        schedule = ", ".join(str(self.budget_for(k)) for k in rounds) if self.num_patches else "?"
        return (f"merge (patch tokens after merging per round: {schedule}; learnable merger before block "
                f"{self.config.token_start_block})")
