"""Low-rank math on the r×r core, never on the d×k delta (no I/O here).

For ΔW = B @ A (B: d×r, A: r×k): B = Q_b R_b and Aᵀ = Q_a R_a, so ΔW = Q_b (R_b R_aᵀ) Q_aᵀ and the
singular values of ΔW are those of the small r×r core R_b R_aᵀ; Eckart–Young then gives the optimal
rank-k truncation from the same factors. A weighted sum of LoRA deltas Σ wᵢ·sᵢ·Bᵢ·Aᵢ is one product
of stacked factors, [w₁s₁B₁ … wₙsₙBₙ] @ [A₁; …; Aₙ], so its best rank-k approximation comes from a
(Σrᵢ)×(Σrᵢ) core too. PEFT's ``add_weighted_adapter(combination_type="svd")`` instead forms every
d×k delta and runs a full SVD of it (issue 5: 297 s and 10.8 GB for two r=16 adapters of a 1.1B
model on 2 cores). All of this is computed in float64.

The delta-domain merges (TIES, DARE, magnitude pruning) are compose methods
(``loratool.compose_methods.delta``); they need the dense delta of one module at a time, which
their ``truncated_svd`` then truncates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from loratool.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# Factors and results are numpy arrays (numpy's LAPACK, float64: no torch import for inspect,
# validate, resize and compose, issue 14); inputs may be numpy arrays or CPU torch tensors. numpy
# is imported inside the functions, so that `loratool --help` (which lists compose's rank rules)
# imports neither.
Array = Any


def _f64(x: Array) -> np.ndarray:
    """``x`` as a float64 numpy array (a torch tensor is converted by torch, which is loaded then)."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# -- the QR-core SVD ------------------------------------------------------------------------------

def _fix_signs(U: np.ndarray, Vh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic signs: the largest-magnitude entry of each column of U is positive (the first
    one on ties). U S Vh is unchanged; the factors no longer depend on the LAPACK build."""
    import numpy as np

    if U.shape[1] == 0:
        return U, Vh
    idx = np.abs(U).argmax(axis=0)
    signs = np.sign(U[idx, np.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


# How well-conditioned a tall factor must be for its R to come from the Cholesky factor of its
# Gram matrix: the Gram squares the condition number, so with cond ≤ 1e3 the singular values keep
# about 1e-10 relative accuracy (float64); worse-conditioned factors take Householder QR.
_CHOL_MIN_RATIO = 1e-3
# core_svd also forms U = B·R⁻¹·Uc, whose orthonormality loses cond² · eps: it asks for cond ≤ 100.
_CHOL_CORE_MIN_RATIO = 1e-2


def _chol_r(x: np.ndarray, min_ratio: float) -> np.ndarray | None:
    """R (n × n, upper triangular, invertible) with x = Q·R for an orthonormal Q, from the
    Cholesky factor of xᵀx, when x is tall and its computed R has σ_min/σ_max above
    ``min_ratio``; else None (the caller takes Householder QR)."""
    import numpy as np

    m, n = x.shape
    if not n or m < 4 * n:
        return None
    try:
        R = np.linalg.cholesky(x.T @ x).T
    except np.linalg.LinAlgError:
        return None
    s = np.linalg.svd(R, compute_uv=False)
    return R if s[-1] > min_ratio * s[0] else None


def _r(x: np.ndarray) -> np.ndarray:
    """R of the reduced QR of x (min(m, n) × n), up to the signs of its rows (singular values do
    not see them). A tall, well-conditioned x (every trained LoRA factor, in practice) gets it
    from the Cholesky factor of xᵀx: one BLAS-3 product, several times cheaper than Householder
    QR on a d×r factor. The check is on the computed R's own singular values: an ill-conditioned
    x cannot look well-conditioned through its Gram (its small σ² drown in rounding of σ₁²)."""
    import numpy as np

    R = _chol_r(x, _CHOL_MIN_RATIO)
    return R if R is not None else np.linalg.qr(x, mode="r")


def core_svd(B: Array, A: Array, scale: float = 1.0, keep: "int | Callable[[np.ndarray], int] | None" = None):
    """Thin SVD of scale·B@A from its factors: returns (U, S, Vh), float64 numpy arrays, with U
    d×p, S p, Vh p×k and p = min(d, r, k) ≤ r. S is descending.

    B is (d, r), A is (r, k); higher-dimensional factors (conv) must be reshaped to 2-D first.
    Correct for rank-deficient and all-zero factors (their singular values are 0, and U/Vh stay
    orthonormal). Signs follow ``_fix_signs``.

    ``keep`` (a count, or a function of S giving one): only that many leading columns of U and
    rows of Vh are formed (S stays whole): the d×p and p×k products are most of the cost when a
    truncation keeps few components.
    """
    import numpy as np

    B, A = _f64(B), _f64(A)
    # Well-conditioned tall factors (cond ≤ 100): R from the Gram's Cholesky factor and U = B·R⁻¹·Uc
    # (Q never formed; U orthonormal to ~1e-12); otherwise Householder QR.
    Rb, Ra = _chol_r(B, _CHOL_CORE_MIN_RATIO), _chol_r(A.T, _CHOL_CORE_MIN_RATIO)
    chol = Rb is not None and Ra is not None
    if not chol:
        Qb, Rb = np.linalg.qr(B)  # B = Qb Rb, Qb d×p_b
        Qa, Ra = np.linalg.qr(A.T)  # Aᵀ = Qa Ra, Qa k×p_a
    Uc, S, Vhc = np.linalg.svd((Rb @ Ra.T) * scale, full_matrices=False)
    n = S.shape[0]
    if keep is not None:
        n = max(0, min(n, keep(S) if callable(keep) else int(keep)))
    if chol:  # Qb = B·Rb⁻¹, never formed
        U = B @ np.linalg.solve(Rb, Uc[:, :n])
        Vh = (A.T @ np.linalg.solve(Ra, Vhc[:n].T)).T
    else:
        U = Qb @ Uc[:, :n]
        Vh = (Qa @ Vhc[:n].T).T
    U, Vh = _fix_signs(U, Vh)
    return U, S, np.ascontiguousarray(Vh)


def singular_values(B: Array, A: Array, scale: float = 1.0) -> np.ndarray:
    """Singular values of scale·B@A (descending, float64) from the r×r core."""
    import numpy as np

    B, A = _f64(B), _f64(A)
    return np.linalg.svd((_r(B) @ _r(A.T).T) * abs(scale), compute_uv=False)


def stack_factors(terms: Sequence[tuple[float, Array, Array]]) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) with B @ A = Σ cᵢ·Bᵢ@Aᵢ for terms (cᵢ, Bᵢ d×rᵢ, Aᵢ rᵢ×k), in float64: the
    coefficients go into B (so a negative weight flips B's columns, nothing else)."""
    import numpy as np

    if not terms:
        raise ValueError("stack_factors needs at least one term")
    B = np.concatenate([_f64(b) * c for c, b, _ in terms], axis=1)
    A = np.concatenate([_f64(a) for _, _, a in terms], axis=0)
    return B, A


def split_factors(U: Array, S: Array, Vh: Array, k: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Rank-k factors (B k-columns, A k-rows, float64 numpy) with scale·B@A = U[:, :k] diag(S[:k])
    Vh[:k]; the singular values are split evenly, √(σ/scale) into each factor, so B and A have
    equal norms (the balanced form a further fine-tune expects). Pads with zero columns when
    k > len(S)."""
    import numpy as np

    if scale <= 0:
        raise ValueError(f"split_factors: scale must be positive, got {scale}")
    U, S, Vh = _f64(U), _f64(S), _f64(Vh)
    p = min(k, S.shape[0])
    root = np.sqrt(S[:p] / scale)
    B = np.zeros((U.shape[0], k))
    A = np.zeros((k, Vh.shape[1]))
    B[:, :p] = U[:, :p] * root  # a delta of lower rank than asked: zero components after
    A[:p] = root[:, None] * Vh[:p]
    return B, A


# -- truncation: rank rules and the error they cost ---------------------------------------------

def effective_rank(S: Array, energy: float) -> int:
    """Smallest k whose top-k squared singular values hold ``energy`` of the total (0 for a zero
    delta)."""
    import numpy as np

    e = _f64(S) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = np.cumsum(e) / total
    k = int(np.searchsorted(cum, energy - 1e-12, side="left")) + 1
    return min(k, int(e.shape[0]))


def numerical_rank(S: Array, shape: tuple[int, int] | None = None) -> int:
    """Number of singular values above rounding noise: σ > σ₁·max(d, k)·eps(float64), numpy's
    ``matrix_rank`` rule. A rank-deficient module has exact zeros below that."""

    S = _f64(S)
    if S.size == 0 or float(S[0]) == 0.0:
        return 0
    n = max(shape) if shape else S.shape[0]
    tol = float(S[0]) * n * 2.220446049250313e-16
    return int((S > tol).sum())


def energy_kept(S: Array, k: int) -> float:
    """Share of ‖ΔW‖²_F (the sum of σ²) held by the top k components; 1 for a zero delta."""

    e = _f64(S) ** 2
    total = float(e.sum())
    return 1.0 if total == 0.0 else float(e[:k].sum()) / total


def truncation_error(S: Array, k: int) -> float:
    """Relative Frobenius error of the best rank-k approximation (Eckart–Young):
    √(Σ_{i>k} σᵢ²) / √(Σ σᵢ²); 0 for a zero delta."""

    e = _f64(S) ** 2
    total = float(e.sum())
    return 0.0 if total == 0.0 else math.sqrt(float(e[k:].sum()) / total)


RULES = ("rank", "energy", "sv_ratio", "sv_cumulative", "sv_fro")

# kohya sd-scripts' ``resize_lora.py --dynamic-method`` names -> the rule that means the same
# (its ``--dynamic-param`` is the rule's value).
KOHYA_DYNAMIC_METHODS = {"sv_ratio": "sv_ratio", "sv_cumulative": "sv_cumulative", "sv_fro": "sv_fro"}


# The words for each rank rule's option in messages and reports, for ``describe_rule``: the
# fields of ``RankRule`` and of extract's ``ExtractRule`` (which adds ``rel_error`` and ``budget``).
RULE_WORDS = {"rank": "rank {}", "energy": "energy {:g}", "rel_error": "rel-error {:g}", "sv_ratio": "sv-ratio {:g}",
              "sv_fro": "sv-fro {:g}", "sv_cumulative": "sv-cumulative {:g}", "budget": "budget {} bytes"}


def describe_rule(rule) -> str:
    """The rule that ``rule`` (a ``RankRule`` or anything with its fields) sets, and its
    min/max rank bounds where they are not the defaults: "energy 0.9, max rank 32"."""
    s = next(words.format(v) for field, words in RULE_WORDS.items() if (v := getattr(rule, field, None)) is not None)
    if rule.min_rank != 1:
        s += f", min rank {rule.min_rank}"
    if rule.max_rank is not None:
        s += f", max rank {rule.max_rank}"
    return s


@dataclass(frozen=True)
class RankRule:
    """How many singular components to keep: exactly one of ``rank`` (K), ``energy`` (keep that
    share of Σσ²), ``sv_ratio`` (keep σ ≥ σ₁/R), ``sv_cumulative`` (keep that share of Σσ, of the
    singular values themselves, not their squares) or ``sv_fro`` (keep that share F of the
    Frobenius norm, √(Σ_k σ²/Σσ²) ≥ F, i.e. ``energy`` F²), then bounded by ``min_rank``/
    ``max_rank``. The last three are kohya sd-scripts' ``--dynamic-method`` rules, with its
    meanings. Components below rounding noise (``numerical_rank``) never count towards the
    energy, ratio, cumulative or Frobenius rules."""

    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None
    sv_cumulative: float | None = None
    min_rank: int = 1
    max_rank: int | None = None
    sv_fro: float | None = None

    @classmethod
    def from_options(cls, rank=None, energy=None, sv_ratio=None, sv_cumulative=None, min_rank=None,
                     max_rank=None, default_rank: int | None = None, sv_fro=None) -> "RankRule":
        """Build and check a rule from command-line values, collecting every problem into one
        ``UsageError``. With no rule given, ``default_rank`` is used (or the call fails)."""
        given = {k: v for k, v in (("rank", rank), ("energy", energy), ("sv_ratio", sv_ratio),
                                   ("sv_cumulative", sv_cumulative), ("sv_fro", sv_fro)) if v is not None}
        problems = []
        if len(given) > 1:
            problems.append("give one rank rule, found " + ", ".join("--" + k.replace("_", "-") for k in given))
        if not given:
            if default_rank is None:
                problems.append("give a rank rule: --rank K, --energy E, --sv-ratio R, --sv-cumulative C "
                                "or --sv-fro F")
            else:
                given = {"rank": default_rank}
        if rank is not None and rank < 1:
            problems.append(f"--rank must be at least 1, found {rank}")
        for flag, value in (("--energy", energy), ("--sv-cumulative", sv_cumulative), ("--sv-fro", sv_fro)):
            if value is not None and not 0 < value <= 1:
                problems.append(f"{flag} must be in (0, 1], found {value}")
        if sv_ratio is not None and not sv_ratio >= 1:
            problems.append(f"--sv-ratio must be at least 1 (keep σ ≥ σ₁/R), found {sv_ratio}")
        if min_rank is not None and min_rank < 1:
            problems.append(f"--min-rank must be at least 1, found {min_rank}")
        if max_rank is not None and max_rank < 1:
            problems.append(f"--max-rank must be at least 1, found {max_rank}")
        if min_rank is not None and max_rank is not None and min_rank > max_rank:
            problems.append(f"--min-rank {min_rank} is above --max-rank {max_rank}")
        if problems:
            raise UsageError("; ".join(problems))
        return cls(**given, min_rank=min_rank or 1, max_rank=max_rank)

    def with_rank(self, k: int) -> "RankRule":
        """This rule with its rank set to ``k`` (kohya's ``--new_conv_rank``): a fixed ``rank``
        becomes k; any other rule keeps choosing, capped at k."""
        if self.rank is not None:
            return dataclasses.replace(self, rank=k, max_rank=None, min_rank=1)
        return dataclasses.replace(self, max_rank=k, min_rank=min(self.min_rank, k))

    def describe(self) -> str:
        return describe_rule(self)

    def choose(self, S: Array, shape: tuple[int, int] | None = None) -> int:
        """The rank to keep for a delta with singular values S (descending). Not capped by
        len(S): a fixed ``rank`` above it is returned as is (the caller decides what that
        means); the other rules never go above the numerical rank, but are raised to min_rank."""
        import numpy as np

        if self.rank is not None:
            k = self.rank
        else:
            S = _f64(S)
            n = numerical_rank(S, shape)
            s = S[:n]
            if n == 0:
                k = 0
            elif self.energy is not None:
                k = effective_rank(s, self.energy)
            elif self.sv_fro is not None:  # kohya: cumsum(σ²)/Σσ² reaches F²
                k = effective_rank(s, self.sv_fro ** 2)
            elif self.sv_ratio is not None:
                k = int((s >= s[0] / self.sv_ratio * (1 - 1e-12)).sum())
            else:  # kohya: cumsum(σ)/Σσ reaches C
                cum = np.cumsum(s) / s.sum()
                k = int((cum < self.sv_cumulative - 1e-12).sum()) + 1
            k = min(k, n)
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        return max(k, self.min_rank)
