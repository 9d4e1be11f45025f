"""Struct modes that change the model's layers (`--struct lowrank`, `--struct merge`), and what they measure.

Such a mode adds or replaces modules at a round's start (factorised layers, a token merger), so the
parameters the training step updates and the state_dict keys and shapes change. The round loop then
rebuilds the prunable-weight dict and the training step (`Session.layers_changed`), and before a
checkpoint is checked and loaded the mode gives the fresh model that checkpoint's layers
(`shape_model`): checkpoints hold the changed shapes and resume bit-identically.

Per round these modes report the model's parameters, FLOPs per image (utils.flops.flops_per_image:
torch.utils.flop_counter, a multiply-add is 2 FLOPs, timm's attention matmuls counted on every device)
and the eval-mode images/s measured over the round's validation and test passes (synchronised on CUDA;
the first `WARMUP_CALLS` forwards of a round are not counted).
"""
from abc import ABC, abstractmethod
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from pruners.base import StructMode
from pruners.masks import Masks, remaining_fraction
from tokens.backends import Target
from tokens.stats import EncoderStats
from utils.config import RunConfig
from utils.errors import UsageError
from utils.flops import flops_per_image


class ShapeChangingMode(StructMode, ABC):
    changes_forward = True  # a changed model runs differently: CUDA graphs are captured anew
    masks_weights = False

    def __init__(self, config):
        super().__init__(config)
        self.model: Optional[nn.Module] = None
        self.stats: Optional[EncoderStats] = None
        self.input_shape: Optional[Tuple[int, ...]] = None  # one image, as the model last saw it
        self.round_index = 0
        self.log: Callable[[str], None] = print
        self._shape_hook = None

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if self.config.prune_type != "pt":
            default = " (the default)" if self.config.prune_type == RunConfig.prune_type else ""
            raise UsageError(f"--prune_type {self.config.prune_type}{default}: --struct {self.config.struct} "
                             f"retrains the layers it changed from the previous round's trained weights, which "
                             f"the rewind weights do not have; pass --prune_type pt")

    @abstractmethod
    def shape_model(self, model: nn.Module, state: Dict[str, torch.Tensor]) -> bool:
        """Give `model` the layers of `state` (a checkpoint's model state); True when it changed any."""

    def remaining_pct(self, masks: Masks) -> float:
        """% of the prunable weights left, for the epoch and round records (masks: the round's)."""
        return 100.0 * remaining_fraction(masks)

    # ---- measurement ---------------------------------------------------------------------------
    def measure(self, model: nn.Module, round_index: int, log: Callable[[str], None],
                target: Optional[Target] = None) -> None:
        """Start timing `model`'s eval-mode forwards for round `round_index` (`target`: a ViT's blocks,
        whose token counts are then recorded too); `log` later prints the round's costs."""
        self.stop_measuring()
        self.model, self.round_index, self.log = model, round_index, log
        self.stats = EncoderStats(target or Target(library="model", encoder=model, blocks=nn.ModuleList(),
                                                   readers=[], num_prefix_tokens=0, num_tokens=None,
                                                   sequence_first=False), eval_only=True)
        self._shape_hook = model.register_forward_pre_hook(self._record_shape)

    def _record_shape(self, module: nn.Module, args) -> None:
        self.input_shape = tuple(args[0].shape[1:])

    def stop_measuring(self) -> None:
        if self.stats is not None:
            self.stats.close()
            self.stats = None
        if self._shape_hook is not None:
            self._shape_hook.remove()
            self._shape_hook = None

    def cost_metrics(self) -> dict:
        """parameters, flops_per_image and eval_images_per_second of the model as it runs now; logs them
        in one line."""
        metrics = {}
        if self.stats is not None and self.stats.seconds > 0:  # read before the FLOP count's own forward
            metrics["eval_images_per_second"] = self.stats.summary()["images_per_s"]
        if self.model is not None:
            metrics["parameters"] = sum(p.numel() for p in self.model.parameters())
            if self.input_shape is not None:
                metrics["flops_per_image"] = flops_per_image(self.model, self.input_shape)
        shown = [f"{metrics['parameters']:,} parameters"] if "parameters" in metrics else []
        if "flops_per_image" in metrics:
            shown.append(f"{metrics['flops_per_image'] / 1e6:.4g} MFLOPs per image")
        if "eval_images_per_second" in metrics:
            shown.append(f"eval {metrics['eval_images_per_second']:,.0f} images/s")
        if shown:
            self.log(f"round {self.round_index}: --struct {self.config.struct} model: {', '.join(shown)}")
        return metrics

