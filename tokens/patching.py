"""Attach / detach training-free anchor token pruning on a ViT image encoder.

Method: SPEC section 4 (anchors by CLS attention, importance + diversity
scores; EViT, ICLR 2022; Long et al., CVPR 2023), scored in tokens/anchor.py.

A forward pre-hook on the block at `start_block` scores the tokens entering it
from the block's own q/k weights (one CLS query row plus k anchor rows, folded
into W_k so no keys are projected; replayed from a CUDA graph in inference,
tokens/graphed.py) and hands the block only the kept tokens, per sample; the
untouched block then runs its own fused attention (F.scaled_dot_product_attention
/ MHA fast path) on the shorter sequence. Later blocks therefore see
prefix + k + m tokens; their hooks only restrict an attention mask given for
the full sequence to the kept tokens (and record CLS attention when asked):
scoring them again would keep every token, since the count already is
prefix + k + m.

Hooks rather than wrapper modules, so the module tree is never changed:
`state_dict()` keys and parameter names are the same attached or not (a
checkpoint written while pruning is active loads into a plain model), and
`restore()` removes the hooks, leaving outputs bit-identical. The selection
(top-k indices) is not differentiable, so it is computed without autograd;
the kept tokens are gathered with it, so in training gradients flow through
them into every weight.

The hooks (and the readers they hold, which keep the blocks' modules, never closures over them)
are the only pruning state, and they live in each block's own hook table. So `copy.deepcopy`,
`pickle` and `torch.save` of a pruned model carry the pruning with the copy's own modules (a copy
scores with its own weights; `pruning_handle(copy)` restores it), `.to()` / dtype moves and
train/eval switches keep it, and `pruning_attached` / `restore` need no registry outside the model.
"""
import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from tokens.anchor import Selection, check_budget, gather_tokens, select_with
from tokens.backends import QKReader, Target, find_target
from tokens.graphed import ScoringGraphs
from tokens.recorder import AttentionRecorder


@dataclass(frozen=True)
class PruningPlan:
    k_anchors: int
    top_m: int
    alpha: float
    start_block: int
    num_prefix_tokens: int

    @property
    def keep(self) -> int:
        return self.num_prefix_tokens + self.k_anchors + self.top_m


class _ForwardState:
    """The kept positions chosen by the pruning block in the current forward pass (blocks run in order)."""
    def __init__(self):
        self.kept: Optional[torch.Tensor] = None

    def __getstate__(self) -> dict:
        return {"kept": None}  # a copy or a saved model starts its next forward afresh


def fit_mask(mask: torch.Tensor, positions: torch.Tensor, num_heads: int, flat_heads: bool) -> torch.Tensor:
    """Restrict an attention mask over the original N tokens to each sample's remaining tokens.

    mask: [N, N], [B, N, N], [B*H, N, N] or [B|1, H|1, N, N]; positions [B, n].
    Returns [B, h, n, n] (timm / SDPA) or [B*H, n, n] (flat_heads: nn.MultiheadAttention
    and open_clip Attention take 3-D masks as batch*heads).
    """
    batch, n = positions.shape
    full = mask.shape[-1]
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask.view(batch, num_heads, full, full) if mask.shape[0] == batch * num_heads != batch else mask[:, None]
    mask = mask.expand(batch, -1, -1, -1)
    heads = mask.shape[1]
    rows = positions[:, None, :, None].expand(batch, heads, n, full)
    mask = mask.gather(2, rows)
    cols = positions[:, None, None, :].expand(batch, heads, n, n)
    mask = mask.gather(3, cols)
    if flat_heads:
        return mask.expand(batch, num_heads, n, n).reshape(batch * num_heads, n, n)
    return mask


OBSERVE, PRUNE, FOLLOW = "observe", "prune", "follow"


class AnchorPruningHook:
    """Forward pre-hook of one block; the block itself runs unchanged on what the hook returns.

    prune   (the start block): score the incoming tokens, keep prefix + k + m per sample;
    follow  (later blocks): tokens are already pruned; fit an attention mask given for the
            full sequence to the kept tokens; no rescoring (the count is already prefix + k + m);
    observe (earlier blocks, or prune=False): only record CLS attention when recording.
    """

    def __init__(self, block: nn.Module, index: int, role: str, reader: QKReader, plan: PruningPlan,
                 state: _ForwardState, sequence_first: bool, flat_mask: bool, recorder: Optional[AttentionRecorder],
                 graphs: Optional[ScoringGraphs] = None):
        self.index, self.role, self.reader, self.plan, self.state = index, role, reader, plan, state
        self.graphs = graphs
        self.sequence_first, self.flat_mask, self.recorder = sequence_first, flat_mask, recorder
        # positions in the block's call, the token input x included (args[0])
        self.arg_names = list(inspect.signature(block.forward).parameters)
        self.mask_arg = self.arg_names.index("attn_mask") if "attn_mask" in self.arg_names else None

    def _batch_first(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1) if self.sequence_first else x

    def _score(self, tokens: torch.Tensor) -> Selection:
        plan = self.plan
        return select_with(tokens, self.reader.attend(tokens), plan.k_anchors, plan.top_m, plan.alpha,
                           plan.num_prefix_tokens)

    def _select(self, tokens: torch.Tensor) -> Selection:
        """Top-k indices carry no gradient, so scoring never records autograd; an inference forward
        replays the scoring's CUDA graph, a training one (autograd on) scores eagerly."""
        replay = self.graphs is not None and not torch.is_grad_enabled()
        with torch.no_grad():
            return self.graphs(tokens, self._score, self.reader.tensors()) if replay else self._score(tokens)

    def _prune(self, x: torch.Tensor) -> torch.Tensor:
        tokens, plan = self._batch_first(x), self.plan
        check_budget(tokens.shape[1], plan.k_anchors, plan.top_m, plan.num_prefix_tokens)
        sel = self._select(tokens)
        self.state.kept = sel.keep
        if self.recorder is not None:
            self.recorder.add(self.index, sel.cls_attention, _all_positions(tokens), sel.keep, sel.anchors)
        tokens = gather_tokens(tokens, sel.keep)  # differentiable: the kept tokens train the layers before
        return tokens.transpose(0, 1).contiguous() if self.sequence_first else tokens

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        tokens = self._batch_first(x)
        cls = torch.zeros(tokens.shape[0], 1, dtype=torch.long, device=tokens.device)
        cls_attention = self.reader.attend(tokens)(cls)[:, 0]
        positions = self.state.kept if self.role == FOLLOW else _all_positions(tokens)
        self.recorder.add(self.index, cls_attention, positions, None, None)

    def _fit(self, mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        if mask.shape[-1] == kept.shape[1]:
            return mask
        return fit_mask(mask, kept, self.reader.num_heads, self.flat_mask)

    def _fit_masks(self, args: list, kwargs: dict):
        kept = self.state.kept
        if self.mask_arg is not None and len(args) > self.mask_arg and args[self.mask_arg] is not None:
            args[self.mask_arg] = self._fit(args[self.mask_arg], kept)
        if kwargs.get("attn_mask") is not None:
            kwargs = dict(kwargs, attn_mask=self._fit(kwargs["attn_mask"], kept))
        return args, kwargs

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        args = list(args)
        from_kwargs = not args  # open_clip blocks may be called as block(q_x=...)
        x = kwargs[self.arg_names[0]] if from_kwargs else args[0]
        separate = args[1:self.mask_arg] if self.mask_arg is not None else []  # open_clip: (q_x, k_x, v_x, attn_mask)
        if any(a is not None for a in separate) or kwargs.get("k_x") is not None or kwargs.get("v_x") is not None:
            raise ValueError("anchor pruning wraps self-attention blocks only; got separate key/value inputs")
        if self.role == PRUNE:
            x = self._prune(x)
        elif self.recorder is not None:
            self._observe(x)
        if self.role == OBSERVE:
            return None  # inputs unchanged
        args, kwargs = self._fit_masks(args, kwargs)
        if from_kwargs:
            kwargs = dict(kwargs, **{self.arg_names[0]: x})
        else:
            args[0] = x
        return tuple(args), kwargs


def _all_positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)


def _hooks_of(block: nn.Module) -> Dict[int, AnchorPruningHook]:
    """The anchor pruning pre-hooks registered on one block, by hook id. The hooks live in the block's own
    hook table, so a deepcopy, a pickle or torch.save of the model carries them (and their readers, which
    hold the copy's modules); nothing outside the model records what is attached."""
    return {key: hook for key, hook in block._forward_pre_hooks.items() if isinstance(hook, AnchorPruningHook)}


def pruning_attached(model: nn.Module) -> bool:
    """Whether anchor pruning is attached anywhere in `model` (and not restored yet)."""
    return any(_hooks_of(module) for module in model.modules())


class PruningHandle:
    """What apply_pruning_to_model attached; restore() (or leaving a `with`) detaches it.
    `pruning_handle(model)` gives the handle of a copied or loaded model."""

    def __init__(self, target: Target, plan: PruningPlan, prune: bool, recorder: Optional[AttentionRecorder]):
        self.target, self.plan, self.prune, self.recorder = target, plan, prune, recorder
        self.restored = False

    def hooks(self) -> List[AnchorPruningHook]:
        return [hook for block in self.target.blocks for hook in _hooks_of(block).values()]

    def captures(self) -> int:
        """CUDA-graph captures of the scoring so far (tokens/graphed.py); timing excludes the batches that captured."""
        return sum(hook.graphs.captures for hook in self.hooks() if hook.graphs is not None)

    def tokens_per_block(self, num_tokens: Optional[int] = None) -> List[int]:
        """Tokens each block processes for an input of num_tokens tokens (default: the model's)."""
        count = num_tokens or self.target.num_tokens
        if count is None:
            raise ValueError("the token count is only known at run time for this model; pass num_tokens")
        depth = len(self.target.blocks)
        if not self.prune:
            return [count] * depth
        return [count] * self.plan.start_block + [min(count, self.plan.keep)] * (depth - self.plan.start_block)

    def restore(self) -> None:
        """Remove the pruning hooks from the blocks (other hooks stay); the model is then bit-identical to before."""
        if self.restored:
            return
        for block in self.target.blocks:
            for key in _hooks_of(block):
                del block._forward_pre_hooks[key]
                block._forward_pre_hooks_with_kwargs.pop(key, None)
        self.restored = True

    def __enter__(self) -> "PruningHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def pruning_handle(model: nn.Module) -> PruningHandle:
    """The handle of the pruning attached to `model`, e.g. to a `copy.deepcopy` of a pruned model or to one
    read back with `torch.load(..., weights_only=False)`; raises ValueError when none is attached."""
    target = find_target(model)
    hooks = [hook for block in target.blocks for hook in _hooks_of(block).values()]
    if not hooks:
        raise ValueError(f"no anchor pruning is attached to this {type(model).__name__}")
    prune = any(hook.role != OBSERVE for hook in hooks)
    return PruningHandle(target, hooks[0].plan, prune, hooks[0].recorder)


def apply_pruning_to_model(model: nn.Module, k_anchors: int, top_m: int, alpha: float, start_block: int = 1, *,
                           prune: bool = True, record: bool = False, scoring_graphs: bool = True) -> PruningHandle:
    """Hook the blocks of a timm / open_clip ViT so that tokens are pruned from `start_block` on.

    prune=False with record=True only records CLS attention (an unpruned baseline).
    scoring_graphs: on CUDA, replay the scoring from a CUDA graph per input shape (tokens/graphed.py);
    False scores eagerly (the same selection, more kernel launches).
    Raises ValueError when prefix + k_anchors + top_m leaves nothing to prune.
    """
    if pruning_attached(model):
        raise RuntimeError("this model already has anchor pruning attached; restore() its handle first")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    target = find_target(model)
    depth = len(target.blocks)
    if not 0 <= start_block < depth:
        raise ValueError(f"start_block must be in [0, {depth - 1}] for this {depth}-block model, got {start_block}")
    if k_anchors < 0 or top_m < 0:
        raise ValueError(f"k_anchors and top_m must be >= 0, got k_anchors={k_anchors}, top_m={top_m}")
    if prune and target.num_tokens is not None:  # else checked in the pruning hook, once sizes are known
        check_budget(target.num_tokens, k_anchors, top_m, target.num_prefix_tokens)
    plan = PruningPlan(k_anchors, top_m, float(alpha), start_block, target.num_prefix_tokens)
    recorder = AttentionRecorder() if record else None
    state = _ForwardState()
    for index in range(0 if record else start_block, depth):
        role = OBSERVE if not prune or index < start_block else PRUNE if index == start_block else FOLLOW
        block = target.blocks[index]
        graphs = ScoringGraphs() if scoring_graphs and role == PRUNE else None
        hook = AnchorPruningHook(block, index, role, target.readers[index], plan, state, target.sequence_first,
                                 target.library == "open_clip", recorder, graphs)
        # prepend: hooks registered earlier (token counters, tokens/stats.py) must see the pruned sequence
        block.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    return PruningHandle(target, plan, prune, recorder)
