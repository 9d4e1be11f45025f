"""Measured latency of a callable: CUDA events on a GPU, `time.perf_counter` on the CPU, warm-up excluded.

Shared by the VLM cost report (vlm/cost.py) and the token-pruning speed benchmark (benchmarks/token_speed.py).
"""
import statistics
import time
from typing import Any, Callable, List, Optional, Tuple

import torch


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 2, iters: int = 5) -> List[float]:
    """Milliseconds of each of `iters` calls of `fn()` after `warmup` untimed calls, under `no_grad`.

    On CUDA each call is bracketed by CUDA events (kernels run asynchronously, so host clocks would time the
    launch, not the work); on the CPU by `time.perf_counter`. Raises ValueError for iters < 1 or warmup < 0.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters} warmup={warmup}")
    device = torch.device(device)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(iters):
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
    return times


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median of `time_ms` (robust to one slow call, e.g. an allocator growth)."""
    return float(statistics.median(time_ms(fn, device, warmup, iters)))


def steps_in_budget(minutes: float, elapsed_s: float, per_step_s: float, done: int, max_steps: int,
                    share: float = 0.85) -> int:
    """Total optimizer steps of a run that fit into `share` of a `minutes` budget: the `done` steps so far (taking
    `elapsed_s` seconds) plus as many more of `per_step_s` seconds as the rest allows; at least `done`, at most
    `max_steps`. The rest of the budget (1 - share) is left for evaluation and saving."""
    left = minutes * 60 * share - elapsed_s
    return max(done, min(max_steps, int(left / per_step_s) + done))


class StepBudget:
    """Fits a training loop into a time budget: call `after(step)` after each optimizer step (1-based count).
    Steps 11-50 are timed (the device synchronised at both ends, so GPU work is timed, not its queueing); after
    step 50 `after` returns (seconds per step, total steps that fit: `steps_in_budget` over the time since
    construction), else None. `minutes` None: never returns a total (the loop runs its own step count)."""

    def __init__(self, minutes: Optional[float], max_steps: int, device: torch.device):
        self.minutes, self.max_steps, self.device = minutes, max_steps, torch.device(device)
        self.start, self.timer = time.time(), None

    def after(self, step: int) -> Optional[Tuple[float, int]]:
        if step in (10, 50) and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if step == 10:
            self.timer = time.time()
        if step != 50 or self.minutes is None:
            return None
        per_step = (time.time() - self.timer) / 40
        return per_step, steps_in_budget(self.minutes, time.time() - self.start, per_step, 50, self.max_steps)
