"""Learned low-rank factorisation X [N, D] ~ A [N, r] . B [r, D] of one sample's feature map (SPEC §6).

Every model reads a batch x [batch, N, D] and returns (A [batch, N, r], B [batch, r, D]); the
reconstruction is A @ B. All three predict a basis from the sample and code the tokens on it:

    h = trunk(x)                          [batch, N, H]  token-wise network (H = hidden width)
    B = S^T x / (N rms(x)),  S = h W_S^T  [batch, r, D]  a basis: r learned weightings of the tokens
    A = code(x, B) + h W_A                [batch, N, r]  coefficients plus a learned correction

ResMLP / MLP code by least squares, code = x B^T (B B^T + eps I)^-1 (solved by QR, not through the
Gram matrix), so A B starts as (and stays near) the orthogonal projection of x onto span(B) whatever B's scale; the orthogonality loss (B B^T -> I,
lowrank/losses.py) keeps that well conditioned. Eckart-Young: the best span is the top-r right
singular subspace of x, the one truncated SVD uses, so the learned error is never below SVD's.

`AdaLoRA` (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023)
writes the product in SVD form P diag(E) Q with per-rank scales E, so that peft's RankAllocator can
prune rank triplets. Q's rows are normalised to unit length (E carries the magnitudes, so λ_B is a
constant there) and P is the least-squares code on the scaled rows diag(E) Q whose E is non-zero (the
projection holds whatever the scales), so a masked triplet drops out exactly as if its row were deleted: truncation keeps the output. Its parameters
carry peft's names: `lora_A.default` [r, H] (row i scores the tokens for basis row i),
`lora_B.default` [H, r] (column i corrects code i), `lora_E.default` [r, 1]. It returns
A = P diag(E) and B = Q.
"""
import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn

from utils import checkpoint
from utils.errors import CheckpointError, UsageError
from utils.registry import Registry

ARCHS: Registry = Registry("architecture", "--arch")
ADAPTER = "default"  # peft's adapter name, part of every lora_* parameter name
FORMAT = "lowrank-model/1"
MAX_HIDDEN = 512


def hidden_width(dim: int) -> int:
    """Width H of the token-wise trunk: D, capped at 512."""
    return min(dim, MAX_HIDDEN)


class ResidualBlock(nn.Module):
    """h + Linear(Dropout(GELU(Linear(LayerNorm(h))))), width-preserving [.., H] -> [.., H]."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.body(h)


def basis_init(rank: int, width: int, num_tokens: int, dim: int) -> torch.Tensor:
    """Basis-head weight [r, H] scaled so that the rows of B = S^T x / N start near unit norm for
    RMS-normalised x (token scores of std sqrt(N / D) over a LayerNorm-ed trunk output)."""
    return torch.randn(rank, width) * (num_tokens / (dim * width)) ** 0.5


def residual_trunk(dim: int, width: int, dropout: float, blocks: int = 2) -> nn.Module:
    blocks = [ResidualBlock(width, dropout) for _ in range(blocks)]
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), *blocks, nn.LayerNorm(width))


def plain_trunk(dim: int, width: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(width, width), nn.GELU())


class Factoriser(nn.Module):
    """Base: predicts (A, B) from x with a trunk and two rank-r heads (see the module docstring).

    `rank` is the current r. Raises ValueError when x is not [batch, N, D] with the model's N and D.
    """

    def __init__(self, dim: int, num_tokens: int, rank: int, dropout: float, trunk: nn.Module):
        super().__init__()
        self.dim, self.num_tokens, self.rank, self.dropout = dim, num_tokens, rank, dropout
        self.trunk = trunk

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.num_tokens, self.dim):
            raise ValueError(f"input of shape {tuple(x.shape)}: expected [batch, {self.num_tokens}, {self.dim}]")

    def factors(self, x: torch.Tensor, basis_weight: torch.Tensor):
        """basis_weight [r, H] -> (h [batch, N, H], basis [batch, r, D] = S^T x / (N rms(x)))."""
        self.check_input(x)
        h = self.trunk(x)
        scores = h @ basis_weight.t()                                              # [batch, N, r]
        scale = x.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-12)  # per-sample RMS
        return h, scores.transpose(1, 2) @ (x / scale) / x.shape[1]


def least_squares_code(x: torch.Tensor, basis: torch.Tensor, keep: Optional[torch.Tensor] = None,
                       ridge: float = 1e-6) -> torch.Tensor:
    """argmin_A ||A B - x||^2 + eps ||A||^2 for x [batch, N, D], B [batch, r, D] -> A [batch, N, r]
    (x B^T (B B^T + eps I)^-1 in exact arithmetic).

    Solved through a QR factorisation of the ridge-augmented [B^T; sqrt(eps) I] [batch, D + r, r], not the
    normal equations: the Gram matrix B B^T squares B's condition number, and with r near N (e.g. rank 64
    of vit_tiny's 65 tokens) its fp32 solve returned codes large enough to make training diverge.
    `keep` (bool [r], optional) solves over the kept rows only; the others get code 0, so the result
    equals the solve over B[:, keep] alone. eps = ridge * mean kept squared row norm of B (a rank-deficient
    B stays solvable)."""
    if keep is not None:
        basis = basis * keep.to(basis.dtype).view(1, -1, 1)
    rank, dim = basis.shape[1], basis.shape[2]
    kept = rank if keep is None else keep.sum().clamp_min(1)  # a tensor: no host sync
    eps = ridge * (basis.pow(2).sum(dim=(1, 2)) / kept).clamp_min(1e-12)
    eye = torch.eye(rank, dtype=basis.dtype, device=basis.device)
    augmented = torch.cat([basis.transpose(1, 2), eps.sqrt().view(-1, 1, 1) * eye], dim=1)
    q, upper = torch.linalg.qr(augmented)                              # [batch, D + r, r], [batch, r, r]
    rhs = q[:, :dim].transpose(1, 2) @ x.transpose(1, 2)               # the target [x^T; 0]: [batch, r, N]
    return torch.linalg.solve_triangular(upper, rhs, upper=True).transpose(1, 2)


class TokenFactoriser(Factoriser):
    """ResMLP / MLP: the two heads are plain weights `basis_head` [r, H] and `code_head` [H, r]."""

    def __init__(self, dim, num_tokens, rank, dropout, trunk):
        super().__init__(dim, num_tokens, rank, dropout, trunk)
        width = hidden_width(dim)
        self.basis_head = nn.Parameter(basis_init(rank, width, num_tokens, dim))
        self.code_head = nn.Parameter(torch.randn(width, rank) * 0.02)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h, basis = self.factors(x, self.basis_head)
        return least_squares_code(x, basis) + h @ self.code_head, basis


@ARCHS.register("ResMLP")
def resmlp(dim: int, num_tokens: int, rank: int, dropout: float = 0.0) -> nn.Module:
    """Residual-MLP trunk (two pre-norm residual blocks)."""
    return TokenFactoriser(dim, num_tokens, rank, dropout, residual_trunk(dim, hidden_width(dim), dropout))


@ARCHS.register("MLP")
def mlp(dim: int, num_tokens: int, rank: int, dropout: float = 0.0) -> nn.Module:
    """Two-layer MLP trunk without residuals."""
    return TokenFactoriser(dim, num_tokens, rank, dropout, plain_trunk(dim, hidden_width(dim), dropout))


class AdaLoRAFactoriser(Factoriser):
    """P diag(E) Q with peft-named rank triplets (lora_A row i, lora_E[i], lora_B column i)."""

    def __init__(self, dim, num_tokens, rank, dropout):
        width = hidden_width(dim)
        super().__init__(dim, num_tokens, rank, dropout, residual_trunk(dim, width, dropout))
        self.lora_A = nn.ParameterDict({ADAPTER: nn.Parameter(basis_init(rank, width, num_tokens, dim))})
        self.lora_B = nn.ParameterDict({ADAPTER: nn.Parameter(torch.randn(width, rank) * 0.02)})
        self.lora_E = nn.ParameterDict({ADAPTER: nn.Parameter(torch.ones(rank, 1))})

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h, basis = self.factors(x, self.lora_A[ADAPTER])
        basis = basis / basis.norm(dim=2, keepdim=True).clamp_min(1e-12)
        scales = self.lora_E[ADAPTER].view(-1)
        # the least-squares code on the scaled rows diag(E) Q, which the output P diag(E) Q multiplies out:
        # the projection then holds for any non-zero E (a code fitted to Q alone is off by 1/E_i per rank)
        scaled = basis * scales.view(1, -1, 1)
        code = least_squares_code(x, scaled, keep=scales.detach() != 0) + h @ self.lora_B[ADAPTER]
        return code * scales.view(1, 1, -1), basis

    def kept_ranks(self) -> torch.Tensor:
        """Indices of the triplets whose scale E is non-zero (those RankAllocator has not masked)."""
        return torch.nonzero(self.lora_E[ADAPTER].detach().view(-1)).view(-1)

    def truncated(self) -> "AdaLoRAFactoriser":
        """A copy with only the kept triplets: smaller shapes, the same output as the masked model."""
        keep = self.kept_ranks()
        if keep.numel() == 0:
            raise ValueError("every rank triplet is masked (E == 0): nothing to keep")
        small = copy.deepcopy(self)
        with torch.no_grad():
            for name, dim in (("lora_A", 0), ("lora_B", 1), ("lora_E", 0)):
                kept = getattr(self, name)[ADAPTER].index_select(dim, keep).clone()
                getattr(small, name)[ADAPTER] = nn.Parameter(kept)
        small.rank = int(keep.numel())
        return small


@ARCHS.register("AdaLoRA")
def adalora(dim: int, num_tokens: int, rank: int, dropout: float = 0.0) -> nn.Module:
    """SVD-form factoriser whose rank peft's RankAllocator prunes (lowrank/rank_allocation.py)."""
    return AdaLoRAFactoriser(dim, num_tokens, rank, dropout)


def create_model(arch: str, dim: int, num_tokens: int, rank: int, dropout: float = 0.0) -> nn.Module:
    """Build ARCHS[arch] for features [num_tokens, dim] at rank r.

    Raises UsageError for an unknown arch (listing the valid ones), a rank outside 1..min(N, D)
    and a dropout outside [0, 1)."""
    factory = ARCHS[arch]
    if not 1 <= rank <= min(num_tokens, dim):
        raise UsageError(f"--rank {rank}: must be between 1 and min(N, D) = min({num_tokens}, {dim}) "
                         f"= {min(num_tokens, dim)}")
    if not 0 <= dropout < 1:
        raise UsageError(f"--dropout {dropout}: must be in [0, 1)")
    return factory(dim, num_tokens, rank, dropout)


META_KEYS = ("arch", "dim", "num_tokens", "rank", "dropout", "encoder", "epoch", "best_val_mse")


def save_trained(path: str, model: nn.Module, meta: dict) -> str:
    """Atomically save `model` (its current shapes) with `meta` (plain types: arch, dim, num_tokens,
    rank, dropout, encoder, epoch, best_val_mse, ...); returns the file's sha256.
    Raises ValueError when meta lacks one of META_KEYS or disagrees with the model's shapes."""
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path}: model meta lacks {', '.join(missing)}")
    if (meta["dim"], meta["num_tokens"], meta["rank"]) != (model.dim, model.num_tokens, model.rank):
        raise ValueError(f"{path}: meta dim/num_tokens/rank {meta['dim'], meta['num_tokens'], meta['rank']} "
                         f"disagree with the model's {model.dim, model.num_tokens, model.rank}")
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return checkpoint.save(path, {"format": FORMAT, "state_dict": state, "meta": dict(meta)})


def load_trained(path: str) -> Tuple[nn.Module, dict]:
    """(model, meta) from a save_trained file, loaded with weights_only and its digest checked.
    Raises CheckpointError naming `path` for a missing, damaged or foreign file."""
    payload = checkpoint.load_file(path)
    if payload.get("format") != FORMAT or not isinstance(payload.get("meta"), dict):
        raise CheckpointError(f"{path}: not a low-rank model file (format {payload.get('format')!r}, "
                              f"expected {FORMAT!r})")
    meta = payload["meta"]
    model = create_model(meta["arch"], meta["dim"], meta["num_tokens"], meta["rank"], meta["dropout"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit a {meta['arch']} of rank {meta['rank']} "
                              f"({str(exc).splitlines()[0]})") from None
    return model, meta
