"""Training-free anchor token selection for ViT / CLIP image encoders (pure tensor math).

The criterion is the project's SPEC section 4. It combines two ideas from the
token-pruning literature: the [CLS] attention of a token measures its importance
(EViT, Liang et al., "Not All Patches are What You Need", ICLR 2022), and keeping
tokens that differ from the ones already kept preserves information
(Long et al., "Beyond Attentive Tokens: Incorporating Token Importance and
Diversity for Efficient Vision Transformers", CVPR 2023).

For one block, per sample:
1. anchors  = the k non-prefix tokens with the highest CLS attention
              softmax(q_cls . K^T / sqrt(d)), averaged over heads;
2. I_i      = mean attention between token i and the anchors, read as the
              anchors' attention rows (mean over anchors and heads of
              softmax(q_anchor . K^T / sqrt(d))[i]); that needs k query rows
              only, so it stays cheap inside a real model;
3. D_i      = 1 - max_j cos(x_i, x_anchor_j) on the block's input tokens;
4. S_i      = alpha * I_i + (1 - alpha) * D_i;
keep = prefix tokens (CLS, register tokens) + anchors + top-m of S among the
rest, in their original order. With k = 0 the CLS token is the only reference
(I = CLS attention, D = 1 - cos(x_i, x_cls)), so m tokens can still be chosen.

Everything here takes tensors and returns tensors; nothing knows about modules.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

QueryRows = Callable[[torch.Tensor], torch.Tensor]  # positions [B, R] -> query rows [B, H, R, d]
Attend = Callable[[torch.Tensor], torch.Tensor]     # positions [B, R] -> head-mean attention rows [B, R, N] float32


@dataclass
class Selection:
    keep: torch.Tensor           # [B, P+k+m] int64, sorted positions into the block's input sequence
    anchors: torch.Tensor        # [B, k] int64 positions of the anchors
    cls_attention: torch.Tensor  # [B, N] float32, head-mean CLS attention over the input tokens


def check_budget(num_tokens: int, k_anchors: int, top_m: int, num_prefix_tokens: int = 1) -> int:
    """Tokens kept per sample; a ValueError naming both numbers if nothing would be pruned."""
    if k_anchors < 0 or top_m < 0:
        raise ValueError(f"k_anchors and top_m must be >= 0, got k_anchors={k_anchors}, top_m={top_m}")
    keep = num_prefix_tokens + k_anchors + top_m
    if keep >= num_tokens:
        raise ValueError(f"anchor pruning keeps {keep} tokens ({num_prefix_tokens} prefix + k_anchors={k_anchors} "
                         f"+ top_m={top_m}) but the sequence has only {num_tokens} tokens; "
                         f"choose k_anchors + top_m + {num_prefix_tokens} < {num_tokens}")
    return keep


def attention_rows(queries: torch.Tensor, keys: torch.Tensor, scale: Optional[float] = None,
                   logit_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Head-mean softmax attention of R query rows over N keys.

    queries [B, H, R, d], keys [B, H, N, d] -> [B, R, N] float32. `logit_scale`
    ([H, 1, 1], already exponentiated) selects scaled cosine attention, as used
    by some open_clip blocks; otherwise logits are q.k * scale (default d^-0.5,
    the scale F.scaled_dot_product_attention uses). The logits are computed in
    the tensors' own dtype, as the block's attention computes them (a bf16
    model scores in bf16 without copying its keys to float32); the softmax and
    the head mean are float32.
    """
    if logit_scale is not None:
        logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(-1, -2)
        logits = logits.float() * logit_scale.float()
    else:
        scale = queries.shape[-1] ** -0.5 if scale is None else scale
        logits = ((queries * scale) @ keys.transpose(-1, -2)).float()
    return logits.softmax(dim=-1).mean(dim=1)


def choose_anchors(cls_attention: torch.Tensor, k_anchors: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """The k non-prefix positions with the highest CLS attention, [B, k] int64."""
    top = cls_attention[:, num_prefix_tokens:].topk(k_anchors, dim=1).indices
    return top + num_prefix_tokens


def anchor_scores(x: torch.Tensor, reference_attention: torch.Tensor, references: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """S = alpha * importance + (1 - alpha) * diversity, [B, N] float32.

    x [B, N, D] block input tokens; reference_attention [B, R, N] attention rows
    of the reference tokens (the anchors); references [B, R] their positions.
    Cosines are dot products in x's dtype over float32 norms, so a bf16 model
    never materialises a float32 copy of its tokens.
    """
    importance = reference_attention.mean(dim=1)
    wide = torch.promote_types(x.dtype, torch.float32)  # float32 for bf16/fp16/fp32 tokens, float64 for float64
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=wide).float().clamp_min(1e-12)  # [B, N]
    ref_x = x.gather(1, references.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    dots = torch.bmm(x, ref_x.transpose(1, 2)).float()  # [B, N, R]
    cosine = dots / (norms.unsqueeze(-1) * norms.gather(1, references).unsqueeze(1))
    diversity = 1.0 - cosine.amax(dim=-1)
    return alpha * importance + (1.0 - alpha) * diversity


def keep_indices(scores: torch.Tensor, anchors: torch.Tensor, top_m: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Prefix + anchors + the top-m scores among the other tokens, sorted so token order survives."""
    batch = scores.shape[0]
    candidates = scores.clone()
    candidates[:, :num_prefix_tokens] = float("-inf")
    candidates.scatter_(1, anchors, float("-inf"))
    others = candidates.topk(top_m, dim=1).indices
    prefix = torch.arange(num_prefix_tokens, device=scores.device).expand(batch, -1)
    return torch.cat([prefix, anchors, others], dim=1).sort(dim=1).values


def rows_from(queries: torch.Tensor) -> QueryRows:
    """Adapt full queries [B, H, N, d] to the `positions [B, R] -> [B, H, R, d]` form select_tokens takes."""
    def rows(positions: torch.Tensor) -> torch.Tensor:
        index = positions[:, None, :, None].expand(-1, queries.shape[1], -1, queries.shape[-1])
        return queries.gather(2, index)
    return rows


def attend_with(keys: torch.Tensor, queries: Union[torch.Tensor, QueryRows], scale: Optional[float] = None,
                logit_scale: Optional[torch.Tensor] = None) -> Attend:
    """The attention rows of given positions from explicit keys [B, H, N, d] and queries (see attention_rows)."""
    rows = rows_from(queries) if isinstance(queries, torch.Tensor) else queries
    return lambda positions: attention_rows(rows(positions), keys, scale, logit_scale)


def select_tokens(x: torch.Tensor, keys: torch.Tensor, queries: Union[torch.Tensor, QueryRows], k_anchors: int,
                  top_m: int, alpha: float, num_prefix_tokens: int = 1, scale: Optional[float] = None,
                  logit_scale: Optional[torch.Tensor] = None) -> Selection:
    """Per-sample anchor token selection for one block.

    x [B, N, D] block input tokens, keys [B, H, N, d]; queries either [B, H, N, d]
    or a function giving the query rows of given positions (so a model computes
    q for 1 + k tokens only). CLS is position 0. Every sample gets its own choice.
    """
    return select_with(x, attend_with(keys, queries, scale, logit_scale), k_anchors, top_m, alpha, num_prefix_tokens)


def select_with(x: torch.Tensor, attend: Attend, k_anchors: int, top_m: int, alpha: float,
                num_prefix_tokens: int = 1) -> Selection:
    """select_tokens given any `attend(positions [B, R]) -> [B, R, N]` head-mean attention rows,
    e.g. a model's own projections (tokens/backends.py QKReader.attend)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if num_prefix_tokens < 1:
        raise ValueError("anchor pruning needs a CLS token at position 0 (num_prefix_tokens >= 1)")
    check_budget(x.shape[1], k_anchors, top_m, num_prefix_tokens)
    cls = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
    cls_attention = attend(cls)[:, 0]
    anchors = choose_anchors(cls_attention, k_anchors, num_prefix_tokens)
    if k_anchors:
        references, reference_attention = anchors, attend(anchors)
    else:
        references, reference_attention = cls, cls_attention.unsqueeze(1)
    scores = anchor_scores(x, reference_attention, references, alpha)
    return Selection(keep_indices(scores, anchors, top_m, num_prefix_tokens), anchors, cls_attention)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, n] -> [B, n, D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
