"""Measured latency of a callable: CUDA events on a GPU, `time.perf_counter` on the CPU, warm-up excluded.

Shared by the VLM cost report (vlm/cost.py) and the token-pruning speed benchmark (benchmarks/token_speed.py).
"""
import statistics
import time
from typing import Any, Callable, List

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
