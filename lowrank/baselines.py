"""Baselines for rank-r factorisations of feature maps X [N tokens, D channels]: pure tensor functions.

- per-sample truncated SVD: X_r = U_r S_r V_r^T, the best rank-r approximation of each sample in
  Frobenius norm (Eckart–Young); stored as A = U_r S_r [N, r] and B = V_r^T [r, D], r (N + D) values.
- global PCA: one shared basis V_k [D, k] and mean mu [D] fitted on the training split; a sample
  stores only its coefficients (X - mu) V_k [N, k]. At the same bytes per sample as the SVD at rank
  r, it may keep k = floor(r (N + D) / N) components (`fair_pca_rank`); the basis is shared and not
  counted per sample.
- random projection: a fixed random orthonormal basis Q [D, k] (from a seed, nothing stored), the
  coefficients X Q [N, k], decoded as X Q Q^T: PCA's budget without looking at the data.
All functions take batches [B, N, D] and compute in float64 (the ratio check needs exact ranks).
"""
from typing import Dict, Iterable, Tuple

import torch


def svd_factors(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of every sample: x [B, N, D] -> U [B, N, m], S [B, m], Vh [B, m, D], m = min(N, D)."""
    return torch.linalg.svd(x.double(), full_matrices=False)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors of an SVD: A = U_r diag(S_r) [B, N, r], B = Vh_r [B, r, D].
    Raises ValueError when `rank` is outside 1..min(N, D)."""
    if not 1 <= rank <= s.shape[-1]:
        raise ValueError(f"rank {rank}: must be between 1 and min(N, D) = {s.shape[-1]}")
    return u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]


def svd_reconstruct(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Per-sample best rank-`rank` approximation of x [B, N, D] (float64)."""
    a, b = truncate(*svd_factors(x), rank)
    return a @ b


def fit_pca(batches: Iterable[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA over the token vectors (rows) of every sample in `batches` (each [B, N, D]), streamed.

    Returns (mean [D], basis [D, D] with components as columns by decreasing variance, variances [D]).
    Raises ValueError when `batches` holds no sample.
    """
    total, first, second = 0, None, None
    for batch in batches:
        rows = batch.double().reshape(-1, batch.shape[-1])
        first = rows.sum(0) if first is None else first + rows.sum(0)
        second = rows.T @ rows if second is None else second + rows.T @ rows
        total += rows.shape[0]
    if total == 0:
        raise ValueError("PCA: no training samples to fit the basis on")
    mean = first / total
    covariance = second / total - torch.outer(mean, mean)
    variances, vectors = torch.linalg.eigh(covariance)
    return mean, vectors.flip(-1), variances.flip(-1).clamp_min(0)


def pca_reconstruct(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, k: int) -> torch.Tensor:
    """x [B, N, D] through the first `k` components: mu + (x - mu) V_k V_k^T (float64)."""
    v = basis[:, :k].double()
    centred = x.double() - mean.double()
    return mean.double() + (centred @ v) @ v.T


def random_basis(dim: int, k: int, seed: int = 0) -> torch.Tensor:
    """A random orthonormal basis [dim, k] (QR of a seeded Gaussian matrix), float64."""
    gaussian = torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    return q


def project_reconstruct(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] projected on the column span of `basis` [D, k]: x Q Q^T (float64)."""
    q = basis.double()
    return (x.double() @ q) @ q.T


def fair_pca_rank(rank: int, tokens: int, dim: int) -> int:
    """Components k that a shared-basis method may keep at the per-sample bytes of a rank-`rank`
    factorisation: N k <= r (N + D), so k = floor(r (N + D) / N), at most D."""
    return min(dim, rank * (tokens + dim) // tokens)


def factor_values(rank: int, tokens: int, dim: int) -> int:
    """Values stored per sample by A [N, r] and B [r, D]."""
    return rank * (tokens + dim)


def svd_flops(tokens: int, dim: int) -> int:
    """Floating-point operations of one thin SVD of an N x D matrix (Golub & Van Loan, Matrix
    Computations, table 5.4.1, R-SVD for Sigma, U1, V: 6 m n^2 + 20 n^3 with m >= n); the truncation
    to any rank and A = U_r S_r add at most N r more."""
    m, n = max(tokens, dim), min(tokens, dim)
    return 6 * m * n * n + 20 * n ** 3


def projection_flops(tokens: int, dim: int, k: int) -> int:
    """Multiply-adds (x 2) of the coefficients (x - mu) V_k or x Q for one sample."""
    return 2 * tokens * dim * k


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample errors of x_hat against x (both [B, N, D]); each value a float64 tensor [B]:
    mse (mean squared error per entry), rel_fro (||x - x_hat||_F / ||x||_F), cosine (cosine
    similarity of each token's vector, averaged over tokens), energy (captured energy 1 - rel_fro^2,
    = ||x_hat||^2 / ||x||^2 for orthogonal projections such as SVD and PCA)."""
    x, x_hat = x.double(), x_hat.double()
    residual = (x - x_hat).pow(2).sum((-2, -1))
    norm = x.pow(2).sum((-2, -1)).clamp_min(torch.finfo(torch.float64).tiny)
    rel_fro = (residual / norm).sqrt()
    cosine = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).mean(-1)
    return {"mse": residual / (x.shape[-2] * x.shape[-1]), "rel_fro": rel_fro, "cosine": cosine,
            "energy": 1 - rel_fro.pow(2)}
