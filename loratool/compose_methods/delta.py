"""Compose methods on dense deltas: PEFT's ``*_svd`` combination types (``ties``, ``dare_linear``,
``dare_ties``, ``magnitude_prune``).

Each is a pruning of every input's delta and a combination of the pruned deltas, the functions of
``peft/utils/merge_utils.py``, on the dense float32 deltas of one module at a time, then a
truncated SVD to ``--rank``. DARE's masks and the sketch come from a generator seeded by (seed,
module name): a run is reproducible and does not depend on module order. PEFT's plain ``ties``,
``dare_*`` and ``magnitude_prune`` (no ``_svd``) prune and combine the A and B factors separately
instead; that is not offered.

Speed (issue 14: a TIES compose of two 154-module adapters took 549 s). The merge gives the values
PEFT's functions give (the same products, sums and divisions, in the same order; DARE draws the
same uniforms as PEFT's ``torch.bernoulli``), but computed in place, without stacked copies, and in
row blocks that stay in cache (each elementwise pass over a whole 2048×5632 delta streams 46 MB).
Magnitude pruning finds its threshold by a partition (``numpy.partition``) instead of ``topk``;
where entries tie at the threshold it keeps the first in row-major order, where PEFT's ``topk``
keeps an unspecified subset of them (the same count; the values differ only in which of the equal
magnitudes survive). The truncation is a randomized SVD whose sketch starts from the inputs' row
spaces (the Aᵢ) besides the Gaussian columns: the merged delta lies near span(Aᵢ), so two power
iterations (6 passes over it, where the plain sketch took 4 iterations, 10 passes) keep the energy
PEFT's full SVD keeps to ~1e-5, and the span holds that of the plain Gaussian sketch, so it is
never worse than one with as many iterations (Halko et al. 2011, §4).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Sequence

from loratool.compose_methods.base import (
    ComposeMethod,
    Composed,
    ComposeOptions,
    Factors,
    get_method,
    module_seed,
    register,
)
from loratool.lowrank import split_factors

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import torch

BLOCK = 1 << 18  # entries per block of the elementwise passes: ~1 MiB of float32, so a block's
# several passes run in cache instead of each streaming the whole delta from memory
OVERSAMPLE = 10  # Gaussian columns beyond the rank in the sketch (Halko et al.'s p)
POWER_ITERATIONS = 2  # with the Aᵢ in the sketch, two reach the full SVD's energy to ~1e-5 (a test)


def _blocks(n: int) -> list[slice]:
    return [slice(i, min(i + BLOCK, n)) for i in range(0, n, BLOCK)]


class _Buffers(threading.local):
    """Float32 buffers of one thread, reused from module to module: a fresh 46 MB tensor is mapped
    by malloc and faulted in page by page, which costs as much as the arithmetic on it."""

    def __init__(self):
        self.flat: dict[str, "torch.Tensor"] = {}

    def get(self, slot: str, shape) -> "torch.Tensor":
        import torch

        n = math.prod(shape)
        t = self.flat.get(slot)
        if t is None or t.numel() < n:
            t = self.flat[slot] = torch.empty(n, dtype=torch.float32)
        return t[:n].view(shape)


_THREAD_BUFFERS = _Buffers()


def _buffers() -> _Buffers:
    """Reused buffers in worker threads (they end with the compose that started them, and their
    buffers with them); in the main thread, fresh ones per call, so that nothing outlives it."""
    return _THREAD_BUFFERS if threading.current_thread() is not threading.main_thread() else _Buffers()


# -- PEFT's pruning and combination (peft/utils/merge_utils.py), in place -------------------------

class MagnitudeThreshold:
    """PEFT's magnitude_based_pruning of one delta (keep the k = int(density·numel) largest
    magnitudes: t·mask), split in two: the threshold is found once (a partition of the
    magnitudes, in ``scratch``), then ``apply`` prunes the delta block by block, in row-major order.
    Of the entries equal to the k-th largest magnitude, the first in row-major order are kept
    (PEFT's topk keeps an unspecified subset of them: the same count, the same values elsewhere)."""

    def __init__(self, t: "torch.Tensor", density: float, scratch: "torch.Tensor | None" = None):
        import numpy as np
        import torch

        flat = t.reshape(-1)
        n, k = flat.numel(), int(density * flat.numel())
        self.keep_all, self.keep_none, self.ties = density >= 1, k <= 0, None
        if self.keep_all or self.keep_none:
            return
        a = (torch.empty_like(flat) if scratch is None else scratch).view(-1)
        torch.abs(flat, out=a)
        values = a.numpy()
        values.partition(n - k)  # ascending around n-k: values[n-k] is the k-th largest magnitude
        self.threshold = thr = float(values[n - k])
        # More entries than k reach the threshold when some below the cut equal it (frequent: the
        # products of bf16 factors repeat float32 values): keep as many as the top k holds.
        if thr > 0 and values[: n - k].max() == thr:
            self.ties = int(np.count_nonzero(values[n - k:] == thr))

    def apply(self, x: "torch.Tensor") -> None:
        """Prune the next block of the delta (contiguous), in place."""
        import torch

        if self.keep_all:
            return
        if self.keep_none:
            x.mul_(0.0)
            return
        m = torch.abs(x)
        drop = None
        if self.ties is not None:
            equal = m == self.threshold
            count = int(equal.sum())
            if count > self.ties:
                drop = equal.view(-1).nonzero().view(-1)[self.ties:]
            self.ties = max(self.ties - count, 0)
        torch.ge(m, self.threshold, out=m)  # 1.0 where kept: PEFT multiplies by its 0/1 mask too
        x.mul_(m)
        if drop is not None:
            x.view(-1)[drop] = 0.0


def magnitude_prune_(t: "torch.Tensor", density: float, scratch: "torch.Tensor | None" = None) -> "torch.Tensor":
    """``MagnitudeThreshold`` of contiguous float32 ``t``, applied in place. ``scratch``: float32
    of t's size, overwritten."""
    threshold = MagnitudeThreshold(t, density, scratch)
    flat = t.view(-1)
    for b in _blocks(flat.numel()):
        threshold.apply(flat[b])
    return t


def random_prune_(t: "torch.Tensor", density: float, generator: "torch.Generator | None" = None,
                  scratch: "torch.Tensor | None" = None) -> "torch.Tensor":
    """DARE, in place: keep each entry with probability density and rescale by 1/density (PEFT's
    random_pruning with rescale=True). The uniforms are drawn from ``generator`` in row-major
    order, block after block: the draws and the mask of ``torch.bernoulli(full_like(t, density))``
    (PEFT's, on the CPU), so ``generator=None`` (the global RNG) gives PEFT's result exactly."""
    import torch

    if density >= 1:
        return t
    flat = t.view(-1)
    a = (torch.empty_like(flat) if scratch is None else scratch).view(-1)
    for b in _blocks(flat.numel()):
        x, m = flat[b], a[b]
        torch.rand(m.shape, generator=generator, out=m)
        torch.lt(m, density, out=m)
        x.mul_(m).div_(density)
    return t


def _weighted_sum(o: "torch.Tensor", ps: Sequence["torch.Tensor"], weights: Sequence[float],
                  majority_sign_method: str) -> None:
    """o = Σ wᵢ·pᵢ of the pruned deltas (PEFT's task_arithmetic), on one block; pᵢ are overwritten."""
    import torch

    torch.mul(ps[0], weights[0], out=o)
    for p, w in zip(ps[1:], weights[1:]):
        o.add_(p.mul_(w))


def _disjoint_mean(o: "torch.Tensor", ps: Sequence["torch.Tensor"], weights: Sequence[float],
                   majority_sign_method: str) -> None:
    """TIES on one block: elect a sign per entry ("total": the sign of the sum of the pruned,
    unweighted deltas; "frequency": the most frequent sign; ≥ 0 elects +), then o = the mean of
    the weighted entries that agree with it (PEFT's calculate_majority_sign_mask and
    disjoint_merge). The 0/1 masks make every product but wᵢ·pᵢ exact, so PEFT's values come out
    whatever the order of the fused multiply-adds."""
    import torch

    s, a, c = (torch.empty_like(o) for _ in range(3))
    if majority_sign_method == "total":
        torch.add(ps[0], ps[1], out=s) if len(ps) > 1 else s.copy_(ps[0])
        for p in ps[2:]:
            s.add_(p)
    elif majority_sign_method == "frequency":
        torch.sign(ps[0], out=s)
        for p in ps[1:]:
            s.add_(torch.sign(p))
    else:
        raise ValueError(f"unknown majority sign method {majority_sign_method!r}")
    torch.ge(s, 0, out=s)
    s.mul_(2).sub_(1)  # the elected sign, ±1
    for i, (p, w) in enumerate(zip(ps, weights)):
        torch.mul(p, s, out=a)
        torch.gt(a, 0, out=a)  # 1.0 where sign(p) is the elected one (a pruned zero never is)
        if i == 0:
            torch.mul(p, w, out=o).mul_(a)  # PEFT's order: (wᵢ·pᵢ)·mask
            a, c = c, a  # the first mask starts the count
        else:
            o.addcmul_(p.mul_(w), a)
            c.add_(a)
    o.div_(c.clamp_(min=1.0))


def _rows(t: "torch.Tensor") -> "torch.Tensor":
    return t.view(t.shape[0], -1) if t.dim() >= 2 else t.view(1, -1)


def _combine(combine, out: "torch.Tensor", pruned: Sequence["torch.Tensor"], weights: Sequence[float],
             majority_sign_method: str, thresholds: Sequence["MagnitudeThreshold | None"] = (),
             each_block=None) -> None:
    """``combine`` the pruned deltas into ``out``, a block of whole rows at a time (pruning each
    block first by its ``thresholds``, then ``each_block(rows, block)``, while it is in cache)."""
    o2 = _rows(out)
    step = max(1, BLOCK // max(o2.shape[1], 1))
    for i in range(0, o2.shape[0], step):
        rows = slice(i, min(i + step, o2.shape[0]))
        o = o2[rows]
        ps = [_rows(p)[rows] for p in pruned]
        for p, threshold in zip(ps, thresholds):
            if threshold is not None:
                threshold.apply(p)
        combine(o, ps, weights, majority_sign_method)
        if each_block is not None:
            each_block(rows, o)


# -- the truncation -------------------------------------------------------------------------------

def _fix_signs(U: "numpy.ndarray", Vh: "numpy.ndarray"):
    """The largest-magnitude entry of each column of U positive (the first on ties), as
    ``lowrank`` does: the factors do not depend on the LAPACK build."""
    import numpy as np

    if U.shape[1] == 0:
        return U, Vh
    signs = np.sign(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def test_matrix(shape: tuple[int, int], k: int, row_spaces: Sequence["torch.Tensor"] = (),
                generator: "torch.Generator | None" = None, oversample: int = OVERSAMPLE) -> "torch.Tensor | None":
    """The sketch's test matrix for the top-k SVD of an m×n matrix: orthonormal columns spanning
    [R₁ᵀ … Rⱼᵀ G], ``row_spaces`` Rᵢ (rᵢ×n, whose rows span where the matrix's rows mostly lie:
    the inputs' A factors) and a Gaussian G of min(k, m, n)+oversample columns drawn from
    ``generator``; None when it would be as wide as min(m, n) (the exact SVD is then as cheap)."""
    import torch

    m, n = shape
    p = min(k, m, n)
    if sum(r.shape[0] for r in row_spaces) + p + oversample >= min(m, n):
        return None
    G = torch.randn(n, p + oversample, dtype=torch.float32, generator=generator)
    return torch.linalg.qr(torch.cat([r.to(torch.float32).T for r in row_spaces] + [G], dim=1))[0]


def truncated_svd(M: "torch.Tensor", k: int, omega: "torch.Tensor | None", sketch: "torch.Tensor | None" = None,
                  n_iter: int = POWER_ITERATIONS):
    """Top-k SVD of a dense float32 m×n ``M``: float64 numpy U m×p, S p, Vh p×n, p = min(k, m, n),
    signs as ``_fix_signs``. With a ``test_matrix`` ``omega``, a randomized SVD (Halko, Martinsson
    & Tropp 2011, alg. 4.4): the range of the sketch M·omega (``sketch``, when the caller has
    computed it), ``n_iter`` power iterations with QR re-orthonormalisation, the SVD of Qᵀ·M;
    without one, the exact SVD. U diag(S) Vh is the projection of M on span(U), so
    ‖M − U S Vh‖²_F = ‖M‖²_F − ΣS² up to rounding."""
    import torch

    m, n = M.shape
    p = min(k, m, n)
    if omega is None:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        U, S, Vh = U[:, :p], S[:p], Vh[:p]
    else:
        Q = torch.linalg.qr(M @ omega if sketch is None else sketch)[0]
        for _ in range(n_iter):
            Q = torch.linalg.qr(M @ torch.linalg.qr(M.T @ Q)[0])[0]
        Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
        U, S, Vh = Q @ Ub[:, :p], S[:p], Vh[:p]
    U, Vh = _fix_signs(U.to(torch.float64).numpy(), Vh.to(torch.float64).numpy())
    return U, S.to(torch.float64).numpy(), Vh


# -- the methods ----------------------------------------------------------------------------------

class DeltaMethod(ComposeMethod):
    """Prune each dense delta (by magnitude, or DARE's ``random_pruning``), combine them
    (``combine``), truncate by a randomized SVD. A subclass names the two; ``merge`` is the part
    PEFT computes before its SVD."""

    rank_rules = ("rank",)
    rule_note = "its merged delta is full rank, and an energy or singular-value rule would need its full SVD"
    takes_density = True
    dense = True
    seeded = True
    random_pruning = False  # DARE: seeded random pruning; else magnitude pruning
    combine = staticmethod(_weighted_sum)

    def merge_(self, out: "torch.Tensor", deltas: Sequence["torch.Tensor"], weights: Sequence[float],
               density: float = 1.0, majority_sign_method: str = "total",
               generator: "torch.Generator | None" = None, scratch: "torch.Tensor | None" = None,
               each_block=None) -> "torch.Tensor":
        """``merge`` into ``out``, pruning and then overwriting ``deltas`` (contiguous float32 of
        out's shape) in place; ``scratch``, of the same size, is overwritten. ``each_block(rows,
        block)`` is called on each block of rows of ``out`` once it is final."""
        if self.random_pruning:  # drawn input after input, as PEFT draws them
            for d in deltas:
                random_prune_(d, density, generator, scratch)
            thresholds = ()
        else:  # the thresholds first; each block is pruned when it is combined
            thresholds = [MagnitudeThreshold(d, density, scratch) for d in deltas]
        _combine(self.combine, out, deltas, weights, majority_sign_method, thresholds, each_block)
        return out

    def merge(self, deltas: Sequence["torch.Tensor"], weights: Sequence[float], density: float = 1.0,
              majority_sign_method: str = "total", generator: "torch.Generator | None" = None) -> "torch.Tensor":
        """The merged dense delta of one module (PEFT's merge_utils function of this method), in
        float32; ``deltas`` are left as they are."""
        import torch

        work = [d.to(torch.float32, copy=True).contiguous() for d in deltas]
        return self.merge_(torch.empty_like(work[0]), work, weights, density, majority_sign_method, generator)

    def compose(self, name: str, factors: Sequence[Factors], options: ComposeOptions) -> Composed:
        import torch

        d_out, d_in = factors[0].B2.shape[0], factors[0].A2.shape[1]
        k = max(1, min(options.rule.rank, d_out, d_in))
        g = torch.Generator().manual_seed(module_seed(options.seed, name))
        omega = test_matrix((d_out, d_in), k, [f.A2 for f in factors], g)
        buffers = _buffers()
        # PEFT computes get_delta_weight in float32 (upcasting half precision on the CPU): (B@A)·scale
        deltas = []
        for i, f in enumerate(factors):
            d = torch.mm(f.B2.to(torch.float32), f.A2.to(torch.float32), out=buffers.get(f"delta{i}", (d_out, d_in)))
            deltas.append(d.mul_(f.scale))
        # the sketch M·omega and ‖M‖² (in float64) are taken from each block of M while it is in cache
        sketch = None if omega is None else torch.empty(d_out, omega.shape[1])
        norm2 = [0.0]

        def each_block(rows, block):
            x = block.reshape(-1).to(torch.float64)
            norm2[0] += float(torch.dot(x, x))
            if sketch is not None:
                torch.mm(block, omega, out=sketch[rows])

        M = self.merge_(buffers.get("merged", (d_out, d_in)), deltas, [f.weight for f in factors], options.density,
                        options.majority_sign_method, g, buffers.get("scratch", (d_out, d_in)), each_block)
        del deltas
        U, S, Vh = truncated_svd(M, k, omega, sketch)
        B2, A2 = split_factors(U, S, Vh, k)
        n2 = norm2[0]
        error = 0.0 if n2 == 0 else math.sqrt(max(n2 - float((S ** 2).sum()), 0.0) / n2)
        return Composed(B2, A2, error)


@register
class Ties(DeltaMethod):
    name = "ties"
    peft_aliases = ("ties_svd",)
    summary = "TIES of the dense deltas (magnitude pruning, sign election, disjoint mean), randomized SVD"
    combine = staticmethod(_disjoint_mean)


@register
class DareLinear(DeltaMethod):
    name = "dare_linear"
    peft_aliases = ("dare_linear_svd",)
    summary = "DARE (seeded random pruning, rescaled), weighted sum, randomized SVD"
    random_pruning = True


@register
class DareTies(DeltaMethod):
    name = "dare_ties"
    peft_aliases = ("dare_ties_svd",)
    summary = "DARE pruning, TIES sign election and disjoint mean, randomized SVD"
    random_pruning = True
    combine = staticmethod(_disjoint_mean)


@register
class MagnitudePrune(DeltaMethod):
    name = "magnitude_prune"
    peft_aliases = ("magnitude_prune_svd",)
    summary = "magnitude pruning, weighted sum, randomized SVD"


def merge_deltas(deltas: Sequence["torch.Tensor"], weights: Sequence[float], method: str, density: float = 1.0,
                 majority_sign_method: str = "total", generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """The merged dense delta of a dense-delta method (by name or PEFT alias), as PEFT's
    merge_utils computes it before the SVD of its ``*_svd`` combination types."""
    m = get_method(method)
    if not isinstance(m, DeltaMethod):
        raise ValueError(f"{method!r} is not a dense-delta merge method")
    return m.merge(deltas, weights, density, majority_sign_method, generator)
