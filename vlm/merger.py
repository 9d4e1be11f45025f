"""Learnable vision-token merger (SPEC §5, stage 1): N tokens -> M merged tokens, batched.

1. Importance scores s [B, N]: V1 (`question_aware=False`) an MLP on each vision token
   (`VisionPrunerHeadSimple`); V2 (`question_aware=True`) vision tokens cross-attend to the question
   embeddings, padded question positions masked (`VisionPrunerHead`). Both with `keep_bias=0`.
2. Centre selection, Gumbel-top-k (Kool et al. 2019): in training the top M of s + Gumbel noise, i.e. M
   tokens sampled without replacement from softmax(s); at eval (`self.training == False`) the top M of s.
   Centre indices are returned in ascending token order, so merged tokens keep the image's raster order.
3. Soft assignment, as in ToMe's merging but learned: A = softmax(Q Kᵀ / sqrt(d) / τ) over the M centres,
   Q = W_q x (all tokens), K = W_k x (centres); W_k starts as a copy of W_q, so at init Q Kᵀ is a
   similarity and a centre attracts the tokens that look like it. Every token is merged: centre j is the
   weighted mean Σ_i A_ij x_i / Σ_i A_ij. `assignment="all"` (the seed's) soft-assigns every token, centres
   included, so even a centre's own token is mixed with others from the start; `assignment="others"` gives
   each centre's own row the one-hot on itself and soft-assigns only the N - M other tokens, so centre j is
   (x_j + Σ_{i not a centre} A_ij x_i) / (1 + Σ_{i not a centre} A_ij) (`ASSIGNMENTS`, `merge_features`).
4. Gradient to the scorer through the features (our choice): top-k indices carry no gradient, so each
   merged centre is multiplied by a straight-through selection weight w = 1 + p - stop_grad(p), with
   p = sigmoid((s + g - t) / τ) the relaxed top-k membership (t = midpoint between the M-th and (M+1)-th
   perturbed score, g the Gumbel noise, 0 at eval). The forward value is unchanged (w = 1), the backward
   pass gives the scorer the gradient of "how much should this centre count", as straight-through
   Gumbel estimators do. Without it the scorer would learn only from the sparsity loss.
5. `kept` = Σ_i sigmoid(s_i) [B]: the soft count of tokens the scorer would select on its own, so the
   sparsity loss (kept - M)² · weight calibrates sigmoid(s) as a selection probability with about M of
   the N tokens above 1/2. At init (logits near 0) kept ≈ N / 2, the default M.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlm.gumbel import gumbel_noise
from vlm.hard_drop import at_least_float32
from vlm.pruner_heads import VisionPrunerHead, VisionPrunerHeadSimple


@dataclass(frozen=True)
class MergeOutput:
    """merged [B, M, D] (input dtype); assignment [B, N, M] float32 (float64 in a float64 model, as every float
    here: `at_least_float32`), rows sum to 1 over M; centres long [B, M] (ascending token indices); kept
    float32 [B] (differentiable soft count); num_centres int M; scores float32 [B, N] (importance logits, for
    logging and analysis)."""
    merged: torch.Tensor
    assignment: torch.Tensor
    centres: torch.Tensor
    kept: torch.Tensor
    num_centres: int
    scores: torch.Tensor | None = None


def merge_centres(num_tokens: int, merge_ratio: float = 0.5, target_merge_tokens: int | None = None) -> int:
    """Number of merge centres M: `target_merge_tokens` if given, else round(num_tokens * merge_ratio).

    Raises ValueError (naming the flag) unless 1 <= M < num_tokens, e.g. 576 tokens, ratio 0.5 -> 288.
    """
    if target_merge_tokens is not None:
        centres, flag = int(target_merge_tokens), f"target_merge_tokens={target_merge_tokens}"
    else:
        centres, flag = round(num_tokens * merge_ratio), f"merge_ratio={merge_ratio}"
    if not 1 <= centres < num_tokens:
        raise ValueError(f"{flag} gives {centres} merge centres for {num_tokens} vision tokens; "
                         f"need 1 <= centres < {num_tokens}")
    return centres


def assign_all(logits: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The seed's soft assignment: softmax over the M centres of every token's logits [B, N, M] -> [B, N, M]
    (`centres` unused)."""
    return logits.softmax(dim=-1)


def assign_others(logits: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Centres keep their own token: the rows of the M centre tokens (centres long [B, M]) are one-hot on
    their own centre, the other N - M rows the softmax over the centres of logits [B, N, M]. -> [B, N, M]
    float32, every row summing to 1; gradient flows to `logits` through the non-centre rows only."""
    own = torch.zeros_like(logits).scatter_(1, centres[:, None, :], 1.0)  # own[b, centres[b, j], j] = 1
    is_centre = own.sum(dim=-1, keepdim=True) > 0  # [B, N, 1]
    return torch.where(is_centre, own, logits.softmax(dim=-1))


ASSIGNMENTS = {"all": assign_all, "others": assign_others}


def dot_similarity(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The seed's Q Kᵀ / sqrt(d): query [B, N, d], key [B, M, d] -> [B, N, M]. Grows with the features' norms:
    features of norm ~1,600 (the CPU diagnosis' tiny LLaVA) give logits in the thousands, a one-hot softmax."""
    return query @ key.transpose(1, 2) / math.sqrt(query.shape[-1])


def cosine_similarity(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Cosine of each query and key, in [-1, 1] whatever the features' scale (ToMe matches tokens by the
    cosine of their keys: Bolya et al., ICLR 2023): [B, N, d], [B, M, d] -> [B, N, M]."""
    return F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).transpose(1, 2)


SIMILARITIES = {"dot": dot_similarity, "cosine": cosine_similarity}


def merge_features(assignment: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """Centre j's weighted mean Σ_i A_ij x_i / Σ_i A_ij, float32 [B, M, D], of assignment [B, N, M] and vision
    [B, N, D] (a centre's mass is clamped at 1e-6, so a centre given no weight comes out as zeros)."""
    mass = assignment.sum(dim=1).clamp_min(1e-6)  # [B, M]
    return torch.einsum("bnm,bnd->bmd", assignment, at_least_float32(vision)) / mass[..., None]


class LearnableTokenMerger(nn.Module):
    """Merge N vision tokens into M learned centres (see the module docstring for the method).

    Args: dim — feature size D (the LLM's hidden size: features after the projector); num_tokens — N
    (576 for CLIP ViT-L/14 at 336 px); merge_ratio / target_merge_tokens — M (see `merge_centres`;
    ValueError when M >= N); question_aware — V2 scorer; d_internal — width of the scorer and of the
    assignment projections; num_heads — heads of the V2 cross-attention; positions — the RoPE positions the
    LLM gives the merged prompt (vlm/pruned_forward.py): "recount" (0.. over the shorter prompt, the seed's)
    or "original" (each centre at its token's position, the text after the image at its own); assignment —
    "all" (every token soft-assigned, the seed's) or "others" (each centre keeps its own token at weight 1,
    the other N - M tokens soft-assigned; see `ASSIGNMENTS`); similarity — the assignment logits before /τ:
    "dot" (Q Kᵀ / sqrt(d), the seed's) or "cosine" (scale-free; see `SIMILARITIES`).
    forward(vision [B, N, D], temperature τ > 0, question [B, Q, D] | None, question_mask bool [B, Q] |
    None (True = question token; None = all)) -> MergeOutput. Raises ValueError for an unknown positions,
    assignment or similarity, a wrong vision shape, τ <= 0, or a question-aware merger called without a question.
    """

    def __init__(self, dim: int, num_tokens: int, merge_ratio: float = 0.5,
                 target_merge_tokens: int | None = None, question_aware: bool = False,
                 d_internal: int = 512, num_heads: int = 4, positions: str = "recount", assignment: str = "all",
                 similarity: str = "dot"):
        super().__init__()
        if positions not in ("recount", "original"):
            raise ValueError(f"positions={positions!r}: choose recount or original")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment={assignment!r}: choose {' or '.join(ASSIGNMENTS)}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r}: choose {' or '.join(SIMILARITIES)}")
        self.positions, self.assignment, self.similarity = positions, assignment, similarity
        self.dim, self.num_tokens, self.question_aware = dim, num_tokens, question_aware
        self.num_centres = merge_centres(num_tokens, merge_ratio, target_merge_tokens)
        self.scorer = (VisionPrunerHead(dim, d_internal, num_heads, keep_bias=0.0) if question_aware
                       else VisionPrunerHeadSimple(dim, d_internal, keep_bias=0.0))
        self.assign_query = nn.Linear(dim, d_internal, bias=False)
        self.assign_key = nn.Linear(dim, d_internal, bias=False)
        with torch.no_grad():
            self.assign_key.weight.copy_(self.assign_query.weight)

    def importance(self, vision, question=None, question_mask=None) -> torch.Tensor:
        """Importance logits s, float32 (or wider) [B, N] (higher = more likely a centre)."""
        if self.question_aware and question is None:
            raise ValueError("merger_type=question_aware needs the question embeddings (question=None given)")
        return at_least_float32(self.scorer(vision, question, question_mask))

    def forward(self, vision, temperature: float, question=None, question_mask=None) -> MergeOutput:
        if vision.dim() != 3 or vision.shape[1:] != (self.num_tokens, self.dim):
            raise ValueError(f"vision features of shape {tuple(vision.shape)}; the merger expects "
                             f"[B, {self.num_tokens}, {self.dim}]")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        scores = self.importance(vision, question, question_mask)  # [B, N]
        perturbed = scores
        if self.training:  # Gumbel(0, 1) noise, always finite
            perturbed = scores + gumbel_noise(scores)
        top = perturbed.topk(self.num_centres + 1, dim=-1)  # [B, M + 1], descending
        centres = top.indices[:, :-1].sort(dim=-1).values  # [B, M]
        threshold = top.values[:, -2:].mean(dim=-1, keepdim=True).detach()  # between M-th and (M+1)-th
        membership = torch.sigmoid((perturbed - threshold) / temperature).gather(1, centres)  # [B, M]
        selection = 1.0 + membership - membership.detach()  # value 1, gradient of the relaxed top-k

        centre_features = vision.gather(1, centres[..., None].expand(-1, -1, vision.shape[-1]))
        weight_dtype = self.assign_query.weight.dtype
        query = at_least_float32(self.assign_query(vision.to(weight_dtype)))  # [B, N, d]
        key = at_least_float32(self.assign_key(centre_features.to(weight_dtype)))  # [B, M, d]
        logits = SIMILARITIES[self.similarity](query, key) / temperature  # [B, N, M]
        assignment = ASSIGNMENTS[self.assignment](logits, centres)  # [B, N, M]
        merged = (merge_features(assignment, vision) * selection[..., None]).to(vision.dtype)
        kept = torch.sigmoid(scores).sum(dim=-1)
        return MergeOutput(merged, assignment, centres, kept, self.num_centres, scores)
