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
    bad_step: Optional[int] = None  # first step whose loss was not finite (policy "stop")
    skipped: int = 0  # batches skipped for a non-finite loss (policy "skip_batch")


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
                nan_policy: str = "stop") -> EpochResult:
    """`set_step(i)` sets the LR for step i and returns the regulariser strength for it.

    A non-finite loss is found without a per-step host sync under the "stop" policy
    (the first bad step is tracked on the device and read at the epoch's end);
    "skip_batch" must look at every loss before stepping, so it syncs each step.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen, skipped = 0, 0
    for step, (images, labels) in enumerate(batches):
        reg_lambda = set_step(step)
        with autocast(device, amp):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        finite = torch.isfinite(loss.detach())
        if nan_policy == "skip_batch" and not bool(finite):
            skipped += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        enforcer.after_backward(reg_lambda)
        optimizer.step()
        enforcer.after_step()
        first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, step), first_bad)
        loss_sum += loss.detach().float() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
    bad = int(first_bad)
    return EpochResult(loss=float(loss_sum) / max(seen, 1), accuracy=100.0 * int(correct) / max(seen, 1),
                       samples=seen, bad_step=None if bad < 0 else bad, skipped=skipped)


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
