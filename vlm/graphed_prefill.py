"""The pruned LLaVA prefill recorded once in a CUDA graph and replayed (issue 11 item 9, batch 1).

With at most a few hundred tokens per layer a 7B decoder layer takes less GPU time than the Python of Hugging
Face's decoder layer plus the pruning hook takes to launch its kernels, so an eager pruned prefill at batch 1
is host-bound (slower than the unpruned one). When the keep counts are fixed (a `StaticPlan`: M merge
centres, a decider with `static_keep_count`), `static_prefill` runs with static shapes and no host sync; here
it is captured once — vision tower, projector, merger, pruner heads, decoder with hard drops, the last
position's logits and the KV cache — and each call copies the new batch into the captured inputs and replays:
one launch instead of thousands. The capture follows tokens/graphed.py (warm-up on a side stream, then
`torch.cuda.graph`); the cache is Hugging Face's DynamicCache, built inside the graph (its tensors are the
graph's outputs). With merger = decider = None it is the unpruned model's prefill (through the same hooks,
SDPA causal without a mask), so the origin can be captured too for a fair comparison.
"""
from __future__ import annotations

import copy
from typing import Tuple

import torch

from tokens.graphed import capture as capture_graph
from vlm.pruned_forward import _attention, _check, static_prefill
from vlm.static_plan import static_plan

INPUTS = ("input_ids", "attention_mask", "pixel_values")
OPTIONAL_INPUTS = ("labels",)  # read by the prefill when present: answer positions are not question tokens


def _cache_view(cache):
    """A new cache object holding the same tensors (per-layer shallow copies): decoding with it rebinds its own
    layers' tensors and leaves the graph's outputs, and the object the next call returns, alone."""
    if cache is None:
        return None
    view = copy.copy(cache)
    if hasattr(view, "layers"):
        view.layers = [copy.copy(layer) for layer in cache.layers]
    return view


class GraphedPrefill:
    """A hard-mode prefill of fixed shapes (batch size B, sequence length S, padded or not, keep counts),
    captured from an example `batch` (dict of input_ids long [B, S], attention_mask [B, S], pixel_values
    [B, 3, H, W] and optionally labels long [B, S] (-100 off the answer: they take the answer positions out of
    the question mask, as in pruned_forward), all on one CUDA device) with `merger` and `decider` (None / None:
    the unpruned prefill).

    `__call__(batch) -> (logits [B, V] of the last position, cache)`: the batch must have the example's
    shapes, dtypes and device, labels exactly when the example had them, N image placeholders per sample and
    no padding unless the example had some (checked with one host sync before the replay). The returned
    logits are a copy; the cache's key/value tensors are the graph's outputs: the next call overwrites them
    (clone them to keep them).
    The graph reads the weights where they were at capture: in-place updates are seen, moved weights are not.
    `vision_tokens_per_layer` (L floats) and `plan` describe the captured shapes; `warmup`: eager runs on a
    side stream before the capture. capture=False: no graph, each call runs the same static prefill eagerly
    (on any device: the CPU smoke run, or the uncaptured reference).

    Raises ValueError (one line naming the cause) for a batch not on a CUDA device or attention other than
    sdpa (capture=True), model weights on another device, an attention implementation the hooks cannot mask
    (not sdpa / eager), a
    decider whose keep counts depend on the data (no `static_keep_count`, e.g. LayerSpecificPruner without
    pruner_keep_ratio), or a batch without N image placeholders per sample; `__call__` for a batch it cannot
    replay (see `check`)."""

    def __init__(self, model, batch: dict, merger=None, decider=None, temperature: float = 1.0, warmup: int = 2,
                 capture: bool = True):
        missing = [key for key in INPUTS if key not in batch]
        if missing:
            raise ValueError(f"batch: GraphedPrefill needs {list(INPUTS)}, missing {missing}")
        device = batch["input_ids"].device
        if capture and _attention(model) != "sdpa":
            raise ValueError(f"GraphedPrefill captures sdpa attention only, the model has "
                             f"attn_implementation={_attention(model)!r}: Hugging Face builds the eager causal mask "
                             f"with a host-to-device copy, which a CUDA graph cannot record (capture=False runs it)")
        if capture and device.type != "cuda":
            raise ValueError(f"GraphedPrefill captures CUDA graphs: the batch is on {device} (use pruned_forward "
                             f"with static_keep=True on the CPU)")
        weights = {p.device for p in model.parameters()}
        if weights != {device}:
            raise ValueError(f"GraphedPrefill: the model's weights are on {sorted(map(str, weights))}, the batch on "
                             f"{device}")
        _check(model, "hard", decider)
        self.model, self.merger, self.decider, self.temperature = model, merger, decider, temperature
        self.plan = static_plan(model, batch, decider, merger)
        # everything the prefill reads from a batch is a captured input (labels too: they take the answer
        # positions out of the question mask), so replay and the uncaptured call see the same batch
        keys = INPUTS + tuple(key for key in OPTIONAL_INPUTS if batch.get(key) is not None)
        self.inputs = {key: batch[key].detach().clone() for key in keys}
        self.graph = self.logits = self.cache = None
        if capture:
            with torch.no_grad(), torch.cuda.device(device):
                self.graph, output = capture_graph(self._prefill, device, warmup)
            self.logits = output.logits[:, -1]
            self.cache = output.past_key_values

    @property
    def vision_tokens_per_layer(self):
        return self.plan.tokens_per_layer()

    def _prefill(self, batch=None):
        return static_prefill(self.model, self.inputs if batch is None else batch, self.plan, self.decider,
                              self.merger, self.temperature, use_cache=True, last_only=True)

    def check(self, batch: dict) -> None:
        """ValueError naming the input when `batch` cannot be replayed in this graph (shape, dtype, device,
        placeholders, padding that the captured prefill does not mask)."""
        extra = [key for key in OPTIONAL_INPUTS if key not in self.inputs and batch.get(key) is not None]
        if extra:
            raise ValueError(f"{extra[0]}: the graph was captured from a batch without {extra[0]} (they change the "
                             f"question mask): capture with them or leave them out")
        for key, static in self.inputs.items():
            value = batch.get(key)
            if not isinstance(value, torch.Tensor) or (value.shape, value.dtype, value.device) != (
                    static.shape, static.dtype, static.device):
                got = None if not isinstance(value, torch.Tensor) else (tuple(value.shape), value.dtype, value.device)
                want = (tuple(static.shape), static.dtype, static.device)
                raise ValueError(f"{key}: the graph was captured for {want}, got {got}")
        plan = static_plan(self.model, batch, self.decider, self.merger)
        if plan.masked and not self.plan.masked:
            raise ValueError("attention_mask: the batch is padded but the captured one was not (its layers run "
                             "without a mask): capture with a padded batch")

    def __call__(self, batch: dict) -> Tuple[torch.Tensor, object]:
        self.check(batch)
        if self.graph is None:
            with torch.no_grad():
                output = self._prefill({key: batch[key] for key in self.inputs})
            return output.logits[:, -1], output.past_key_values
        for key, static in self.inputs.items():
            static.copy_(batch[key])
        self.graph.replay()
        return self.logits.clone(), _cache_view(self.cache)
