"""Replay the anchor scoring of a pruning block from a CUDA graph, one graph per input signature.

Scoring (tokens/anchor.py select_with on the block's own projections) is some forty small
kernels. Run eagerly, each costs a Python dispatch and a launch; at batch 1, or whenever the GPU
queue runs dry, that launch time is the scoring's real cost. Captured once per input shape and
replayed, it is three launches: copy the tokens in, replay, copy the selection out.

Only inference forwards use it (tokens/patching.py scores eagerly wherever autograd records the
forward, i.e. in training). The graph reads the block's weights at the addresses it was captured
with: updates in place (an optimizer step, `load_state_dict`) are seen by the next replay; a
weight that moves (`.to()`, a replaced `.data`) changes the signature and is captured anew. Where
capture is not possible (CPU tensors, torch.compile tracing the forward, a forward that is itself
being captured into an outer CUDA graph) or fails, the scoring runs eagerly: the selection is the
same either way. A batch smaller than one already captured (the last, partial batch of an
evaluation) is scored eagerly rather than captured: a capture costs several eager scorings.
Copies and pickles of a model (deepcopy, torch.save) carry an empty cache.
"""
import warnings
from collections import OrderedDict
from typing import Callable, Sequence, Tuple, TypeVar

import torch

from tokens.anchor import Selection

Score = Callable[[torch.Tensor], Selection]
T = TypeVar("T")


class ScoringGraphs:
    """Per-hook cache of captured scorings, keyed by everything a replay depends on."""

    def __init__(self, max_graphs: int = 4):
        self.max_graphs = max_graphs
        self.graphs: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.disabled = False
        self.captures = 0  # graphs captured so far (timing leaves the batches that captured out of steady state)

    def __getstate__(self) -> dict:
        """Captured graphs hold device memory and cannot be copied: a deepcopy or a saved model starts empty."""
        return {"max_graphs": self.max_graphs, "graphs": OrderedDict(), "disabled": False, "captures": 0}

    def __call__(self, tokens: torch.Tensor, score: Score, weights: Sequence[torch.Tensor]) -> Selection:
        if not self.usable(tokens):
            return score(tokens)
        rest = (tokens.dtype, tokens.device, torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"),
                torch.get_autocast_dtype("cuda"), tuple(w.data_ptr() for w in weights))
        key = (tuple(tokens.shape), *rest)
        entry = self.graphs.get(key)
        if entry is None and self._smaller_than_captured(tokens.shape, rest):
            return score(tokens)  # a last partial batch: one eager scoring costs less than a capture
        if entry is None:
            try:
                with torch.cuda.device(tokens.device):  # the graph and its streams live on the tokens' GPU
                    entry = self._capture(tokens, score)
            except RuntimeError as exc:
                self.disabled = True
                warnings.warn(f"anchor scoring runs eagerly: CUDA graph capture failed ({str(exc).splitlines()[0]})")
                return score(tokens)
            self.graphs[key] = entry
            self.captures += 1
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        static_tokens, graph, out = entry
        static_tokens.copy_(tokens)
        graph.replay()  # on the device it was captured on
        # copies: the next replay overwrites the graph's outputs, and callers keep the selection
        return Selection(out.keep.clone(), out.anchors.clone(), out.cls_attention.clone())

    def _smaller_than_captured(self, shape: torch.Size, rest: tuple) -> bool:
        """A graph exists for a larger batch of the same tokens per image, dtype, mode and weights."""
        return any(key[1:] == rest and key[0][1:] == tuple(shape[1:]) and key[0][0] > shape[0] for key in self.graphs)

    def usable(self, tokens: torch.Tensor) -> bool:
        """CUDA tokens, not while torch.compile traces the forward, not inside an outer graph capture."""
        return (not self.disabled and tokens.is_cuda and not torch.compiler.is_compiling()
                and not torch.cuda.is_current_stream_capturing())

    @staticmethod
    def _capture(tokens: torch.Tensor, score: Score) -> tuple:
        static_tokens = tokens.detach().clone()
        graph, out = capture(lambda: score(static_tokens), tokens.device)
        return static_tokens, graph, out


def capture(fn: Callable[[], T], device: torch.device, warmup: int = 1) -> Tuple[torch.cuda.CUDAGraph, T]:
    """Run fn() `warmup` times on a side stream (library handles, workspaces), then capture it once;
    returns the graph and the captured call's output, whose tensors each replay refills."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
