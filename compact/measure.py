"""What a model costs: parameters, latency at batch 1 and throughput at a large batch.

FLOPs per image are utils.flops.flops_per_image's (torch.utils.flop_counter, a multiply-add is 2 FLOPs, run
with timm's `fused_attn` off so the attention matmuls count on the CPU as on CUDA), the one counter the
export and every round record use.
Timing: utils.timing.time_ms (CUDA events on a GPU, perf_counter on the CPU), warm-up excluded;
we report the median and the 25th / 75th percentiles of the runs.
"""
import copy
import statistics
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from utils.timing import time_ms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def spread(values: List[float]) -> Dict[str, float]:
    """{"median", "p25", "p75"} of `values` (inclusive quartiles; a single value gives all three)."""
    if len(values) == 1:
        return {"median": values[0], "p25": values[0], "p75": values[0]}
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": q2, "p25": q1, "p75": q3}


def timed_model(model: nn.Module, device: torch.device, dtype: torch.dtype, compile_model: bool) -> nn.Module:
    """An eval-mode copy of `model` on `device` in `dtype` (torch.compile'd when asked)."""
    runner = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    return torch.compile(runner) if compile_model else runner


def time_variant(model: nn.Module, input_shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype,
                 runs: int, batch: int) -> Dict[str, Dict[str, float]]:
    """{"latency_ms_b1": spread of ms per batch-1 forward, "throughput_img_s_b<batch>": spread of images/s
    per batch-`batch` forward}, `runs` timed calls each after max(3, runs // 10) warm-up calls."""
    warmup = max(3, runs // 10)
    out = {}
    for size in (1, batch):
        images = torch.randn((size, *input_shape), device=device, dtype=dtype)
        times = time_ms(lambda: model(images), device, warmup=warmup, iters=runs)
        if size == 1:
            out["latency_ms_b1"] = spread(times)
        if size == batch:
            out[f"throughput_img_s_b{batch}"] = spread([size * 1000.0 / t for t in times])
    return out


def format_table(variants: Dict[str, dict], batch: int) -> str:
    """One row per variant: parameters, MFLOPs/image, batch-1 latency and batch throughput (median [p25, p75])."""
    key = f"throughput_img_s_b{batch}"
    lines = [f"{'variant':<8} {'params':>11} {'MFLOPs/img':>11} {'latency b1 ms (p25-p75)':>26} "
             f"{f'img/s b{batch} (p25-p75)':>28}"]
    for name, v in variants.items():
        lat, thr = v.get("latency_ms_b1"), v.get(key)
        lat_text = f"{lat['median']:.3f} ({lat['p25']:.3f}-{lat['p75']:.3f})" if lat else "-"
        thr_text = f"{thr['median']:,.0f} ({thr['p25']:,.0f}-{thr['p75']:,.0f})" if thr else "-"
        lines.append(f"{name:<8} {v['params']:>11,} {v['flops_per_image'] / 1e6:>11.3f} {lat_text:>26} {thr_text:>28}")
    return "\n".join(lines)
