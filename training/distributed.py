"""One run in several processes: `torchrun --nproc_per_node N main_imp_fillback.py <flags>` (data parallelism).

Started by torchrun (WORLD_SIZE > 1 in the environment), every process (rank) holds the whole model,
trains on its slice of each global batch and averages the gradients with the others, as
DistributedDataParallel does (Li et al. 2020, "PyTorch Distributed", VLDB; docs/ddp.md):

- gradients: one all-reduce (sum, then / N) of a flat buffer inside TrainStep's body, between the
  backward and the masked SGD update, instead of wrapping the model in DistributedDataParallel: the
  step is our own capturable SGD, the model keeps its state_dict keys (checkpoints load in 1-process
  runs and back), and on CUDA the NCCL all-reduce is captured in the step's CUDA graph.
- BatchNorm: SyncBatchNorm on CUDA (statistics of the global batch, as one process has); torch's
  SyncBatchNorm refuses CPU tensors, so on the CPU (gloo) each rank normalises with its own batch
  and rank 0's running statistics are broadcast after every epoch.
- agreement: rank 0's masks are broadcast and every rank's masks and weights compared at each round's
  start, start / stop positions compared, SIGTERM / SIGINT agreed at step boundaries so every rank stops
  after the same step (training/rank_agreement.py; a difference stops the run, `RankMismatch`, exit 3).
- files: rank 0 alone takes the run lock and writes checkpoints, lineage, metrics, log, config and
  wandb; the other ranks read (resume) and write nothing.

Without torchrun `SINGLE` stands in: every method is a no-op and the 1-process path is unchanged.
"""
import contextlib
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from training import rank_agreement
from training.rank_agreement import AgreedStopRequest
from utils.errors import UsageError
from utils.interrupts import StopRequest
from utils.lock import RunLock


class Distributed:
    """Rank, world size and the collectives a run needs. `SINGLE` (world size 1) does nothing."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, cpu_group=None,
                 local_group=None, sync_batchnorm: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.cpu_group = cpu_group  # gloo: control messages (stop flag, checksums) without a device sync
        self.local_group = local_group  # this rank alone: BatchNorm statistics that must not be synchronised
        self.sync_batchnorm = sync_batchnorm

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes every file of the run dir; the other ranks write none."""
        return self.rank == 0

    # ---- setup --------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """BatchNorm -> SyncBatchNorm (timm's converter keeps its BatchNormAct layers) when running on CUDA."""
        if not self.sync_batchnorm:
            return model
        from timm.layers import convert_sync_batchnorm
        return convert_sync_batchnorm(model)

    @contextlib.contextmanager
    def unsynced_batchnorm(self, model: nn.Module):
        """SyncBatchNorm layers normalise with this rank's batch only, inside the block: for the calibration
        batches every rank sees in full (BatchNorm recalibration), which a synchronisation would count N times."""
        layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)] if self.sync_batchnorm else []
        saved = [m.process_group for m in layers]
        for m in layers:
            m.process_group = self.local_group
        try:
            yield
        finally:
            for m, group in zip(layers, saved):
                m.process_group = group

    # ---- collectives (no-ops for one process) --------------------------------------------------
    def average_gradients(self, grads: List[torch.Tensor]) -> None:
        """Replace each rank's gradients by their mean over the ranks: one all-reduce of one flat buffer
        (capturable in a CUDA graph with NCCL). Each rank's loss is the mean over its batch_size / N images,
        so the mean gradient is that of the global batch."""
        if not self.enabled or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]),
                                                                         grads)])

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks (in place; returned)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def min_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`'s element-wise minimum over the ranks (in place; returned)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def all_true(self, flag: bool) -> bool:
        """True when `flag` holds on every rank (one small CPU all-reduce)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return bool(value)

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order; [value] for one process."""
        if not self.enabled:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.cpu_group)
        return out

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Rank 0's values into every rank's `tensors`, in place."""
        if not self.enabled:
            return
        for tensor in tensors:
            if tensor.dtype == torch.bool:  # not every backend reduces or sends bool
                carrier = tensor.to(torch.uint8)
                dist.broadcast(carrier, 0)
                tensor.copy_(carrier.bool())
            else:
                dist.broadcast(tensor, 0)

    @torch.no_grad()
    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's floating buffers (BatchNorm running statistics) on every rank: without SyncBatchNorm each
        rank tracked its own batches. Called after every epoch, so evaluation and checkpoints agree."""
        if self.enabled and not self.sync_batchnorm:
            self.broadcast_tensors([b for b in model.buffers() if b.is_floating_point()])

    def check_same(self, what: str, value, log: Optional[Callable[[str], None]] = None) -> list:
        """rank_agreement.check_same on this group: every rank's `value`, RankMismatch when they differ."""
        return rank_agreement.check_same(self, what, value, log)

    def on_rank_zero(self, work: Callable[[], object]):
        """work() on rank 0 only, its UsageError shared: every rank raises it (one line each) instead of the
        others waiting for a rank that stopped. Returns rank 0's result there, None on the others."""
        result, error = None, None
        if self.is_writer:
            try:
                result = work()
            except UsageError as exc:
                if not self.enabled:
                    raise
                error = exc
        errors = self.gather(None if error is None else str(error))
        if error is not None:
            raise error
        if errors[0] is not None:
            raise UsageError(errors[0])
        return result

    def rank_zero_first(self, work: Callable[[], object]):
        """work() on rank 0, then on the others: a download or cache fill into a shared folder happens once."""
        result = self.on_rank_zero(work)
        return result if self.is_writer else work()

    # ---- rounds -------------------------------------------------------------------------------
    def agree_on_round(self, round_index: int, plan, weights: Dict[str, torch.Tensor], model: nn.Module,
                       log: Callable[[str], None]) -> None:
        """rank_agreement.agree_on_round on this group: rank 0's masks everywhere, checksums compared."""
        rank_agreement.agree_on_round(self, round_index, plan, weights, model, log)

    def stop_request(self, log: Callable[[str], None] = print) -> StopRequest:
        return AgreedStopRequest(self, log) if self.enabled else StopRequest(log=log)

    def agree_on_signal(self, local: Optional[int]) -> Optional[int]:
        """The largest signal number any rank received (None: none did)."""
        value = torch.tensor([local or 0], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(value) or None


SINGLE = Distributed()


# ---- process group lifetime ---------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} in the environment: expected an integer (set by torchrun)") from None


def _uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def check_config(config, world_size: int, local_rank: int) -> None:
    """UsageError (one line naming the flag) for settings a run of `world_size` ranks cannot honour."""
    if config.batch_size % world_size:
        raise UsageError(f"--batch_size {config.batch_size}: not divisible by the {world_size} torchrun processes; "
                         f"--batch_size is the global batch, each rank trains on batch_size / {world_size} images")
    if config.device.startswith("cuda:"):
        raise UsageError(f"--device {config.device}: under torchrun each rank uses cuda:<LOCAL_RANK>; "
                         f"pass --device cuda or auto")
    if _uses_cuda(config.device):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {config.device}: CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"torchrun local rank {local_rank}: this node has {torch.cuda.device_count()} "
                             f"CUDA device(s); start at most that many processes per node (or --device cpu)")


def rank_device(config_device: str, group: Distributed, resolve: Callable[[str], torch.device]) -> torch.device:
    """The device of this rank: `resolve(name)` for one process, cuda:<LOCAL_RANK> or the CPU under torchrun."""
    if not group.enabled:
        return resolve(config_device)
    return torch.device(f"cuda:{group.local_rank}") if _uses_cuda(config_device) else torch.device("cpu")


@contextlib.contextmanager
def process_group(config):
    """`SINGLE` without torchrun; under it, the default process group (NCCL on CUDA, gloo on the CPU), a gloo
    group for control messages and one group per rank, torn down on exit. Bad settings: UsageError first."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        yield SINGLE
        return
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    check_config(config, world_size, local_rank)
    cuda = _uses_cuda(config.device)
    if cuda:
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device(f"cuda:{local_rank}"))
        cpu_group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
        cpu_group = dist.group.WORLD
    # one group per rank, for BatchNorm layers that must not synchronise (every rank creates every group, in order)
    singles = [dist.new_group([r]) for r in range(world_size)] if cuda else [None] * world_size
    try:
        yield Distributed(rank, world_size, local_rank, cpu_group, singles[rank], sync_batchnorm=cuda)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def writer_lock(group: Distributed, directory: str):
    """The run dir's RunLock, held by rank 0 alone (the only writer); a refusal is shared, so every rank stops
    with rank 0's one line instead of waiting for it."""
    lock = group.on_rank_zero(RunLock(directory).acquire)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
