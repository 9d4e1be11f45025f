"""What a forward costs: counted FLOPs, measured prefill latency and KV-cache bytes (issue 11 items 5 and 9).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the operations that really run (so a hard
pruned forward, which runs later layers on fewer tokens, counts fewer FLOPs; a soft one, which only masks
attention, counts as many as the plain model). Latency is measured, never modelled: CUDA events on a GPU,
`time.perf_counter` on the CPU, warm-up iterations excluded, median reported. KV-cache bytes are summed over
the tensors the cache actually holds after the prefill (layers that saw fewer tokens hold shorter caches).
The latency half lives in `utils.timing` (`median_ms`), shared with the other benchmarks.
"""
from typing import Any, Callable, List, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 per multiply-add) of the ops `fn()` dispatches, counted by FlopCounterMode under `no_grad`."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


def _cache_pairs(cache: Any) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer of a cache: a transformers Cache (`.layers[i].keys/.values`, transformers
    >= 4.56), the older `.key_cache/.value_cache` lists, or the legacy tuple of (key, value) per layer.
    Layers not yet filled are skipped. Raises TypeError for anything else."""
    if cache is None:
        return []
    if hasattr(cache, "layers"):
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache))
    elif isinstance(cache, (tuple, list)):
        pairs = [tuple(item[:2]) for item in cache]
    else:
        raise TypeError(f"unknown KV cache type {type(cache).__name__}")
    return [(k, v) for k, v in pairs if isinstance(k, torch.Tensor) and k.numel() > 0]


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of every key/value tensor in `cache` (numel x element size; 0 for None). Raises TypeError for an
    object that is not a known cache type."""
    return int(sum(t.numel() * t.element_size() for pair in _cache_pairs(cache) for t in pair))


def kv_cache_lengths(cache: Any) -> List[int]:
    """Sequence length (dim -2 of the keys [B, H, S, d]) each filled layer of the cache holds, in layer order."""
    return [int(k.shape[-2]) for k, _ in _cache_pairs(cache)]
