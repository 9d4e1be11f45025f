"""One epoch of masked training, and evaluation. Knows nothing about rounds.

Metrics accumulate on the device and are read once per epoch: the step has no
host synchronisation. Masks are enforced twice per step -- on the gradients
before the optimiser (so momentum and weight decay never move a pruned weight)
and on the weights after it (so they stay exactly zero).
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruners.masks import Masks

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    samples: int


class MaskEnforcer:
    """Keeps pruned weights at zero and adds the RSST penalty gradient lambda * w."""

    def __init__(self, weights: Dict[str, torch.Tensor], train_masks: Masks, penalty_masks: Optional[Masks]):
        names = [n for n in weights if n in train_masks]
        self.params = [weights[n] for n in names]
        self.masks = [train_masks[n] for n in names]
        self.penalized = []
        if penalty_masks:
            self.penalized = [(weights[n], penalty_masks[n]) for n in names if bool(penalty_masks[n].any())]

    def after_backward(self, reg_lambda: float) -> None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return
        torch._foreach_mul_(grads, self.masks)
        if reg_lambda:
            for param, mask in self.penalized:
                param.grad.add_(param.detach() * mask, alpha=reg_lambda)

    @torch.no_grad()
    def after_step(self) -> None:
        torch._foreach_mul_(self.params, self.masks)

    @torch.no_grad()
    def penalized_norm(self) -> float:
        if not self.penalized:
            return 0.0
        return float(torch.sqrt(sum(((p * m) ** 2).sum() for p, m in self.penalized)))


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, enforcer: MaskEnforcer,
                set_step: Callable[[int], float], device: torch.device, amp: str = "none",
                on_step: Optional[Callable[[int], None]] = None) -> EpochResult:
    """`set_step(i)` sets the LR for step i and returns the regulariser strength for it."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for step, (images, labels) in enumerate(batches):
        reg_lambda = set_step(step)
        with autocast(device, amp):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        enforcer.after_backward(reg_lambda)
        optimizer.step()
        enforcer.after_step()
        loss_sum += loss.detach().float() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if on_step is not None:
            on_step(step)
    return EpochResult(loss=float(loss_sum) / max(seen, 1), accuracy=100.0 * int(correct) / max(seen, 1),
                       samples=seen)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, amp: str = "none") -> EpochResult:
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, labels in batches:
        with autocast(device, amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    return EpochResult(loss=float(loss_sum) / max(seen, 1), accuracy=100.0 * int(correct) / max(seen, 1),
                       samples=seen)
