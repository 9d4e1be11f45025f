"""Forward-pre-hooks on the LLM decoder layers that give every layer its own attention mask, RoPE position
embeddings and (after a hard drop) shorter hidden states, and take the pruning decisions (issue 11 item 2).

transformers builds one causal mask for all layers (or None under SDPA) and one set of position embeddings;
after a layer drops tokens the later layers run on a shorter sequence, and under a KV cache each layer holds
a cache of its own length. So the hooks replace `attention_mask`, `position_embeddings` and `position_ids` of
every layer's call with the ones of that layer's sequence. `layer_hooks` attaches them and removes them all
on exit, also when the forward raises.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, List, Optional

import torch

from vlm.hard_drop import NEG_INF, attention_bias, gather_tokens, left_pack, scatter_to_tokens

TRAIN_LOG_EPS = 1e-6  # train mode's key bias is log(keep + eps): finite, with a gradient at keep = 0


class _Route:
    """The persistent pre-hooks of `routed_hooks`: each forwards to the hook `layer_hooks` set for this forward."""

    def __init__(self):
        self.hook: Optional[Callable] = None

    def __call__(self, index: int, module, args, kwargs):
        return (args, kwargs) if self.hook is None else self.hook(index, module, args, kwargs)


@contextmanager
def routed_hooks(language_model) -> Iterator[None]:
    """Attach persistent forward-pre-hooks to every decoder layer, for as long as the context lasts; inside it
    `layer_hooks` only points them at its hook instead of registering hooks. torch.compile cannot trace a hook
    registration (a graph break), so a compiled pruned forward runs inside this context. Removed on exit."""
    route = _Route()
    handles = [layer.register_forward_pre_hook(partial(route, index), with_kwargs=True)
               for index, layer in enumerate(language_model.layers)]
    language_model._pruning_route = route
    try:
        yield
    finally:
        del language_model._pruning_route
        for handle in handles:
            handle.remove()


@contextmanager
def layer_hooks(language_model, hook: Callable) -> Iterator[None]:
    """Attach `hook(layer_index, module, args, kwargs) -> (args, kwargs)` as a forward-pre-hook (with kwargs)
    to every decoder layer of `language_model.layers`; all are removed on exit, also on an exception. Inside
    `routed_hooks` the hooks already attached are pointed at `hook` instead (and back at nothing on exit)."""
    route = getattr(language_model, "_pruning_route", None)
    if route is not None:
        route.hook = hook
        try:
            yield
        finally:
            route.hook = None
        return
    handles = []
    try:
        for index, layer in enumerate(language_model.layers):
            handles.append(layer.register_forward_pre_hook(partial(hook, index), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _with_hidden(args: tuple, kwargs: dict, hidden: Optional[torch.Tensor]):
    """The decoder layer's call arguments with its hidden states replaced (positional or keyword)."""
    if hidden is not None:
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
    return args, kwargs


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class PrefillState:
    """The live sequence of one pruned prefill, updated at each pruning layer.

    mode "soft": dropped vision keys get a -inf key bias in this and every later layer; "train": the key
    bias is log(cumulative keep + 1e-6) (differentiable); "hard": dropped tokens are removed from the hidden
    states, masks, labels and position ids, the survivors packed right and re-padded left (batched).
    Position ids are the ORIGINAL RoPE positions of the surviving tokens (no re-indexing), so a kept token
    is rotated exactly as in the unpruned model and a later decode step continues at prompt length.

    Tensors [B, S_cur]: valid (real token), vision (vision token still kept), question, positions, labels
    (or None), key_bias (float32, for soft/train also carrying the drops), live (valid and not dropped).
    Records per layer: key_bias (for decoding), vision counts, inputs and live masks when asked.

    plan: a `vlm.static_plan.StaticPlan` (hard mode only) or None. With a plan every sample keeps the plan's
    counts, so the packed widths, the masks' presence and the vision counts come from it and the prefill
    makes no host sync (the decider must keep exactly those counts; `static_plan` checks that it says so).
    always_mask: give every layer a mask even without padding or drops (eager attention applies no causal
    mask of its own; SDPA without a mask runs causal).
    """

    def __init__(self, mode: str, decider, temperature: float, rotary, valid, vision, question, positions,
                 labels, record_hidden: bool, plan=None, always_mask: bool = False):
        self.mode, self.decider, self.temperature, self.rotary = mode, decider, temperature, rotary
        self.valid, self.vision, self.question, self.positions, self.labels = (valid, vision, question,
                                                                               positions, labels)
        self.live = valid
        self.cumulative_keep = torch.ones(valid.shape, device=valid.device)  # soft / train
        self.key_bias = torch.where(valid, 0.0, NEG_INF)
        self.pruning_layers = {int(layer) for layer in decider.layers} if decider is not None else set()
        self.record_hidden = record_hidden
        self.plan, self.always_mask = plan, always_mask
        self.static_tokens = plan.llm_tokens if plan is not None else None  # vision tokens per sample now
        self.keep: dict = {}
        self.keep_valid: dict = {}  # layer -> bool [B, n]: the vision tokens the decision was over
        self.vision_counts: List[torch.Tensor] = []
        self.layer_bias: List[torch.Tensor] = []
        self.hidden_inputs: List[torch.Tensor] = []
        self.hidden_masks: List[torch.Tensor] = []
        self._count = self._mask = self._embeddings = None
        self._stale = True

    def hook(self, layer: int, module, args, kwargs):
        """Forward-pre-hook of decoder layer `layer`: prune if it is a pruning layer, then hand the layer its
        own mask and position embeddings."""
        hidden = _hidden_of(args, kwargs)
        if layer in self.pruning_layers:
            hidden = self._prune(layer, hidden)
        if self._stale:
            masked = True if self.always_mask else self.plan.masked if self.plan is not None else None
            self._mask = layer_mask(self.key_bias, hidden.shape[1], hidden.dtype, masked)
            self._embeddings = self.rotary(hidden, self.positions)
            self._count = (self.vision.sum(dim=1).float().mean() if self.plan is None
                           else float(self.static_tokens))
            self._stale = False
        kwargs["attention_mask"] = self._mask
        kwargs["position_embeddings"] = self._embeddings
        kwargs["position_ids"] = self.positions
        self.vision_counts.append(self._count)
        self.layer_bias.append(self.key_bias)
        if self.record_hidden:
            self.hidden_inputs.append(hidden)
            self.hidden_masks.append(self.live)
        return _with_hidden(args, kwargs, hidden)

    def _prune(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        index, index_valid = left_pack(self.vision, self.static_tokens)
        if index.shape[1] == 0:  # no vision token left in any sample: nothing to decide
            self.keep[layer] = hidden.new_zeros(index.shape)
            self.keep_valid[layer] = index_valid
            return hidden
        keep = self.decider.decide(layer=layer, hidden=hidden, vision_index=index, vision_valid=index_valid,
                                   question_hidden=hidden, question_mask=self.question,
                                   training=self.mode == "train", temperature=self.temperature)
        keep = keep * index_valid.to(keep.dtype)
        self.keep[layer] = keep
        self.keep_valid[layer] = index_valid
        token_keep = scatter_to_tokens(keep, index, index_valid, hidden.shape[1], 1.0)
        kept = token_keep > 0.5
        self._stale = True
        if self.mode == "hard":
            width = None
            if self.plan is not None:  # every sample drops the same number of vision tokens
                width = hidden.shape[1] - self.static_tokens + self.plan.keep[layer]
                self.static_tokens = self.plan.keep[layer]
            return self._drop(hidden, kept, width)
        self.vision = self.vision & kept
        self.live = self.live & kept
        self.cumulative_keep = self.cumulative_keep * token_keep.float()
        if self.mode == "train":
            bias = torch.log(self.cumulative_keep + TRAIN_LOG_EPS)
        else:
            bias = torch.where(self.cumulative_keep > 0.5, 0.0, NEG_INF)
        self.key_bias = torch.where(self.valid, bias, NEG_INF)
        return hidden

    def _drop(self, hidden: torch.Tensor, kept: torch.Tensor, width: Optional[int] = None) -> torch.Tensor:
        """Remove the dropped tokens: pack the survivors right, re-pad left; keep original positions.
        width: the packed length when known (static plan), else read from `kept` (one host sync)."""
        index, slot_valid = left_pack(kept, width)
        self.valid = gather_tokens(self.valid, index) & slot_valid
        self.vision = gather_tokens(self.vision, index) & slot_valid
        self.question = gather_tokens(self.question, index) & slot_valid
        self.positions = gather_tokens(self.positions, index)
        if self.labels is not None:
            self.labels = gather_tokens(self.labels, index).masked_fill(~slot_valid, -100)
        self.live = self.valid
        self.key_bias = torch.where(self.valid, 0.0, NEG_INF)
        return gather_tokens(hidden, index)


def layer_mask(key_bias: torch.Tensor, query_length: int, dtype: torch.dtype,
               masked: Optional[bool] = None) -> Optional[torch.Tensor]:
    """The layer's additive mask (see `attention_bias`), or None when no key is masked or biased (no
    padding, no drop): SDPA then runs causal without a mask and may pick its flash kernel. masked: whether
    a key is masked, when the caller knows (no host sync); None reads it from key_bias (one sync)."""
    if masked is None:
        masked = bool((key_bias != 0).any())
    if not masked:
        return None
    return attention_bias(key_bias, query_length, dtype)


class DecodeState:
    """One cached decode step: every layer attends to its own cache (its length fixed at prefill, plus the
    tokens generated since) with its own key bias (float [B, K_l + q]); the new tokens sit at `positions`
    [B, q]. masked[l]: whether layer l's bias masks anything (else it gets no mask)."""

    def __init__(self, layer_bias: List[torch.Tensor], masked: List[bool], positions: torch.Tensor, rotary):
        self.layer_bias, self.masked, self.positions, self.rotary = layer_bias, masked, positions, rotary
        self._embeddings = None

    def hook(self, layer: int, module, args, kwargs):
        hidden = _hidden_of(args, kwargs)
        if self._embeddings is None:
            self._embeddings = self.rotary(hidden, self.positions)
        kwargs["attention_mask"] = (attention_bias(self.layer_bias[layer], hidden.shape[1], hidden.dtype)
                                    if self.masked[layer] else None)
        kwargs["position_embeddings"] = self._embeddings
        kwargs["position_ids"] = self.positions
        return args, kwargs
