"""`--struct token`: the round loop shrinks the tokens a ViT processes instead of its weights.

Round 0 trains with all tokens. Round k >= 1 keeps a budget of patch tokens
(plus the class token) from block `--token_start_block` on, chosen per image by
training-free anchor pruning (SPEC section 4, tokens/): k anchors by CLS
attention, the rest by importance + diversity (EViT, ICLR 2022; Long et al.,
CVPR 2023). The budget is `--token_keep`[k-1] when given (its last value
repeats), else round(patches x (1 - rate)^k). The model retrains with the
pruning active: the selection itself has no gradient, everything it keeps
trains. Weights are never masked, so the remaining weights stay at 100 %.
"""
from typing import Callable, Optional, Sequence, Tuple

import torch.nn as nn

from pruners import STRUCTS
from pruners.base import PruneContext, RoundPlan, StructMode
from pruners.masks import Masks
from tokens.backends import Target, find_target
from tokens.patching import PruningHandle, apply_pruning_to_model
from tokens.stats import EncoderStats
from utils.errors import UsageError


METHOD_OF_STRUCT = {"token": "anchor pruning", "merge": "the token merger"}  # what shrinks the tokens


def token_budget(round_index: int, num_patches: int, rate: float, token_keep: Sequence[int] = ()) -> int:
    """Patch tokens kept in `round_index` (the prefix tokens come on top); all of them in round 0."""
    if round_index == 0:
        return num_patches
    if token_keep:
        return token_keep[min(round_index, len(token_keep)) - 1]
    return max(1, round(num_patches * (1.0 - rate) ** round_index))


def patch_count(model: nn.Module, target: Target) -> Optional[int]:
    if target.num_tokens is not None:
        return target.num_tokens - target.num_prefix_tokens
    # timm ViTs built with dynamic_img_size (e.g. test_vit) still know the grid of the size they were built for
    return getattr(getattr(model, "patch_embed", None), "num_patches", None)


def check_token_vit(model: nn.Module, config, struct: str, counted_for: str) -> Tuple[int, int]:
    """(prefix tokens, patch tokens) of the ViT whose tokens `--struct {struct}` shrinks from block
    `--token_start_block` on. Raises UsageError naming --arch when `model` has no class token or no fixed patch
    count (`counted_for` says what the count is needed for), and naming --token_start_block when the ViT has no
    such block."""
    try:
        target = find_target(model)
    except (TypeError, ValueError) as exc:  # find_target speaks of anchor pruning, what --struct token runs
        detail = str(exc).replace("anchor pruning", METHOD_OF_STRUCT.get(struct, "anchor pruning"))
        raise UsageError(f"--struct {struct}: needs a ViT with a class token, e.g. --arch vit_tiny; "
                         f"--arch {config.arch}: {detail}") from None
    num_patches = patch_count(model, target)
    if num_patches is None:
        raise UsageError(f"--struct {struct}: --arch {config.arch} has no fixed patch count to {counted_for}")
    depth = len(target.blocks)
    if not config.token_start_block < depth:
        raise UsageError(f"--token_start_block {config.token_start_block}: --arch {config.arch} has "
                         f"{depth} blocks (0 to {depth - 1})")
    return target.num_prefix_tokens, num_patches


def check_budgets(config, budget_for: Callable[[int], int], num_patches: int,
                  too_many: Callable[[int], str]) -> None:
    """UsageError naming --token_keep (or --rate) when the budget of a round 1 .. pruning_times - 1 is not below
    `num_patches`: "<flag>: round <k> would <too_many(budget)>"."""
    flag = f"--token_keep {','.join(map(str, config.token_keep))}" if config.token_keep else f"--rate {config.rate}"
    for round_index in range(1, config.pruning_times):
        budget = budget_for(round_index)
        if budget >= num_patches:
            raise UsageError(f"{flag}: round {round_index} would {too_many(budget)}")


@STRUCTS.register("token")
class TokenPruning(StructMode):
    changes_forward = True
    masks_weights = False
    name = "token"

    def __init__(self, config):
        super().__init__(config)
        self.num_patches: Optional[int] = None
        self.num_prefix = 1
        self.budget: Optional[int] = None
        self.handle: Optional[PruningHandle] = None
        self.stats: Optional[EncoderStats] = None

    def budget_for(self, round_index: int) -> int:
        return token_budget(round_index, self.num_patches, self.config.rate, self.config.token_keep)

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        self.num_prefix, self.num_patches = check_token_vit(model, self.config, "token", "budget against")
        check_budgets(self.config, self.budget_for, self.num_patches,
                      lambda budget: (f"keep {budget} of the {self.num_patches} patch tokens of --arch "
                                      f"{self.config.arch}; a budget must be below {self.num_patches}"))

    def configure_model(self, model: nn.Module, round_index: int, log: Callable[[str], None] = print) -> None:
        self.detach()
        self.budget = self.budget_for(round_index)
        if round_index > 0:
            anchors = min(self.config.k_anchors, self.budget)
            self.handle = apply_pruning_to_model(model, anchors, self.budget - anchors, self.config.alpha,
                                                 self.config.token_start_block)
            how = (f"{anchors} anchors + top {self.budget - anchors} by score, from block "
                   f"{self.config.token_start_block} on")
        else:
            how = "all tokens"
        # eval-mode forwards only: validation and test passes give the round's inference images/s
        self.stats = EncoderStats(find_target(model), eval_only=True)
        log(f"round {round_index}: --struct token keeps {self.num_prefix} prefix + {self.budget}/"
            f"{self.num_patches} patch tokens ({how})")

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.restore()
            self.handle = None
        if self.stats is not None:
            self.stats.close()
            self.stats = None

    def plan_round(self, ctx: PruneContext, masks: Masks) -> RoundPlan:
        if self.config.prune_type != "pt":
            ctx.log(f"round {ctx.round_index}: --prune_type {self.config.prune_type} rewinds the weights before "
                    f"retraining at the smaller token budget; --prune_type pt fine-tunes the previous round's")
        return RoundPlan(train_masks=masks, final_masks=masks)  # tokens shrink, weights stay whole

    def round_metrics(self) -> dict:
        metrics = {"tokens_kept": self.num_prefix + self.budget, "patch_tokens_kept": self.budget,
                   "token_budget_fraction": self.budget / self.num_patches}
        if self.stats is not None and self.stats.seconds > 0:
            metrics["eval_images_per_second"] = self.stats.images / self.stats.seconds
        return metrics

    def describe(self) -> str:
        rounds = range(self.config.pruning_times)
        schedule = ", ".join(str(self.budget_for(k)) for k in rounds) if self.num_patches else "?"
        return (f"token (patch tokens kept per round: {schedule}; k_anchors {self.config.k_anchors}, "
                f"alpha {self.config.alpha}, from block {self.config.token_start_block})")
