"""Attach / detach training-free anchor token pruning on a ViT image encoder.

Method: SPEC section 4 (anchors by CLS attention, importance + diversity
scores; EViT, ICLR 2022; Long et al., CVPR 2023), scored in tokens/anchor.py.

The block at `start_block` is replaced in its ModuleList/Sequential by an
`AnchorPruningBlock` that scores the tokens entering it from the block's own q/k
weights (one CLS query row plus k anchor rows; keys for all tokens), gathers
the kept tokens per sample, and then calls the untouched original block, which
runs its own fused attention (F.scaled_dot_product_attention / MHA fast path)
on the shorter sequence. Later blocks therefore see prefix + k + m tokens; they
are wrapped too, only to restrict an attention mask given for the full
sequence to the kept tokens (and to record CLS attention when asked); scoring
them again would keep every token, since the count already is prefix + k + m.
`restore()` puts the original block objects back, so the model is the same
object graph, with the same parameters, as before: outputs are bit-identical.
"""
import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from tokens.anchor import attention_rows, check_budget, gather_tokens, select_tokens
from tokens.backends import QKReader, Target, find_target
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


class AnchorPruningBlock(nn.Module):
    """Runs the wrapped block unchanged, around it:

    prune   (the start block): score the incoming tokens, keep prefix + k + m per sample;
    follow  (later blocks): tokens are already pruned; fit an attention mask given for the
            full sequence to the kept tokens; no rescoring (the count is already prefix + k + m);
    observe (earlier blocks, or prune=False): only record CLS attention when recording.
    """

    def __init__(self, block: nn.Module, index: int, role: str, reader: QKReader, plan: PruningPlan,
                 state: _ForwardState, sequence_first: bool, flat_mask: bool, recorder: Optional[AttentionRecorder]):
        super().__init__()
        self.block = block
        self.index, self.role, self.reader, self.plan, self.state = index, role, reader, plan, state
        self.sequence_first, self.flat_mask, self.recorder = sequence_first, flat_mask, recorder
        names = [p for p in inspect.signature(block.forward).parameters][1:]
        self.mask_arg = names.index("attn_mask") if "attn_mask" in names else None

    def __getattr__(self, name: str):
        # Callers reach into blocks (open_clip's get_cast_dtype -> resblocks[0].get_weight_dtype()).
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_modules", {}).get("block")
            if block is None:
                raise
            return getattr(block, name)

    def _batch_first(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1) if self.sequence_first else x

    def _prune(self, x: torch.Tensor) -> torch.Tensor:
        tokens, plan = self._batch_first(x), self.plan
        check_budget(tokens.shape[1], plan.k_anchors, plan.top_m, plan.num_prefix_tokens)
        keys, rows = self.reader(tokens)
        sel = select_tokens(tokens, keys, rows, plan.k_anchors, plan.top_m, plan.alpha, plan.num_prefix_tokens,
                            self.reader.scale, self.reader.logit_scale_value())
        self.state.kept = sel.keep
        if self.recorder is not None:
            self.recorder.add(self.index, sel.cls_attention, _all_positions(tokens), sel.keep, sel.anchors)
        tokens = gather_tokens(tokens, sel.keep)
        return tokens.transpose(0, 1).contiguous() if self.sequence_first else tokens

    def _observe(self, x: torch.Tensor) -> None:
        tokens = self._batch_first(x)
        keys, rows = self.reader(tokens)
        cls = torch.zeros(tokens.shape[0], 1, dtype=torch.long, device=tokens.device)
        cls_attention = attention_rows(rows(cls), keys, self.reader.scale, self.reader.logit_scale_value())[:, 0]
        positions = self.state.kept if self.role == FOLLOW else _all_positions(tokens)
        self.recorder.add(self.index, cls_attention, positions, None, None)

    def _fit_masks(self, args, kwargs):
        kept = self.state.kept
        if self.mask_arg is not None and len(args) > self.mask_arg and args[self.mask_arg] is not None:
            args = list(args)
            args[self.mask_arg] = self._fit(args[self.mask_arg], kept)
        if kwargs.get("attn_mask") is not None:
            kwargs = dict(kwargs, attn_mask=self._fit(kwargs["attn_mask"], kept))
        return args, kwargs

    def _fit(self, mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        if mask.shape[-1] == kept.shape[1]:
            return mask
        return fit_mask(mask, kept, self.reader.num_heads, self.flat_mask)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if any(a is not None for a in args[: (self.mask_arg or 0)]) or kwargs.get("k_x") is not None:
            raise ValueError("anchor pruning wraps self-attention blocks only; got separate key/value inputs")
        if self.role == PRUNE:
            x = self._prune(x)
        elif self.recorder is not None:
            self._observe(x)
        if self.role != OBSERVE:
            args, kwargs = self._fit_masks(args, kwargs)
        return self.block(x, *args, **kwargs)


def _all_positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)


class PruningHandle:
    """What apply_pruning_to_model attached; restore() (or leaving a `with`) detaches it."""

    def __init__(self, target: Target, plan: PruningPlan, originals: Dict[int, nn.Module], prune: bool,
                 recorder: Optional[AttentionRecorder]):
        self.target, self.plan, self.prune, self.recorder = target, plan, prune, recorder
        self._originals = originals
        self.restored = False

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
        if self.restored:
            return
        blocks = self.target.blocks
        for index, original in self._originals.items():
            if not (isinstance(blocks[index], AnchorPruningBlock) and blocks[index].block is original):
                raise RuntimeError(f"block {index} was replaced after anchor pruning was applied; cannot restore it")
            blocks[index] = original
        self.restored = True

    def __enter__(self) -> "PruningHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def apply_pruning_to_model(model: nn.Module, k_anchors: int, top_m: int, alpha: float, start_block: int = 1, *,
                           prune: bool = True, record: bool = False) -> PruningHandle:
    """Wrap the blocks of a timm / open_clip ViT so that tokens are pruned from `start_block` on.

    prune=False with record=True only records CLS attention (an unpruned baseline).
    Raises ValueError when prefix + k_anchors + top_m leaves nothing to prune.
    """
    if any(isinstance(m, AnchorPruningBlock) for m in model.modules()):
        raise RuntimeError("this model already has anchor pruning attached; restore() its handle first")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    target = find_target(model)
    depth = len(target.blocks)
    if not 0 <= start_block < depth:
        raise ValueError(f"start_block must be in [0, {depth - 1}] for this {depth}-block model, got {start_block}")
    if k_anchors < 0 or top_m < 0:
        raise ValueError(f"k_anchors and top_m must be >= 0, got k_anchors={k_anchors}, top_m={top_m}")
    if prune and target.num_tokens is not None:  # else checked in the pruning block, once sizes are known
        check_budget(target.num_tokens, k_anchors, top_m, target.num_prefix_tokens)
    plan = PruningPlan(k_anchors, top_m, float(alpha), start_block, target.num_prefix_tokens)
    recorder = AttentionRecorder() if record else None
    state, originals = _ForwardState(), {}
    for index in range(0 if record else start_block, len(target.blocks)):
        role = OBSERVE if not prune or index < start_block else PRUNE if index == start_block else FOLLOW
        original = target.blocks[index]
        target.blocks[index] = AnchorPruningBlock(original, index, role, target.readers[index], plan, state,
                                                  target.sequence_first, target.library == "open_clip", recorder)
        originals[index] = original
    return PruningHandle(target, plan, originals, prune, recorder)
