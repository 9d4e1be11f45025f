"""N TrainSteps as one: the masked SGD of training/step.py on a FusedModel's cell-major tensors.

The loss is the SUM over cells of each cell's mean cross-entropy: cell i's weights reach only its
own term, so each cell's gradient is exactly the gradient of its separate run (a mean over cells
would divide every cell's gradient by N). Per cell: learning rate, RSST lambda, weight decay, masks
and penalty masks; momentum is shared. Per-cell scalars live in device tensors of shape [N] and
are applied through [N, 1] views of the [N, numel / N] flat views of every fused tensor, so the
body has no host sync and one captured CUDA graph serves every step (TrainStep's capture and
warm-up are reused). On the CPU it runs eagerly.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from pruners.base import RoundPlan
from training.fused.models import FusedModel, copy_tensors
from training.step import TrainStep, autocast


def memory_order(tensor: torch.Tensor) -> List[int]:
    """tensor's dims from outermost to innermost in memory (by stride; ties keep dim order): [0, 1, 2, 3] for a
    contiguous 4-D tensor, [0, 2, 3, 1] for a channels_last one."""
    return sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))


def cell_rows(tensor: torch.Tensor, cells: int, order: Sequence[int]) -> torch.Tensor:
    """[cells, numel / cells] view of `tensor` (cells along dim 0) with its dims taken in `order`, the memory
    order of the parameter it belongs with: the parameter, its gradient, momentum buffer and masks then share
    one element order per row (AccumulateGrad, zeros_like and ones_like keep the parameter's layout), so
    elementwise updates between rows line up whether the tensors are contiguous or channels_last. Raises
    RuntimeError (from view) when `tensor` is not dense in that order."""
    return tensor.permute(*order).view(cells, -1)


class FusedTrainStep(TrainStep):
    """One step of N cells: images [N, B, C, H, W], labels [N, B], lr / reg_lambda: N floats.

    `masked_names`: the cells' masked parameter names (e.g. the keys of `prunable_weights`), the
    same for every cell. `weight_decay`: N floats. Counters `loss_sum` (float [N]), `correct`
    (long [N]), `first_bad` (long [N], -1 = none) and `skipped` (long [N]) stay on the device.
    `skip_nonfinite` (--nan_policy skip_batch) skips, per cell, a step whose loss is not finite: that
    cell's weights and momentum stay as they were and its loss and accuracy are not counted, as
    TrainStep's skip does, while the other cells step; on the device, so the step stays one CUDA graph
    (cells are independent: one cell's NaN never reaches another's gradient). Not supported: torchrun
    (`dist`). Raises ValueError for a per-cell list whose length is not N or an unknown masked name.
    """

    def __init__(self, fused: FusedModel, masked_names: Sequence[str], device: torch.device, amp: str,
                 momentum: float, weight_decay: Sequence[float], regularized: bool, use_graph: bool,
                 compile_model: bool = False, skip_nonfinite: bool = False):
        super().__init__(fused, {}, device, amp, momentum, 0.0, regularized, use_graph,
                         compile_model=compile_model)
        self.skip_cells = skip_nonfinite  # TrainStep's own flag would turn the graph off: the skip here needs no sync
        cells = self.cells = fused.cells
        params = fused.fused_params
        unknown = [name for name in masked_names if name not in params]
        if unknown:
            raise ValueError(f"masked names not among the cells' trainable parameters: {', '.join(unknown[:5])}")
        self.cell_names = list(params)  # a cell's TrainStep buffer order
        self.params = [params[name][0] for name in self.cell_names]
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.index = {name: params[name][1] for name in self.cell_names}
        self.masked_names = list(masked_names)
        self.masked_params = [params[name][0] for name in self.masked_names]
        self.masks = [torch.ones_like(p) for p in self.masked_params]
        self.penalty_masks = [torch.zeros_like(p) for p in self.masked_params] if regularized else []
        self.lr = torch.zeros(cells, device=device)
        self.reg_lambda = torch.zeros(cells, device=device)
        self.weight_decay = self._per_cell(weight_decay, "weight_decay").to(device)
        self.loss_sum = torch.zeros(cells, device=device)
        self.correct = torch.zeros(cells, device=device, dtype=torch.long)
        self.first_bad = torch.full((cells,), -1, device=device, dtype=torch.long)
        self.skipped = torch.zeros(cells, device=device, dtype=torch.long)
        self.step_index = torch.zeros((), device=device, dtype=torch.long)
        # [N, numel/N] views: per-cell scalars broadcast over each cell's row. Made without autograd
        # history: a parameter view with a grad_fn would keep the parameter's AccumulateGrad node alive,
        # tied to the stream it was made on (the default one), and CUDA graph capture of the backward
        # then fails ("operation would make the legacy stream depend on a capturing blocking stream").
        self._orders = [memory_order(p) for p in self.params]
        self._masked_orders = [memory_order(p) for p in self.masked_params]
        with torch.no_grad():
            self._rows = [cell_rows(p, cells, o) for p, o in zip(self.params, self._orders)]
            self._buffer_rows = [cell_rows(b, cells, o) for b, o in zip(self.buffers, self._orders)]
            self._masked_rows = [cell_rows(p, cells, o) for p, o in zip(self.masked_params, self._masked_orders)]
            self._penalty_rows = [cell_rows(m, cells, o) for m, o in zip(self.penalty_masks, self._masked_orders)]

    def _per_cell(self, values: Sequence[float], what: str) -> torch.Tensor:
        values = list(values)
        if len(values) != self.cells:
            raise ValueError(f"{what}: {len(values)} values for {self.cells} cells")
        return torch.tensor(values, dtype=torch.float32)

    # ---- round and state management ------------------------------------------------------
    @torch.no_grad()
    def start_round(self, plans: Sequence[RoundPlan]) -> None:
        """Fresh momentum and each cell's masks (plans[i] for cell i), written in place."""
        if len(plans) != self.cells:
            raise ValueError(f"{len(plans)} round plans for {self.cells} cells")
        for buf in self.buffers:
            buf.zero_()
        for k, name in enumerate(self.masked_names):
            for i, plan in enumerate(plans):
                self.masks[k][self.index[name][i]].copy_(plan.train_masks[name])
                if self.penalty_masks:
                    target = self.penalty_masks[k][self.index[name][i]]
                    target.zero_() if plan.penalty_masks is None else target.copy_(plan.penalty_masks[name])

    COUNTERS = ("loss_sum", "correct", "first_bad")  # per cell; step_index is shared (cells step in lockstep)

    @torch.no_grad()
    def load_cell_steps(self, cell_steps: Sequence) -> None:
        """The cells' own TrainSteps (cell order) into the fused state as multi-tensor copies: masks, penalty
        masks, momentum buffers and running sums (step_index from cell 0). Raises ValueError for a count that is
        not N or a cell without one of the masked names."""
        targets, sources = self._cell_step_pairs(cell_steps, with_masks=True)
        copy_tensors(targets + [self.step_index], sources + [cell_steps[0].step_index])

    @torch.no_grad()
    def store_cell_steps(self, cell_steps: Sequence) -> None:
        """Momentum buffers, running sums and step_index back into the cells' TrainSteps (the masks do not change
        in a step), as multi-tensor copies; the inverse of `load_cell_steps`."""
        cell_side, fused_side = self._cell_step_pairs(cell_steps, with_masks=False)[::-1]
        copy_tensors(cell_side + [s.step_index for s in cell_steps], fused_side + [self.step_index] * len(cell_steps))

    def _cell_step_pairs(self, cell_steps: Sequence, with_masks: bool) -> Tuple[list, list]:
        """(fused views, the cells' tensors) of the momentum buffers (positional: both in the cells'
        `parameters()` order), the counters and, `with_masks`, the masks and penalty masks (by name)."""
        if len(cell_steps) != self.cells:
            raise ValueError(f"{len(cell_steps)} cell steps for {self.cells} cells")
        fused_side, cell_side = [], []
        for i, cell_step in enumerate(cell_steps):
            if len(cell_step.buffers) != len(self.buffers):
                raise ValueError(f"cell {i}: {len(cell_step.buffers)} momentum buffers, the fused step has "
                                 f"{len(self.buffers)} a cell")
            fused_side += [buf[self.index[name][i]] for name, buf in zip(self.cell_names, self.buffers)]
            cell_side += list(cell_step.buffers)
            fused_side += [getattr(self, name)[i] for name in self.COUNTERS]
            cell_side += [getattr(cell_step, name) for name in self.COUNTERS]
            if not with_masks:
                continue
            masks = dict(zip(cell_step.masked_names, cell_step.masks))
            penalties = dict(zip(cell_step.masked_names, cell_step.penalty_masks))
            missing = [name for name in self.masked_names if name not in masks]
            if missing:
                raise ValueError(f"cell {i}: no mask for {', '.join(missing[:5])}")
            for k, name in enumerate(self.masked_names):
                fused_side.append(self.masks[k][self.index[name][i]])
                cell_side.append(masks[name])
                if self.penalty_masks:  # a cell without penalty masks (not regularized) has all zeros
                    fused_side.append(self.penalty_masks[k][self.index[name][i]])
                    cell_side.append(penalties[name] if name in penalties else torch.zeros_like(masks[name]))
        return fused_side, cell_side

    def cell_state_dict(self, cell: int) -> dict:
        """Cell `cell`'s optimiser state in TrainStep.state_dict()'s form (loadable into its TrainStep)."""
        return {"momentum_buffers": [buf[self.index[name][cell]].detach().cpu().clone()
                                     for name, buf in zip(self.cell_names, self.buffers)]}

    @torch.no_grad()
    def penalized_norm(self) -> List[float]:
        """Per cell: the L2 norm of the penalised weights (0 without regularisation)."""
        if not self.penalty_masks:
            return [0.0] * self.cells
        squares = sum((cell_rows(p * m, self.cells, o) ** 2).sum(1)
                      for p, m, o in zip(self.masked_params, self.penalty_masks, self._masked_orders))
        return torch.sqrt(squares).tolist()

    # ---- the step ----------------------------------------------------------------------------
    def _body(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        cells, batch = labels.shape
        with autocast(self.device, self.amp):
            logits = self.forward(images)
            per_sample = F.cross_entropy(logits.reshape(cells * batch, -1), labels.reshape(-1), reduction="none")
            cell_loss = per_sample.view(cells, batch).mean(1)
        cell_loss.sum().backward()
        with torch.no_grad():
            finite = torch.isfinite(cell_loss.detach())
            grad_rows = [cell_rows(p.grad, cells, o) for p, o in zip(self.params, self._orders)]
            if self.skip_cells:  # a skipped cell's (NaN) gradients -> 0 before any is combined; others as they are
                for rows in grad_rows:
                    rows.copy_(torch.where(finite[:, None], rows, 0.0))
            masked_grads = [p.grad for p in self.masked_params]
            if masked_grads:
                torch._foreach_mul_(masked_grads, self.masks)
            if self.regularized and masked_grads:
                pulled = torch._foreach_mul(self._masked_rows, self._penalty_rows)
                torch._foreach_mul_(pulled, [self.reg_lambda[:, None]] * len(pulled))
                torch._foreach_add_([cell_rows(g, cells, o) for g, o in zip(masked_grads, self._masked_orders)],
                                    pulled)
            decay = torch._foreach_mul(self._rows, [self.weight_decay[:, None]] * len(grad_rows))
            torch._foreach_add_(grad_rows, decay)
            momentum, lr = self.momentum, self.lr
            if self.skip_cells:  # skipped cell: direction 0, momentum kept (factor 1), learning rate 0
                keep = finite.to(self.lr.dtype)
                torch._foreach_mul_(grad_rows, [keep[:, None]] * len(grad_rows))
                momentum = torch.where(finite, self.momentum, 1.0).to(self.lr.dtype)[:, None]
                lr = self.lr * keep
            torch._foreach_mul_(self._buffer_rows, [momentum] * len(grad_rows) if self.skip_cells else momentum)
            torch._foreach_add_(self._buffer_rows, grad_rows)
            steps = torch._foreach_mul(self._buffer_rows, [lr[:, None]] * len(grad_rows))
            torch._foreach_add_(self._rows, steps, alpha=-1.0)
            if self.masked_params:
                torch._foreach_mul_(self.masked_params, self.masks)
            loss_sum = cell_loss.detach().float() * batch
            correct = (logits.detach().argmax(-1) == labels).sum(1)
            if self.skip_cells:  # a skipped cell's batch counts neither loss nor accuracy
                self.skipped.add_((~finite).long())
                loss_sum, correct = torch.where(finite, loss_sum, 0.0), torch.where(finite, correct, 0)
            else:
                self.first_bad.copy_(torch.where((self.first_bad < 0) & ~finite, self.step_index, self.first_bad))
            self.step_index.add_(1)
            self.loss_sum.add_(loss_sum)
            self.correct.add_(correct)
        return True

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: Sequence[float],
                 reg_lambda: Sequence[float]) -> bool:
        """One step of every cell; lr and reg_lambda are N floats (copied to the device, no sync)."""
        self.lr.copy_(self._per_cell(lr, "lr"), non_blocking=True)
        self.reg_lambda.copy_(self._per_cell(reg_lambda, "reg_lambda"), non_blocking=True)
        return self._run(images, labels)

    def running_loss_sum(self) -> List[float]:
        """Per cell: the loss summed over this epoch's images so far (one host sync)."""
        return self.loss_sum.tolist()

    def read_epoch(self):
        """Per cell (lists of N): loss sums, correct counts, first bad step or None; then reset. One sync."""
        loss_sum, correct, bad = self.loss_sum.tolist(), self.correct.tolist(), self.first_bad.tolist()
        for tensor in (self.loss_sum, self.correct, self.step_index, self.skipped):
            tensor.zero_()
        self.first_bad.fill_(-1)
        return loss_sum, correct, [None if b < 0 else b for b in bad]
