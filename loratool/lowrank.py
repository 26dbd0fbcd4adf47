"""Low-rank math on the r×r core, never on the d×k delta (no I/O here).

For ΔW = B @ A (B: d×r, A: r×k): B = Q_b R_b and Aᵀ = Q_a R_a, so ΔW = Q_b (R_b R_aᵀ) Q_aᵀ and the
singular values of ΔW are those of the small r×r core R_b R_aᵀ (Eckart–Young then gives the optimal
rank-k truncation from the same factors). Computed in float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def core_svd(B: "torch.Tensor", A: "torch.Tensor", scale: float = 1.0):
    """SVD of scale·B@A from its factors: returns (U, S, Vh) with U d×r, S r, Vh r×k, float64.

    B is (d, r), A is (r, k); higher-dimensional factors (conv) must be reshaped to 2-D first.
    Signs are made deterministic: the largest-magnitude entry of each column of U is positive.
    """
    import torch

    B = B.to(torch.float64)
    A = A.to(torch.float64)
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.T, mode="reduced")
    core = (Rb @ Ra.T) * scale
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    U = Qb @ Uc
    Vh = Vhc @ Qa.T
    # deterministic signs
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, S, Vh * signs[:, None]


def singular_values(B: "torch.Tensor", A: "torch.Tensor", scale: float = 1.0) -> "torch.Tensor":
    """Singular values of scale·B@A (descending, float64) from the r×r core."""
    import torch

    B = B.to(torch.float64)
    A = A.to(torch.float64)
    Rb = torch.linalg.qr(B, mode="r")[1]
    Ra = torch.linalg.qr(A.T, mode="r")[1]
    return torch.linalg.svdvals((Rb @ Ra.T) * abs(scale))


def effective_rank(S: "torch.Tensor", energy: float) -> int:
    """Smallest k whose top-k squared singular values hold ``energy`` of the total (0 for a zero
    delta)."""
    import torch

    e = S.to(torch.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
