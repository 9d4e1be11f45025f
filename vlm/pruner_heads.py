"""Keep-decision heads for vision tokens inside the LLM (SPEC §5, stage 2) and the Gumbel keep mask.

Head design after LVPruning (vision tokens cross-attend to the language tokens, an MLP gives one keep
logit per vision token, a Gumbel-softmax mask in training, a hard decision at inference):

- `VisionPrunerHead`: vision and question projections to `d_internal`, multi-head cross-attention
  vision -> question (torch's `scaled_dot_product_attention`, padded question positions masked out),
  residual + LayerNorm, MLP -> keep logit.
- `VisionPrunerHeadSimple`: the same MLP on the projected vision tokens alone (the question is ignored).

Both initialise the last layer's bias to `keep_bias` (+3 by default; weights keep torch's default init,
which adds logits of a few tenths), so an untrained head keeps (almost) every token — sigmoid(3) = 0.95 in
training, and at eval `keep_mask` keeps every token whose logit stays above 0 — and the frozen backbone
starts from its unpruned behaviour. The token merger reuses these heads as its importance
scorers with `keep_bias=0`.
"""
import torch
import torch.nn.functional as F
from torch import nn

from vlm.gumbel import gumbel_softmax_hard

# Logit given to positions outside `vision_mask`: finite (gradients stay finite, also in bf16) and far
# below 0, so `keep_mask` drops them at eval and Gumbel noise cannot flip them in training.
MASKED_LOGIT = -1.0e4


def _keep_mlp(d_internal: int, keep_bias: float) -> nn.Sequential:
    """MLP d_internal -> d_internal -> 1 whose last layer's bias starts at `keep_bias`."""
    mlp = nn.Sequential(nn.Linear(d_internal, d_internal), nn.GELU(), nn.Linear(d_internal, 1))
    nn.init.constant_(mlp[-1].bias, keep_bias)
    return mlp


def _check_heads(d_internal: int, num_heads: int) -> None:
    if d_internal < 1 or num_heads < 1 or d_internal % num_heads:
        raise ValueError(f"pruner_d_internal={d_internal} must be a positive multiple of "
                         f"pruner_num_heads={num_heads}")


class QuestionCrossAttention(nn.Module):
    """Multi-head cross-attention from tokens (queries) to question embeddings (keys and values).

    forward(tokens [B, n, d], question [B, Q, d], question_mask bool [B, Q] | None) -> [B, n, d].
    A sample with no valid question position (all False, or Q = 0) gets a zero output instead of the
    NaN that attention over an empty key set would give.
    """

    def __init__(self, d_internal: int, num_heads: int):
        super().__init__()
        _check_heads(d_internal, num_heads)
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(d_internal, d_internal) for _ in range(3))
        self.out = nn.Linear(d_internal, d_internal)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, d] -> [B, h, L, d / h]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, tokens, question, question_mask=None):
        batch, num_question = question.shape[:2]
        if num_question == 0:
            return torch.zeros_like(tokens)
        if question_mask is None:
            question_mask = torch.ones(batch, num_question, dtype=torch.bool, device=question.device)
        has_question = question_mask.any(dim=-1)  # [B]
        # an all-False row would make softmax NaN: attend everywhere there, zero the result below
        attend = (question_mask | ~has_question[:, None])[:, None, None, :]  # [B, 1, 1, Q]
        attended = F.scaled_dot_product_attention(
            self._split(self.q(tokens)), self._split(self.k(question)), self._split(self.v(question)),
            attn_mask=attend)
        attended = self.out(attended.transpose(1, 2).flatten(2))
        return attended * has_question[:, None, None].to(attended.dtype)


class VisionPrunerHead(nn.Module):
    """Question-aware keep head: vision tokens cross-attend to the question, an MLP gives keep logits.

    Args: dim — hidden size D of the LLM (vision and question inputs); d_internal — width of the head
    (`pruner_d_internal`, 512); num_heads — attention heads (`pruner_num_heads`, 4; must divide
    d_internal, else ValueError); keep_bias — initial keep logit (see the module docstring).
    forward(vision [B, n, D], question [B, Q, D], question_mask bool [B, Q] (True = a question token),
    vision_mask bool [B, n] | None (True = a real vision token)) -> keep_logits float [B, n];
    positions outside vision_mask get `MASKED_LOGIT`. Inputs are cast to the head's dtype.
    """

    def __init__(self, dim: int, d_internal: int = 512, num_heads: int = 4, keep_bias: float = 3.0):
        super().__init__()
        _check_heads(d_internal, num_heads)
        self.vision_proj = nn.Linear(dim, d_internal)
        self.question_proj = nn.Linear(dim, d_internal)
        self.cross_attention = QuestionCrossAttention(d_internal, num_heads)
        self.norm = nn.LayerNorm(d_internal)
        self.mlp = _keep_mlp(d_internal, keep_bias)

    def forward(self, vision, question, question_mask, vision_mask=None):
        dtype = self.vision_proj.weight.dtype
        tokens = self.vision_proj(vision.to(dtype))
        tokens = self.norm(tokens + self.cross_attention(tokens, self.question_proj(question.to(dtype)),
                                                         question_mask))
        return _mask_logits(self.mlp(tokens).squeeze(-1), vision_mask)


class VisionPrunerHeadSimple(nn.Module):
    """Question-blind keep head: projection to d_internal, LayerNorm, MLP -> keep logits.

    Same constructor meaning and forward signature as `VisionPrunerHead`; `question` and
    `question_mask` are accepted and ignored (so the two heads are interchangeable), and may be None.
    """

    def __init__(self, dim: int, d_internal: int = 512, keep_bias: float = 3.0):
        super().__init__()
        if d_internal < 1:
            raise ValueError(f"pruner_d_internal={d_internal} must be positive")
        self.vision_proj = nn.Linear(dim, d_internal)
        self.norm = nn.LayerNorm(d_internal)
        self.mlp = _keep_mlp(d_internal, keep_bias)

    def forward(self, vision, question=None, question_mask=None, vision_mask=None):
        tokens = self.norm(self.vision_proj(vision.to(self.vision_proj.weight.dtype)))
        return _mask_logits(self.mlp(tokens).squeeze(-1), vision_mask)


def _mask_logits(logits: torch.Tensor, vision_mask) -> torch.Tensor:
    return logits if vision_mask is None else logits.masked_fill(~vision_mask, MASKED_LOGIT)


def keep_mask(keep_logits: torch.Tensor, temperature: float, training: bool) -> torch.Tensor:
    """Keep decision per vision token: 1.0 = keep, 0.0 = drop; same shape [B, n] and dtype as the logits.

    training=True: two-class Gumbel-softmax over (keep_logit, 0) at `temperature` (`vlm.gumbel.gumbel_softmax_hard`:
    torch's `F.gumbel_softmax(hard=True)` with always-finite noise): the forward value is a hard 0/1 sample, the
    gradient is that of the soft sample (straight-through). training=False: deterministic `(keep_logits > 0).float()`.
    Raises ValueError when temperature <= 0 in training.
    """
    if not training:
        return (keep_logits > 0).to(keep_logits.dtype)
    two_class = torch.stack([keep_logits, torch.zeros_like(keep_logits)], dim=-1)
    return gumbel_softmax_hard(two_class, temperature)[..., 0]
