"""Training loss of the low-rank factorisers: reconstruction MSE + λ_B ‖B‖² + λ_ortho · orthogonality.

Conventions (each term is a mean, so the weights do not scale with N, D or r):
    mse          mean over batch, tokens and channels of (A B - X)^2
    b_penalty    ‖B‖_F^2 / (r D): the mean squared entry of B, averaged over the batch
    orthogonality ‖B B^T - I_r‖_F^2 / r^2 on the basis B (rows orthonormal -> 0), averaged over the batch

The orthogonality term is on B B^T (not A^T A): B is the basis (for AdaLoRA it is Q of P diag(E) Q,
whose per-rank scales live in A), and with orthonormal rows A B is a projection onto span(B).
"""
from typing import Dict, NamedTuple

import torch


class LossTerms(NamedTuple):
    total: torch.Tensor
    mse: torch.Tensor
    b_penalty: torch.Tensor
    orthogonality: torch.Tensor

    def as_floats(self) -> Dict[str, float]:
        return {name: float(value.detach()) for name, value in self._asdict().items()}


def reconstruction_mse(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error of A [batch, N, r] @ B [batch, r, D] against x [batch, N, D]."""
    return torch.mean((a @ b - x) ** 2)


def b_penalty(b: torch.Tensor) -> torch.Tensor:
    """‖B‖_F^2 / (r D) averaged over the batch, for B [batch, r, D]."""
    return torch.mean(b ** 2)


def orthogonality(b: torch.Tensor) -> torch.Tensor:
    """‖B B^T - I‖_F^2 / r^2 averaged over the batch, for B [batch, r, D]; 0 when B's rows are orthonormal."""
    rank = b.shape[-2]
    gram = b @ b.transpose(-1, -2)
    identity = torch.eye(rank, dtype=b.dtype, device=b.device)
    return torch.mean((gram - identity) ** 2)


def factorisation_loss(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, lambda_b: float,
                       lambda_ortho: float) -> LossTerms:
    """All terms and their weighted sum (see the module docstring)."""
    mse, penalty, ortho = reconstruction_mse(a, b, x), b_penalty(b), orthogonality(b)
    return LossTerms(mse + lambda_b * penalty + lambda_ortho * ortho, mse, penalty, ortho)
