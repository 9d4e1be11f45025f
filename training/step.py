"""The training step as a fixed sequence of tensor ops, capturable in one CUDA graph.

forward (autocast) -> cross-entropy -> backward -> grad *= mask -> grad += lambda * w
on the RSST-penalised weights -> SGD with momentum and weight decay -> w *= mask,
plus loss/accuracy/first-non-finite-step accumulators, all on the device. The
learning rate and lambda live in device tensors and the masks are tensors
updated in place at each round's start, so one captured graph serves every
step of every round: no host sync, no recompilation. On the CPU (and with
`--nan_policy skip_batch`, which must look at each loss) the same ops run
eagerly.

SGD here is torch.optim.SGD's rule (dampening 0, no Nesterov):
buf = momentum * buf + (grad + wd * w); w -= lr * buf.

Under torchrun (`dist`, training/distributed.py) the body averages the gradients over the ranks
right after the backward (one all-reduce, captured in the graph with NCCL), and the epoch's sums are
summed over the ranks when read; one process (`SINGLE`) runs exactly the ops above.
"""
import contextlib
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruners.base import RoundPlan
from training.distributed import SINGLE, Distributed

WARMUP_STEPS = 3  # eager steps on a side stream before capture, as CUDA graphs require
# bf16 keeps fp32's exponent range, so it needs no loss scaling (which would cost a sync or a
# skip-step branch per step); fp16 is not offered for that reason.
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_amp(amp: str, device: torch.device) -> str:
    """`auto`: bf16 on CUDA (measured fastest at no accuracy cost), fp32 on the CPU."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    return amp


class TrainStep:
    def __init__(self, model: nn.Module, weights: Dict[str, torch.Tensor], device: torch.device, amp: str,
                 momentum: float, weight_decay: float, regularized: bool, use_graph: bool,
                 channels_last: bool = False, compile_model: bool = False, skip_nonfinite: bool = False,
                 dist: Distributed = SINGLE):
        self.model, self.device, self.amp, self.dist = model, device, amp, dist
        self.skip_nonfinite = skip_nonfinite
        self.momentum, self.weight_decay, self.regularized = momentum, weight_decay, regularized
        self.channels_last = channels_last
        self.forward = torch.compile(model) if compile_model else model
        self.log = print
        self.params: List[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
        self.buffers = [torch.zeros_like(p) for p in self.params]
        by_id = {id(w): name for name, w in weights.items()}
        self.masked_names = [by_id[id(p)] for p in self.params if id(p) in by_id]
        self.masked_params = [p for p in self.params if id(p) in by_id]
        self.masks = [torch.ones_like(p) for p in self.masked_params]
        self.penalty_masks = [torch.zeros_like(p) for p in self.masked_params] if regularized else []
        self.lr = torch.zeros((), device=device)
        self.reg_lambda = torch.zeros((), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.step_index = torch.zeros((), device=device, dtype=torch.long)
        self.use_graph = use_graph and device.type == "cuda" and not skip_nonfinite
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_images: Optional[torch.Tensor] = None
        self.static_labels: Optional[torch.Tensor] = None

    # ---- round and state management ------------------------------------------------------
    @torch.no_grad()
    def start_round(self, plan: RoundPlan) -> None:
        """Fresh optimiser state and this round's masks, written in place (the graph keeps its pointers)."""
        for buf in self.buffers:
            buf.zero_()
        for name, mask in zip(self.masked_names, self.masks):
            mask.copy_(plan.train_masks[name])
        for name, mask in zip(self.masked_names, self.penalty_masks):
            if plan.penalty_masks is None:
                mask.zero_()
            else:
                mask.copy_(plan.penalty_masks[name])

    def state_dict(self) -> dict:
        return {"momentum_buffers": [b.detach().cpu().clone() for b in self.buffers]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state["momentum_buffers"]
        if len(saved) != len(self.buffers):
            raise ValueError(f"optimizer state has {len(saved)} momentum buffers, the model needs {len(self.buffers)}")
        for buf, value in zip(self.buffers, saved):
            buf.copy_(value)

    @torch.no_grad()
    def penalized_norm(self) -> float:
        if not self.penalty_masks:
            return 0.0
        return float(torch.sqrt(sum(((p * m) ** 2).sum() for p, m in zip(self.masked_params, self.penalty_masks))))

    # ---- the step ----------------------------------------------------------------------------
    def _body(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        with autocast(self.device, self.amp):
            logits = self.forward(images)
            loss = F.cross_entropy(logits, labels)
        if self.skip_nonfinite and not self.dist.all_true(bool(torch.isfinite(loss.detach()))):
            return False  # eager only: this host sync is why skip_batch runs without the graph; ranks skip alike
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            self.dist.average_gradients(grads)
            masked_grads = [p.grad for p in self.masked_params]
            if masked_grads:
                torch._foreach_mul_(masked_grads, self.masks)
            if self.regularized and masked_grads:
                pulled = torch._foreach_mul(self.masked_params, self.penalty_masks)
                torch._foreach_mul_(pulled, self.reg_lambda)
                torch._foreach_add_(masked_grads, pulled)
            if self.weight_decay:
                torch._foreach_add_(grads, self.params, alpha=self.weight_decay)
            torch._foreach_mul_(self.buffers, self.momentum)
            torch._foreach_add_(self.buffers, grads)
            torch._foreach_add_(self.params, torch._foreach_mul(self.buffers, self.lr), alpha=-1.0)
            if self.masked_params:
                torch._foreach_mul_(self.masked_params, self.masks)
            finite = torch.isfinite(loss.detach())
            self.first_bad.copy_(torch.where((self.first_bad < 0) & ~finite, self.step_index, self.first_bad))
            self.step_index.add_(1)
            self.loss_sum.add_(loss.detach().float() * labels.shape[0])
            self.correct.add_((logits.detach().argmax(1) == labels).sum())
        return True

    def _zero_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def reset_graph(self) -> None:
        self.graph, self.static_images, self.static_labels = None, None, None

    def _warm_up(self) -> None:
        """Eager steps on the static batch; a torch.compile failure falls back to the plain model."""
        for _ in range(WARMUP_STEPS):
            self._zero_grads()
            try:
                self._body(self.static_images, self.static_labels)
            except Exception as exc:  # inductor/triton problems vary by install: keep training, say so
                if self.forward is self.model:
                    raise
                self.log(f"warning: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                         f"training without it (--compile off silences this)")
                self.forward = self.model
                self._zero_grads()
                self._body(self.static_images, self.static_labels)

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Warm up on a side stream, capture, then undo the warm-up's effect on the weights."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        saved_buffers = [b.clone() for b in self.buffers]
        counters = [t.clone() for t in (self.loss_sum, self.correct, self.first_bad, self.step_index)]
        self.static_images, self.static_labels = images.clone(), labels.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up()
        torch.cuda.current_stream().wait_stream(stream)
        self._zero_grads()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body(self.static_images, self.static_labels)
        with torch.no_grad():
            self.model.load_state_dict(saved)
            for buf, value in zip(self.buffers, saved_buffers):
                buf.copy_(value)
            for tensor, value in zip((self.loss_sum, self.correct, self.first_bad, self.step_index), counters):
                tensor.copy_(value)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float, reg_lambda: float) -> bool:
        """One step; False when the batch was skipped for a non-finite loss (skip_nonfinite only)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.lr.fill_(lr)
        self.reg_lambda.fill_(reg_lambda)
        return self._run(images, labels)

    def _run(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """The step body: eager, or a replay of its CUDA graph (captured on the first call)."""
        if not self.use_graph:
            self._zero_grads()
            return self._body(images, labels)
        if self.graph is None:
            self._capture(images, labels)
        self.static_images.copy_(images)
        self.static_labels.copy_(labels)
        self.graph.replay()
        return True

    COUNTERS = ("loss_sum", "correct", "first_bad", "step_index")

    def running_loss_sum(self) -> float:
        """The loss summed over this epoch's images so far, without resetting it (one host sync). Under
        torchrun: this rank's sum times the number of ranks, an estimate that needs no collective (progress
        lines must not make the ranks wait for each other)."""
        return float(self.loss_sum) * self.dist.world_size

    def _global_sums(self) -> Dict[str, torch.Tensor]:
        """The counters summed over the ranks (first bad step: the earliest on any rank); as is for one process."""
        if not self.dist.enabled:
            return {name: getattr(self, name) for name in self.COUNTERS}
        summed = self.dist.sum_tensor(torch.stack([self.loss_sum.double(), self.correct.double()]))
        never = torch.iinfo(torch.long).max
        bad = self.dist.min_tensor(torch.where(self.first_bad < 0, never, self.first_bad).reshape(1))[0]
        return {"loss_sum": summed[0].to(self.loss_sum.dtype), "correct": summed[1].round().long(),
                "first_bad": torch.where(bad == never, -1, bad), "step_index": self.step_index}

    def counters_state(self) -> dict:
        """The epoch's running sums (loss sum, correct count, first bad step, steps) as CPU tensors, for a
        mid-epoch checkpoint; `load_counters` puts them back bit-exactly. Under torchrun every rank must call
        it (the sums are those of all ranks)."""
        return {name: value.detach().cpu().clone() for name, value in self._global_sums().items()}

    @torch.no_grad()
    def load_counters(self, state: dict) -> None:
        """Saved sums back in place; under torchrun rank 0 holds the sums of all ranks, the others start at 0."""
        for name in self.COUNTERS:
            getattr(self, name).copy_(state[name])
        if self.dist.rank > 0:
            self.loss_sum.zero_()
            self.correct.zero_()

    def read_epoch(self):
        """(loss sum, correct count, first bad step or None) since the last read, over all ranks; one host sync."""
        sums = self._global_sums()
        loss_sum, correct, bad = float(sums["loss_sum"]), int(sums["correct"]), int(sums["first_bad"])
        for tensor in (self.loss_sum, self.correct, self.step_index):
            tensor.zero_()
        self.first_bad.fill_(-1)
        return loss_sum, correct, None if bad < 0 else bad

