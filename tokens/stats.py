"""Image-encoder throughput and per-block token counts, measured with forward hooks.

Used to put baseline and anchor-pruned runs (SPEC section 4) side by side. Hooks
sit on the encoder and on the block modules (the pruning pre-hooks are
prepended, so these see the shortened sequence), so the counts are the tokens
each block really processed, pruned or not. `eval_only` times only forward
passes in eval mode (inference throughput inside a training run).
`close()` removes every hook.
"""
import time
from typing import List, Optional

import torch

from tokens.backends import Target


class EncoderStats:
    def __init__(self, target: Target, eval_only: bool = False):
        self.target, self.eval_only = target, eval_only
        self.images = 0
        self.seconds = 0.0
        self.tokens: List[Optional[int]] = [None] * len(target.blocks)
        self._start = None
        self._hooks = [target.encoder.register_forward_pre_hook(self._begin),
                       target.encoder.register_forward_hook(self._end)]
        token_axis = 0 if target.sequence_first else 1
        for index, block in enumerate(list(target.blocks)):
            self._hooks.append(block.register_forward_pre_hook(self._counter(index, token_axis)))

    def _counter(self, index: int, axis: int):
        def count(module, args):
            self.tokens[index] = int(args[0].shape[axis])
        return count

    @staticmethod
    def _sync(tensor: torch.Tensor) -> None:
        # CUDA kernels run asynchronously; without a sync the clock would stop before the work does.
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)

    def _begin(self, module, args):
        if self.eval_only and module.training:
            self._start = None
            return
        self._sync(args[0])
        self._start = time.perf_counter()

    def _end(self, module, args, output):
        if self._start is None:
            return
        self._sync(args[0])
        self.seconds += time.perf_counter() - self._start
        self.images += int(args[0].shape[0])

    def summary(self) -> dict:
        counts = [c for c in self.tokens if c is not None]
        full = self.target.num_tokens or (counts[0] if counts else None)
        mean = sum(counts) / len(counts) if counts else None
        return {"images": self.images, "encoder_seconds": round(self.seconds, 4),
                "images_per_s": round(self.images / self.seconds, 2) if self.seconds else None,
                "num_tokens": full, "tokens_per_block": counts,
                "mean_tokens_per_block": round(mean, 2) if mean is not None else None,
                "token_ratio": round(mean / full, 4) if mean and full else None}

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
