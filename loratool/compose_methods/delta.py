"""Compose methods on dense deltas: PEFT's ``*_svd`` combination types (``ties``, ``dare_linear``,
``dare_ties``, ``magnitude_prune``).

Each is a pruning of every input's delta and a combination of the pruned deltas, the functions of
``peft/utils/merge_utils.py``, on the dense float32 deltas of one module at a time, then a
truncated SVD to ``--rank``. DARE's masks and the sketch come from a generator seeded by (seed,
module name): a run is reproducible and does not depend on module order. PEFT's plain ``ties``,
``dare_*`` and ``magnitude_prune`` (no ``_svd``) prune and combine the A and B factors separately
instead; that is not offered.

Speed (issue 14: a TIES compose of two 154-module adapters took 549 s). The merge gives the values
PEFT's functions give (the same products, sums and divisions, in the same order), computed in
place, without stacked copies, and in row blocks that stay in cache. Magnitude pruning finds its
threshold by a partition (``numpy.partition``) instead of ``topk``; where entries tie at the
threshold it keeps the first in row-major order (PEFT's ``topk`` keeps an unspecified subset of
them: the same count). ``merge``/``merge_deltas`` draw DARE's masks as PEFT's ``torch.bernoulli``
does (from the global RNG: PEFT's result exactly); ``compose`` forms, masks and combines each
block of rows of the deltas in one pass, its Bernoulli masks from 32 random bits per entry of a
numpy PCG64 stream per input (``dare_fill``). The truncation is a randomized SVD whose sketch
starts from the inputs' row spaces (the Aᵢ), with p Gaussian columns fewer when they span the
rank (``test_matrix``), and which stops at the first step that no longer adds energy
(``truncated_svd``): 3 products with the merged delta on most modules, where the fixed two power
iterations took 6.
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
TOLERANCE = 1e-5  # the randomized SVD stops at a step that adds at most this share of its energy (or error's)
MAX_STEPS = 10  # ... or after this many products with M (the fixed two power iterations took 5 besides the sketch)


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

        from loratool.kernels import cpu as native  # numpy: imported when a delta is pruned, not before

        flat = t.reshape(-1)
        n, k = flat.numel(), int(density * flat.numel())
        self.keep_all, self.keep_none, self.ties = density >= 1, k <= 0, None
        if self.keep_all or self.keep_none:
            return
        if flat.dtype == torch.float32 and flat.is_contiguous() and flat.device.type == "cpu":
            got = native.kth_largest_abs(flat.numpy(), k)  # the C radix select, where it is built
            if got is not None:
                self.threshold, above, equal = got
                # k - above of the entries equal to it are among the top k; the others lie below
                if self.threshold > 0 and equal > k - above:
                    self.ties = k - above
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


def block_rows(width: int) -> int:
    """Rows of a block of the elementwise passes over a d×``width`` delta."""
    return max(1, BLOCK // max(width, 1))


def dare_generators(seed: int, n: int) -> list:
    """DARE's mask generators in ``compose``: one numpy PCG64 stream per input, from a module's
    seed (``module_seed``), so the masks do not depend on the order of the modules."""
    import numpy as np

    return [np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(n)]


def dare_fill(factors: Sequence[Factors], density: float, generators: Sequence) -> "callable":
    """``_combine``'s ``fill`` for DARE in ``compose``: each input's delta rows (B2[rows]·A2·scale,
    PEFT's get_delta_weight in float32), pruned as PEFT's random_pruning with rescale (each entry
    kept with probability ``density``, then divided by it). Each entry draws 32 bits from its
    input's generator, in row-major order, and is kept where they are below density·2³²: a
    Bernoulli(density) mask, as PEFT's ``torch.bernoulli``, 3 to 4 times faster than torch's
    uniforms (the draws differ from torch's: a seed gives other masks than PEFT's global RNG)."""
    import numpy as np
    import torch

    cut = min(int(round(density * 2.0 ** 32)), 2 ** 32)

    def fill(rows, blocks):
        for f, x, gen in zip(factors, blocks, generators):
            torch.mm(f.B2[rows], f.A2, out=x).mul_(f.scale)
            if density < 1:
                n = x.numel()
                bits = gen.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
                x.view(-1).mul_(torch.from_numpy(bits < cut)).div_(density)

    return fill


def _rows(t: "torch.Tensor") -> "torch.Tensor":
    return t.view(t.shape[0], -1) if t.dim() >= 2 else t.view(1, -1)


def _combine(combine, out: "torch.Tensor", pruned: Sequence["torch.Tensor"], weights: Sequence[float],
             majority_sign_method: str, thresholds: Sequence["MagnitudeThreshold | None"] = (),
             each_block=None, fill=None) -> None:
    """``combine`` the pruned deltas into ``out``, a block of whole rows at a time (pruning each
    block first by its ``thresholds``, then ``each_block(rows, block)``, while it is in cache).
    With ``fill``, ``pruned`` are buffers of one block (``block_rows`` rows) that ``fill(rows,
    blocks)`` computes, each block in turn: the dense deltas are never formed whole."""
    o2 = _rows(out)
    step = block_rows(o2.shape[1])
    for i in range(0, o2.shape[0], step):
        rows = slice(i, min(i + step, o2.shape[0]))
        o = o2[rows]
        if fill is None:
            ps = [_rows(p)[rows] for p in pruned]
        else:
            ps = [_rows(p)[: o.shape[0]] for p in pruned]
            fill(rows, ps)
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
    the inputs' A factors) and a Gaussian G drawn from ``generator``: p + oversample columns
    (p = min(k, m, n)), or only ``oversample`` when the row spaces span p dimensions or more
    (they then take the place of p Gaussian columns, and each column costs a share of every
    product with the matrix); None when it would be as wide as min(m, n) (the exact SVD is then
    as cheap)."""
    import torch

    m, n = shape
    p = min(k, m, n)
    rows = sum(r.shape[0] for r in row_spaces)
    if rows + p + oversample >= min(m, n):
        return None
    spans = [r.to(torch.float32).T for r in row_spaces]
    # the row spaces replace p of the Gaussian columns only when they span p dimensions or more
    # (a shared or rank-deficient A spans fewer than its rows)
    covered = rows >= p and int(torch.linalg.matrix_rank(torch.cat(spans, dim=1))) >= p
    gaussian = oversample if covered else p + oversample
    G = torch.randn(n, gaussian, dtype=torch.float32, generator=generator)
    return torch.linalg.qr(torch.cat(spans + [G], dim=1))[0]


def _top_energy(R: "torch.Tensor", p: int):
    """The SVD (float64) of a small l×l factor and the energy of its top p singular values."""
    import torch

    Ur, S, Vrh = torch.linalg.svd(R.to(torch.float64))
    return Ur, S, Vrh, float((S[:p] ** 2).sum())


def truncated_svd(M: "torch.Tensor", k: int, omega: "torch.Tensor | None", sketch: "torch.Tensor | None" = None,
                  norm2: float | None = None, tol: float = TOLERANCE, max_steps: int = MAX_STEPS):
    """Top-k SVD of a dense float32 m×n ``M``: float64 numpy U m×p, S p, Vh p×n, p = min(k, m, n),
    signs as ``_fix_signs``. With a ``test_matrix`` ``omega``, a randomized SVD (Halko, Martinsson
    & Tropp 2011, alg. 4.4) that stops when it has converged; without one, the exact SVD.

    Subspace iteration, one product with M (or Mᵀ) a step, each step's subspace re-orthonormalised:
    from the sketch M·omega (``sketch``, when the caller has computed it) the left basis Q, then
    the right basis Z of Mᵀ·Q, then the left basis of M·Z, ... Every step is itself an
    approximation, the projection of M on its basis (Q·Qᵀ·M, or M·Z·Zᵀ), whose top-k part keeps
    the energy E of the top-k singular values of the step's R factor: E rises towards the best
    E* = σ₁²+…+σₖ² of the full SVD. The iteration stops at the first step that adds at most
    ``tol``·min(E, N − E) to the energy (N = ‖M‖²_F, ``norm2`` when the caller has it), or after
    ``max_steps`` steps. Each step closes at least half the remaining gap E* − E where the
    iteration converges at all (measured: 10 to 100 times per step on the merged deltas of the
    bench's adapters, whose A factors are in the sketch), so then E is within ``tol`` of E* and
    the error ‖M − U S Vh‖_F = √(N − E) within tol/2 of the optimum √(N − E*). The fixed two
    power iterations this replaced took 6 products with M; this takes 3 on most modules of the
    bench (tests check the energy to 1e-5 and the error to 1e-4 of the full SVD's)."""
    import torch

    m, n = M.shape
    p = min(k, m, n)
    if omega is None:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        U, S, Vh = U[:, :p], S[:p], Vh[:p]
        U, Vh = _fix_signs(U.to(torch.float64).numpy(), Vh.to(torch.float64).numpy())
        return U, S.to(torch.float64).numpy(), Vh
    if norm2 is None:
        norm2 = float(torch.linalg.vector_norm(M, dtype=torch.float64)) ** 2
    Q, R = torch.linalg.qr(M @ omega if sketch is None else sketch)  # M·Z = Q·R with Z = omega
    Z, transposed = omega, False  # transposed: the last step was Mᵀ·Q = Z·R (else M·Z = Q·R)
    Ur, S, Vrh, energy = _top_energy(R, p)
    for _ in range(max_steps):
        if transposed:
            Q, R = torch.linalg.qr(M @ Z)
        else:  # Mᵀ·Q as (Qᵀ·M)ᵀ: Qᵀ·M streams M row-major, faster than Mᵀ·Q
            Z, R = torch.linalg.qr((Q.T @ M).T)
        transposed = not transposed
        Ur, S, Vrh, new = _top_energy(R, p)
        done = new - energy <= tol * max(min(new, norm2 - new), 0.0)  # or no gain at all: rounding only
        energy = new
        if done:
            break
    # the projection: M·Z·Zᵀ = Q·R·Zᵀ after an M·Z step, Q·Qᵀ·M = Q·Rᵀ·Zᵀ after an Mᵀ·Q step
    if transposed:  # Qᵀ·M = Rᵀ·Zᵀ: the SVD of Rᵀ is that of R, transposed
        Ur, Vrh = Vrh.T, Ur.T
    U = Q.to(torch.float64) @ Ur[:, :p]
    Vh = Vrh[:p] @ Z.to(torch.float64).T
    U, Vh = _fix_signs(U.numpy(), Vh.numpy())
    return U, S[:p].numpy(), Vh


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
        seed = module_seed(options.seed, name)
        g = torch.Generator().manual_seed(seed)
        omega = test_matrix((d_out, d_in), k, [f.A2 for f in factors], g)
        buffers = _buffers()
        # PEFT computes get_delta_weight in float32 (upcasting half precision on the CPU): (B@A)·scale
        factors = [Factors(f.weight, f.scale, f.B2.to(torch.float32).contiguous(), f.A2.to(torch.float32).contiguous())
                   for f in factors]
        fill = None
        if self.random_pruning:  # each block of rows formed, masked and combined while in cache
            step = min(block_rows(d_in), d_out)
            deltas = [buffers.get(f"delta{i}", (step, d_in)) for i in range(len(factors))]
            fill = dare_fill(factors, options.density, dare_generators(seed, len(factors)))
        else:  # magnitude pruning needs each whole delta's threshold first
            deltas = []
            for i, f in enumerate(factors):
                d = torch.mm(f.B2, f.A2, out=buffers.get(f"delta{i}", (d_out, d_in)))
                deltas.append(d.mul_(f.scale))
        # the sketch M·omega and ‖M‖² (in float64) are taken from each block of M while it is in cache
        sketch = None if omega is None else torch.empty(d_out, omega.shape[1])
        norm2 = [0.0]

        def each_block(rows, block):
            x = block.reshape(-1).to(torch.float64)
            norm2[0] += float(torch.dot(x, x))
            if sketch is not None:
                torch.mm(block, omega, out=sketch[rows])

        M = buffers.get("merged", (d_out, d_in))
        weights = [f.weight for f in factors]
        if fill is not None:
            _combine(self.combine, M, deltas, weights, options.majority_sign_method, each_block=each_block, fill=fill)
        else:
            self.merge_(M, deltas, weights, options.density, options.majority_sign_method, g,
                        buffers.get("scratch", (d_out, d_in)), each_block)
        del deltas
        U, S, Vh = truncated_svd(M, k, omega, sketch, norm2[0])
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
