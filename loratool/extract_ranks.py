"""The math of ``loratool extract`` (no I/O): the top singular triplets of a dense delta by a
randomized range finder with an exact small SVD, the rank rules, and the global budget.

Range finder (Halko, Martinsson & Tropp 2011, alg. 4.4 with the a-posteriori control of §4.3):
a seeded Gaussian sketch of ℓ = k + p columns, then passes that alternate M·Z and Mᵀ·Q, each
re-orthonormalised by a QR. Every pass but the first leaves an orthogonal projection of M in
factored form, L·C·Rᵀ with L and R orthonormal and C ℓ×ℓ (Mᵀ·Q = Z·R gives QᵀM = RᵀZᵀ; M·Z = Q·R
gives M·Z·Zᵀ = Q·R·Zᵀ), so the SVD of the small C gives the Ritz values of that pass for free:
lower bounds of the σᵢ, and the exact error of every truncation of the projection,
‖M − M_k‖²_F = ‖M‖²_F − Σ_{i≤k} σ̂ᵢ², because ‖M‖²_F is known from the delta itself.

The number of passes follows the requested accuracy: they stop when the energy the rank-k
truncation still gains per pass, extrapolated geometrically (ratio from the last two passes, or
(σ̂_ℓ/σ̂_k)² from the spectrum), says that the error kept is within ``accuracy`` (relative) of
the optimal rank-k error; that extrapolated optimum is what the report calls the optimal
truncation estimate. Oversampling grows with the rank and the accuracy. A module whose sketch
would be most of its size gets an exact (LAPACK) SVD instead.

Rules whose rank is not known in advance (--energy, --rel-error, --sv-ratio) read it off the Ritz
values and the known total energy; when the rank they want needs more of the spectrum than the
sketch holds reliably (k > ℓ − p), the sketch is redone twice as wide. ``--budget`` spends a
global size where it buys the most error reduction: greedily, by σ̂²/(bytes of one rank) over
all modules (the sum of squared errors is separable and each module's gains decrease, so the
greedy choice is optimal up to the last component that does not fit).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from loratool.errors import UsageError
from loratool.lowrank import RankRule, _fix_signs, describe_rule

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

EXACT_SHARE = 0.5  # a sketch wider than this share of min(d, n): exact SVD instead
ROW_BLOCK_BYTES = 8 << 20  # residuals are computed a block of rows at a time


# -- rules ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractRule:
    """How many components each module keeps: one of ``rank`` (K), ``energy`` (share of ‖ΔW‖²_F),
    ``rel_error`` (the smallest rank whose relative Frobenius error is ≤ ε), ``sv_ratio`` (σ ≥
    σ₁/R; resize's meaning) or ``budget`` (bytes of factors over all modules), bounded by
    ``min_rank``/``max_rank``."""

    rank: int | None = None
    energy: float | None = None
    rel_error: float | None = None
    sv_ratio: float | None = None
    budget: int | None = None
    min_rank: int = 1
    max_rank: int | None = None
    sv_fro: float | None = None  # kohya's sv_fro F: the energy rule at F²

    @classmethod
    def from_options(cls, rank=None, energy=None, sv_ratio=None, rel_error=None, budget=None, min_rank=None,
                     max_rank=None, sv_cumulative=None, sv_fro=None) -> "ExtractRule":
        """Check command-line values, every problem in one ``UsageError``."""
        problems = []
        if sv_cumulative is not None:
            problems.append("--sv-cumulative needs the sum of every singular value (a full SVD of each delta); "
                            "extract computes the leading ones only: use --energy, --rel-error or --sv-ratio")
        given = [f for f, v in (("--rank", rank), ("--energy", energy), ("--sv-ratio", sv_ratio),
                                ("--sv-fro", sv_fro), ("--rel-error", rel_error), ("--budget", budget)) if v is not None]
        if len(given) > 1:
            problems.append("give one rank rule, found " + ", ".join(given))
        if not given and sv_cumulative is None:
            problems.append("give a rank rule: --rank K, --energy E, --rel-error ε, --sv-ratio R, --sv-fro F or "
                            "--budget SIZE")
        if rel_error is not None and not 0 < rel_error < 1:
            problems.append(f"--rel-error must be in (0, 1), found {rel_error}")
        if budget is not None and budget <= 0:
            problems.append(f"--budget must be a positive size, found {budget}")
        try:  # resize's checks of --rank/--energy/--sv-ratio and the bounds
            RankRule.from_options(rank, energy, sv_ratio, None, min_rank, max_rank, default_rank=1, sv_fro=sv_fro)
        except UsageError as e:
            problems.append(e.message)
        if problems:
            raise UsageError("; ".join(problems))
        return cls(rank, energy, rel_error, sv_ratio, budget, min_rank or 1, max_rank, sv_fro)

    def describe(self) -> str:
        return describe_rule(self)

    def bound(self, k: int, full: int) -> int:
        """``k`` within min_rank/max_rank and the module's full rank."""
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        return max(1, min(max(k, self.min_rank), full))

    def choose(self, ritz: "np.ndarray", total: float, shape: tuple[int, int]) -> int:
        """The rank for a delta whose leading singular values are ``ritz`` (descending) and whose
        squared Frobenius norm is ``total``. A rank above ``len(ritz)`` says the rule needs more of
        the spectrum. Not for ``budget`` (``allocate``)."""
        import numpy as np

        full = min(shape)
        if total <= 0.0:
            return self.bound(0, full)
        if self.rank is not None:
            return self.bound(self.rank, full)
        e = np.asarray(ritz, dtype=np.float64) ** 2
        if self.rel_error is not None:
            left = total - np.cumsum(e)  # error energy of rank 1, 2, …
            ok = np.nonzero(left <= self.rel_error ** 2 * total)[0]
            k = int(ok[0]) + 1 if ok.size else len(e) + 1
            return self.bound(k, full)
        ritz = np.asarray(ritz, dtype=np.float64)
        if self.sv_ratio is not None:  # resize's rule; all Ritz values above σ₁/R: it needs more
            return self.bound(RankRule(sv_ratio=self.sv_ratio).choose(ritz, shape), full)
        # resize's energy rule on the Ritz values plus one value holding the energy they miss, so
        # that shares are those of the whole delta (that value picked: it needs more)
        tail = math.sqrt(max(total - float(e.sum()), 0.0))
        energy = self.energy if self.energy is not None else self.sv_fro ** 2
        return self.bound(RankRule(energy=energy).choose(np.append(ritz, tail), shape), full)


# -- the range finder -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Accuracy:
    """How close to the optimal truncation the factors must be: ``tolerance`` is the relative
    excess of the error kept over the (estimated) optimal rank-k error at which passes stop."""

    tolerance: float = 1e-3

    def oversample(self, k: int) -> int:
        return max(8, k // 2) if self.tolerance <= 1e-2 else max(5, k // 4)

    @property
    def max_passes(self) -> int:
        """Passes over the delta (each one product with ℓ columns): 2 + 2q, q the power
        iterations, at most ~2·log₁₀(1/tolerance)."""
        q = max(1, math.ceil(2 * math.log10(1 / min(self.tolerance, 0.5))))
        return 2 + 2 * q


@dataclass
class Sketch:
    """The leading part of one delta's SVD, U·diag(S)·Vh with U = left·Uc and Vh = Vch·rightᵀ
    (``left``/``right``: orthonormal bases of the sketch, float32 or float64; ``Uc``/``Vch``: the
    small SVD, float64; None for an exact SVD, whose ``left``/``right`` are U and Vhᵀ). The Ritz
    values S are exact singular values of an orthogonal projection of M."""

    left: "np.ndarray"
    Uc: "np.ndarray | None"
    S: "np.ndarray"
    Vch: "np.ndarray | None"
    right: "np.ndarray"
    total: float  # ‖M‖²_F (float64)
    reliable: int  # leading values a rule may use (ℓ − p; all of them when exact)
    passes: int  # products with M (0: exact SVD)
    sketch_size: int  # ℓ (0: exact SVD)
    remaining: float = 0.0  # estimated energy the rank-k truncation would still gain (the optimum's)

    @property
    def exact(self) -> bool:
        return self.passes == 0

    def error(self, k: int) -> float:
        """Relative Frobenius error of the rank-k truncation of the projection."""
        if self.total <= 0.0:
            return 0.0
        return math.sqrt(max(self.total - float((self.S[:k] ** 2).sum()), 0.0) / self.total)

    def optimal_error(self, k: int) -> float:
        """Estimate of the optimal rank-k error (‖M − [M]_k‖/‖M‖): exact for an exact SVD."""
        if self.total <= 0.0:
            return 0.0
        left = self.total - float((self.S[:k] ** 2).sum()) - (0.0 if self.exact else self.remaining)
        return math.sqrt(max(left, 0.0) / self.total)


# -- the array backends ---------------------------------------------------------------------------
# The range finder is written once against these few operations; a delta is a numpy array (the
# CPU path, which never imports torch) or a torch tensor (on CUDA, or on the CPU when forced).
# Both draw the same Gaussian sketch from the same numpy generator, and both take the small ℓ×ℓ
# SVD with LAPACK on the host in float64 (tiny; cuSOLVER is slower there), so that they pick the
# same ranks from the same Ritz values up to the rounding of the big products.

class _NumpyOps:
    name = "numpy"

    @staticmethod
    def qr(x):
        import numpy as np

        return np.linalg.qr(x, mode="reduced")

    @staticmethod
    def gaussian(rng, shape, like):
        return rng.standard_normal(shape).astype(like.dtype, copy=False)

    @staticmethod
    def sumsq(block) -> float:
        import numpy as np

        b = block.ravel().astype(np.float64)  # float32 sums lose the small errors' digits
        return float(np.dot(b, b))

    @staticmethod
    def host(x):
        """A float64 numpy array."""
        import numpy as np

        return np.asarray(x, dtype=np.float64)

    @staticmethod
    def put(x, like, f64: bool = False):
        """The numpy array ``x`` as ``like``'s kind of array, in its dtype (or float64) and on its
        device."""
        import numpy as np

        return x.astype(np.float64 if f64 else like.dtype, copy=False)

    @staticmethod
    def f64(x):
        import numpy as np

        return x.astype(np.float64, copy=False)

    @staticmethod
    def svd(M, small: bool):
        import numpy as np

        return np.linalg.svd(M.astype(np.float64) if small else M, full_matrices=False)


class _TorchOps:
    name = "torch"

    @staticmethod
    def qr(x):
        import torch

        return torch.linalg.qr(x, mode="reduced")

    @staticmethod
    def gaussian(rng, shape, like):
        import torch

        return torch.from_numpy(rng.standard_normal(shape)).to(device=like.device, dtype=like.dtype)

    @staticmethod
    def sumsq(block) -> float:
        b = block.reshape(-1).double()
        return float(b @ b)

    @staticmethod
    def host(x):
        import numpy as np

        return np.asarray(x.detach().double().cpu().numpy()) if hasattr(x, "detach") else np.asarray(x, np.float64)

    @staticmethod
    def put(x, like, f64: bool = False):
        import torch

        return torch.from_numpy(x).to(device=like.device, dtype=torch.float64 if f64 else like.dtype)

    @staticmethod
    def f64(x):
        return x.double()

    @staticmethod
    def svd(M, small: bool):
        import torch

        return torch.linalg.svd(M.double() if small else M, full_matrices=False)


def ops(M):
    """The backend of the array ``M`` (torch's only for a torch tensor: numpy never loads it)."""
    return _TorchOps if type(M).__module__.startswith("torch") else _NumpyOps


def frobenius2(M) -> float:
    """‖M‖²_F in float64, a block of rows at a time (no float64 copy of M)."""
    xp = ops(M)
    rows = max(1, ROW_BLOCK_BYTES // max(1, M.shape[1] * M.itemsize))
    return sum((xp.sumsq(M[i:i + rows]) for i in range(0, M.shape[0], rows)), 0.0)


def _project(L, C, R, total: float, reliable: int, passes: int, ell: int) -> Sketch:
    """The projection L·C·Rᵀ with the SVD of its small C (float64, LAPACK, on the host)."""
    import numpy as np

    Uc, S, Vch = np.linalg.svd(ops(C).host(C), full_matrices=False)
    return Sketch(L, Uc, S, Vch, R, total, reliable, passes, ell)


def exact_svd(M, total: float) -> Sketch:
    """The SVD of the whole delta (LAPACK, or cuSOLVER on CUDA; float64 for small ones)."""
    xp = ops(M)
    U, S, Vh = xp.svd(M, math.prod(M.shape) <= 1 << 22)
    return Sketch(U, None, xp.host(S), None, Vh.T, total, len(S), 0, 0)


def _remaining(energies: list[float], ratio_spec: float) -> float:
    """Energy the truncation would still gain, extrapolated from its growth over the passes."""
    if len(energies) < 2:
        return math.inf
    d2 = energies[-1] - energies[-2]
    if d2 <= 0:
        return 0.0
    r = ratio_spec
    if len(energies) >= 3:
        d1 = energies[-2] - energies[-3]
        r = max(r, d2 / d1 if d1 > 0 else 1.0)
    if r >= 1:
        return math.inf
    return d2 * r / (1 - r)


def range_finder(M: "np.ndarray", k_of: Callable[["np.ndarray", float], int], k0: int, accuracy: Accuracy,
                 rng: "np.random.Generator", total: float | None = None) -> tuple[Sketch, int]:
    """The leading SVD of ``M`` for the rank ``k_of(ritz, total)`` asks (a first guess ``k0``),
    as a ``Sketch``, and that rank. Seeded by ``rng``; M is float32 or float64 and computed in its
    dtype, the small SVDs in float64."""

    d, n = M.shape
    full = min(d, n)
    xp = ops(M)
    total = frobenius2(M) if total is None else total
    k = max(1, min(k0, full))
    while True:
        p = accuracy.oversample(k)
        ell = k + p
        if ell > EXACT_SHARE * full or total == 0.0:
            sk = exact_svd(M, total)
            return sk, min(k_of(sk.S, total), full)
        omega = xp.gaussian(rng, (n, ell), M)
        Q, _ = xp.qr(M @ omega)
        passes, energies, last = 1, [], None
        while True:
            # Mᵀ·Q = Z·R: the projection Q·Qᵀ·M = Q·Rᵀ·Zᵀ
            Z, R = xp.qr(M.T @ Q)
            passes += 1
            sk = _project(Q, R.T, Z, total, ell - p, passes, ell)
            last = sk
            if _settled(sk, energies, k_of, accuracy) or passes >= accuracy.max_passes:
                break
            # M·Z = Q·R: the projection M·Z·Zᵀ = Q·R·Zᵀ
            Q, R = xp.qr(M @ Z)
            passes += 1
            sk = _project(Q, R, Z, total, ell - p, passes, ell)
            last = sk
            if _settled(sk, energies, k_of, accuracy) or passes >= accuracy.max_passes:
                break
        want = k_of(last.S, total)
        if want <= ell - p or ell >= full:
            return last, min(want, full)
        k = max(2 * k, want)  # the rule wants more of the spectrum than this sketch holds


def _settled(sk: Sketch, energies: list[float], k_of, accuracy: Accuracy) -> bool:
    """Record this pass's energy for the rank the rule picks now; whether the error kept is
    within ``accuracy`` of the extrapolated optimum (``sk.remaining`` is set)."""
    k = min(k_of(sk.S, sk.total), sk.reliable)
    e = float((sk.S[:k] ** 2).sum())
    energies.append(e)
    ratio_spec = 0.0
    if k < len(sk.S) and sk.S[k - 1] > 0:
        ratio_spec = float(sk.S[-1] / sk.S[k - 1]) ** 2
    sk.remaining = min(_remaining(energies, ratio_spec), max(sk.total - e, 0.0))
    err2 = max(sk.total - e, 0.0)
    if sk.total == 0.0 or err2 <= 1e-12 * sk.total:
        return len(energies) >= 1
    ours = math.sqrt(err2)
    best = math.sqrt(max(err2 - sk.remaining, 0.0))
    return ours - best <= accuracy.tolerance * ours


def factors(sk: Sketch, k: int) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """(U d×k, S k, Vh k×n), float64 numpy arrays on the host, signs as ``lowrank._fix_signs``
    (a torch sketch forms them on its device in float64: the same single rounding to the output
    dtype follows for both backends)."""
    import numpy as np

    xp = ops(sk.left)
    if sk.Uc is None:
        U, Vh = xp.host(sk.left[:, :k]), xp.host(sk.right[:, :k]).T
    elif xp is _NumpyOps:
        left, right = sk.left.astype(np.float64, copy=False), sk.right.astype(np.float64, copy=False)
        U, Vh = left @ sk.Uc[:, :k], sk.Vch[:k] @ right.T
    else:
        left, right = sk.left.double(), sk.right.double()
        U = xp.host(left @ xp.put(np.ascontiguousarray(sk.Uc[:, :k]), left))
        Vh = xp.host(xp.put(np.ascontiguousarray(sk.Vch[:k]), right) @ right.T)
    U, Vh = _fix_signs(U, Vh)
    return U, sk.S[:k], np.ascontiguousarray(Vh)


def residual(M, U: "np.ndarray", S: "np.ndarray", Vh: "np.ndarray", total: float | None = None) -> float:
    """‖M − U·diag(S)·Vh‖_F / ‖M‖_F computed on M itself (a block of rows at a time, in float64,
    on M's device), so that the error reported does not rely on the Ritz values' rounding, nor on
    a float32 product's (which would leave an error of 1e-3 only ~4 digits)."""
    import numpy as np

    xp = ops(M)
    total = frobenius2(M) if total is None else total
    if total == 0.0:
        return 0.0
    SV = xp.put(np.ascontiguousarray(S[:, None] * Vh), M, f64=True)
    Uc = xp.put(np.ascontiguousarray(U), M, f64=True)
    rows = max(1, ROW_BLOCK_BYTES // max(1, M.shape[1] * 8))
    err = sum((xp.sumsq(xp.f64(M[i:i + rows]) - Uc[i:i + rows] @ SV) for i in range(0, M.shape[0], rows)), 0.0)
    return math.sqrt(err / total)


# -- the global budget ------------------------------------------------------------------------------

def allocate(costs: list[int], spectra: list["np.ndarray"], caps: list[int], budget: int, min_rank: int = 1
             ) -> list[int]:
    """Ranks, one per module, whose total cost (Σ kᵢ·costᵢ bytes) stays within ``budget`` and
    that remove the most squared error: every module starts at ``min_rank`` (capped), then the
    component with the largest σ²/cost that still fits is added, until none does. ``spectra``:
    each module's leading singular values (descending), ``caps``: the most each may get."""
    ranks = [min(min_rank, c) for c in caps]
    spent = sum(k * c for k, c in zip(ranks, costs))
    if spent > budget:
        raise UsageError(f"--budget {budget} bytes is below what rank {min_rank} everywhere costs ({spent} bytes "
                         f"for {len(costs)} modules); raise the budget or lower --min-rank")
    heap = []
    for i, (s, k) in enumerate(zip(spectra, ranks)):
        if k < min(caps[i], len(s)):
            heapq.heappush(heap, (-float(s[k]) ** 2 / costs[i], i))
    while heap:
        _, i = heapq.heappop(heap)
        if spent + costs[i] > budget:
            continue  # this module's next component does not fit; a cheaper module's may
        ranks[i] += 1
        spent += costs[i]
        k, s = ranks[i], spectra[i]
        if k < min(caps[i], len(s)):
            heapq.heappush(heap, (-float(s[k]) ** 2 / costs[i], i))
    return ranks
