"""Image-encoder throughput and per-block token counts, measured with forward hooks.

Used to put baseline and anchor-pruned runs (SPEC section 4) side by side. Hooks
sit on the encoder and on the block modules (the pruning pre-hooks are
prepended, so these see the shortened sequence), so the counts are the tokens
each block really processed, pruned or not. `eval_only` times only forward
passes in eval mode (inference throughput inside a training run).
`close()` removes every hook.

Each encoder call is timed on its own (synchronised on CUDA, so data loading is
never counted). The summary separates three kinds of calls, because at batch
256 a ViT-B/16 forward takes tens of milliseconds while the first call of a run
(library handles, cuDNN / cuBLAS heuristics) and a CUDA-graph capture of the
scoring take hundreds:

- warm-up: the first `warmup_batches` calls, and any call during which the
  pruning handle captured a scoring graph (`PruningHandle.captures()`);
- partial: calls with fewer images than the largest batch seen (the last batch
  of each data-loader worker);
- steady state: every other call. `images_per_s` is steady-state throughput
  (all calls when there are no steady ones); `overall_images_per_s` counts
  every call, warm-up included.
"""
import time
from typing import List, Optional, Tuple

import torch

from tokens.backends import Target


class _TokenCounter:
    """Forward pre-hook of one block: records the tokens it receives (a class, not a closure: picklable)."""

    def __init__(self, stats: "EncoderStats", index: int, axis: int):
        self.stats, self.index, self.axis = stats, index, axis

    def __call__(self, module, args):
        self.stats.tokens[self.index] = int(args[0].shape[self.axis])


class EncoderStats:
    def __init__(self, target: Target, eval_only: bool = False, warmup_batches: int = 2, handle=None):
        """handle: the PruningHandle of the same model, so calls that captured a scoring graph count as warm-up."""
        self.target, self.eval_only, self.warmup_batches, self.handle = target, eval_only, warmup_batches, handle
        self.images = 0
        self.seconds = 0.0
        self.calls: List[Tuple[int, float, bool]] = []  # (images, seconds, warm-up) per timed encoder call
        self.tokens: List[Optional[int]] = [None] * len(target.blocks)
        self._start: Optional[float] = None
        self._captures = 0
        self._hooks = [target.encoder.register_forward_pre_hook(self._begin),
                       target.encoder.register_forward_hook(self._end)]
        token_axis = 0 if target.sequence_first else 1
        for index, block in enumerate(list(target.blocks)):
            self._hooks.append(block.register_forward_pre_hook(_TokenCounter(self, index, token_axis)))

    @staticmethod
    def _sync(tensor: torch.Tensor) -> None:
        # CUDA kernels run asynchronously; without a sync the clock would stop before the work does.
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)

    def _capture_count(self) -> int:
        return self.handle.captures() if self.handle is not None and not self.handle.restored else 0

    def _begin(self, module, args):
        if self.eval_only and module.training:
            self._start = None
            return
        self._sync(args[0])
        self._captures = self._capture_count()
        self._start = time.perf_counter()

    def _end(self, module, args, output):
        if self._start is None:
            return
        self._sync(args[0])
        seconds = time.perf_counter() - self._start
        images = int(args[0].shape[0])
        warm = len(self.calls) < self.warmup_batches or self._capture_count() != self._captures
        self.calls.append((images, seconds, warm))
        self.seconds += seconds
        self.images += images

    def split(self) -> dict:
        """{"warmup" | "partial" | "steady": (calls, images, seconds)} as described in the module docstring."""
        full = max((images for images, _, _ in self.calls), default=0)
        parts = {"warmup": [0, 0, 0.0], "partial": [0, 0, 0.0], "steady": [0, 0, 0.0]}
        for images, seconds, warm in self.calls:
            part = parts["warmup" if warm else "partial" if images < full else "steady"]
            part[0], part[1], part[2] = part[0] + 1, part[1] + images, part[2] + seconds
        return {name: tuple(values) for name, values in parts.items()}

    def summary(self) -> dict:
        counts = [c for c in self.tokens if c is not None]
        full = self.target.num_tokens or (counts[0] if counts else None)
        mean = sum(counts) / len(counts) if counts else None
        parts = self.split()
        _, steady_images, steady_seconds = parts["steady"]
        overall = round(self.images / self.seconds, 2) if self.seconds else None
        steady = round(steady_images / steady_seconds, 2) if steady_seconds else overall
        out = {"images": self.images, "encoder_seconds": round(self.seconds, 4),
               "images_per_s": steady, "overall_images_per_s": overall,
               "num_tokens": full, "tokens_per_block": counts,
               "mean_tokens_per_block": round(mean, 2) if mean is not None else None,
               "token_ratio": round(mean / full, 4) if mean and full else None}
        for name, (calls, images, seconds) in parts.items():
            out[f"{name}_batches"], out[f"{name}_images"], out[f"{name}_seconds"] = calls, images, round(seconds, 4)
        return out

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
