"""Schedules: the Gumbel temperature of the merger and the pruner heads (SPEC §5), and the learning-rate factor
of the tiny LLaVA's training stages."""
import math


def temperature_at(progress: float, start: float = 1.0, end: float = 0.1, anneal_rate: float = 0.5) -> float:
    """Gumbel temperature at `progress` (fraction of training done, in [0, 1]).

    Linear from `start` (config `temperature`) to `end` (`temperature_min`) over the first `anneal_rate`
    (`temperature_anneal_rate`) of training, then constant at `end`; anneal_rate = 0 means `end`
    throughout. Example: defaults give 1.0 at 0, 0.55 at 0.25, 0.1 from 0.5 on.
    Raises ValueError for progress outside [0, 1], anneal_rate outside [0, 1], or a non-positive
    start / end (a temperature divides logits).
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress={progress} must be in [0, 1]")
    if not 0.0 <= anneal_rate <= 1.0:
        raise ValueError(f"temperature_anneal_rate={anneal_rate} must be in [0, 1]")
    if start <= 0 or end <= 0:
        raise ValueError(f"temperature={start} and temperature_min={end} must be positive")
    if progress >= anneal_rate:
        return float(end)
    return float(start + (end - start) * progress / anneal_rate)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor of optimizer step `step` (0-based) of `total`: linear warmup over the first `warmup`
    steps (factor (step + 1) / warmup), times a cosine from 1 to 0 over `total` (0 from `total` on). The tiny
    LLaVA's VQA training (vlm/pretrain.py) and its vision pre-training (vlm/vision_pretrain.py)."""
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
