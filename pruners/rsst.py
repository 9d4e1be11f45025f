"""`--struct rsst`: regularization-based structured sparse training.

Instead of zeroing at once the weights that the structured (channel/head) mask
drops but the element-wise mask keeps, RSST pulls them toward zero during the
round with an L2 penalty whose strength grows with progress t/T through the
round: lambda(t) = `--reg_granularity_prune` x schedule(t/T), applied as
grad += lambda * w on exactly those weights, every step. They are zeroed at the
round's end. Weights that neither mask keeps are zeroed at once; weights the
structure keeps (whole kept channels/heads) train freely.
"""
import math

from pruners import STRUCTS
from pruners.base import PruneContext, RoundPlan
from pruners.masks import Masks, difference, union
from pruners.refill import Refill
from utils.registry import Registry

SCHEDULES: Registry = Registry("RST schedule", "--RST_schedule")
E_MINUS_1 = math.e - 1.0

SCHEDULES.register("x")(lambda t, p: t)
SCHEDULES.register("x^2")(lambda t, p: t ** 2)
SCHEDULES.register("x^3")(lambda t, p: t ** 3)
# plain exponential growth e^t - 1 (reaches e - 1 ~ 1.72 at the round's end)
SCHEDULES.register("exp")(lambda t, p: math.exp(t) - 1.0)
# normalised to reach exactly 1 at the round's end
SCHEDULES.register("exp_custom")(lambda t, p: (math.exp(t) - 1.0) / E_MINUS_1)
SCHEDULES.register("exp_custom_exponents")(lambda t, p: (math.exp(t ** p) - 1.0) / E_MINUS_1)


def schedule_value(name: str, progress: float, exponents: int = 4) -> float:
    return SCHEDULES[name](min(max(progress, 0.0), 1.0), exponents)


@STRUCTS.register("rsst")
class RSST(Refill):
    name = "rsst"
    regularized = True

    def plan_round(self, ctx: PruneContext, masks: Masks) -> RoundPlan:
        element = self.element_masks(ctx, masks)
        structured = self.regroup(ctx, element)
        # weights dropped by both masks go at once; weights the structure keeps train freely (refill);
        # weights only the element-wise mask keeps are regularised away
        return RoundPlan(train_masks=union(element, structured), final_masks=structured,
                         penalty_masks=difference(element, structured))

    def reg_lambda(self, progress: float) -> float:
        return self.config.reg_granularity_prune * schedule_value(self.config.RST_schedule, progress,
                                                                  self.config.exponents)

    def describe(self) -> str:
        return f"{super().describe()}, {self.config.RST_schedule} x{self.config.reg_granularity_prune}"
