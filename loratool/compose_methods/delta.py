"""Compose methods on dense deltas: PEFT's ``*_svd`` combination types (``ties``, ``dare_linear``,
``dare_ties``, ``magnitude_prune``).

Each is a pruning of every input's delta and a combination of the pruned deltas, the functions of
``peft/utils/merge_utils.py``, on the dense deltas of one module at a time (memory bounded by one
module), then a seeded randomized SVD to ``--rank`` (``lowrank.randomized_svd``). DARE's masks
and the sketch come from a generator seeded by (seed, module name): a run is reproducible and does
not depend on module order. PEFT's plain ``ties``, ``dare_*`` and ``magnitude_prune`` (no
``_svd``) prune and combine the A and B factors separately instead; that is not offered.
"""

from __future__ import annotations

import math
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
from loratool.lowrank import randomized_svd, split_factors

if TYPE_CHECKING:  # pragma: no cover
    import torch


# -- PEFT's pruning and combination (peft/utils/merge_utils.py) -----------------------------------

def magnitude_prune_tensor(t: "torch.Tensor", density: float) -> "torch.Tensor":
    """Keep the int(density·numel) largest-magnitude entries (PEFT's magnitude_based_pruning)."""
    import torch

    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def random_prune_tensor(t: "torch.Tensor", density: float, generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """DARE: keep each entry with probability density and rescale by 1/density (PEFT's
    random_pruning with rescale=True), drawing from ``generator`` so that runs are seeded."""
    import torch

    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def weighted_sum(stacked: "torch.Tensor", w: "torch.Tensor", majority_sign_method: str) -> "torch.Tensor":
    """Σ wᵢ·Δᵢ of the pruned deltas (PEFT's task_arithmetic)."""
    return (stacked * w).sum(dim=0)


def disjoint_mean(stacked: "torch.Tensor", w: "torch.Tensor", majority_sign_method: str) -> "torch.Tensor":
    """TIES: elect a sign per entry ("total": the sign of the sum of the pruned, unweighted deltas;
    "frequency": the most frequent sign), then the mean of the weighted entries that agree with it."""
    import torch

    sign = stacked.sign()
    if majority_sign_method == "total":
        magnitude = stacked.sum(dim=0)
    elif majority_sign_method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown majority sign method {majority_sign_method!r}")
    majority = torch.where(magnitude >= 0, 1, -1)
    mask = sign == majority
    merged = (stacked * w * mask).sum(dim=0)
    return merged / torch.clamp(mask.sum(dim=0), min=1.0)


# -- the methods ----------------------------------------------------------------------------------

class DeltaMethod(ComposeMethod):
    """Prune each dense delta (``prune``), combine them (``combine``), truncate by randomized SVD.
    A subclass names the two functions; ``merge`` is the part PEFT computes before its SVD."""

    rank_rules = ("rank",)
    rule_note = "its merged delta is full rank, and an energy or singular-value rule would need its full SVD"
    takes_density = True
    dense = True
    seeded = True
    random_pruning = False  # DARE: seeded random pruning; else magnitude pruning
    combine = staticmethod(weighted_sum)

    def prune(self, t: "torch.Tensor", density: float, generator: "torch.Generator | None") -> "torch.Tensor":
        if self.random_pruning:
            return random_prune_tensor(t, density, generator)
        return magnitude_prune_tensor(t, density)

    def merge(self, deltas: Sequence["torch.Tensor"], weights: Sequence[float], density: float = 1.0,
              majority_sign_method: str = "total", generator: "torch.Generator | None" = None) -> "torch.Tensor":
        """The merged dense delta of one module (PEFT's merge_utils function of this method)."""
        import torch

        pruned = [self.prune(d, density, generator) for d in deltas]
        stacked = torch.stack(pruned, dim=0)
        del pruned
        w = torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
        return self.combine(stacked, w, majority_sign_method)

    def compose(self, name: str, factors: Sequence[Factors], options: ComposeOptions) -> Composed:
        import torch

        d_out, d_in = factors[0].B2.shape[0], factors[0].A2.shape[1]
        g = torch.Generator().manual_seed(module_seed(options.seed, name))
        # PEFT computes get_delta_weight in float32 (upcasting half precision on the CPU)
        deltas = [(f.B2.to(torch.float32) @ f.A2.to(torch.float32)) * f.scale for f in factors]
        M = self.merge(deltas, [f.weight for f in factors], options.density, options.majority_sign_method, g)
        del deltas
        k = max(1, min(options.rule.rank, d_out, d_in))
        U, S, Vh = randomized_svd(M, k, generator=g)
        norm2 = float(torch.linalg.vector_norm(M, dtype=torch.float64) ** 2)
        del M
        S = S.to(torch.float64)
        B2, A2 = split_factors(U.to(torch.float64), S, Vh.to(torch.float64), k)
        error = 0.0 if norm2 == 0 else math.sqrt(max(norm2 - float((S ** 2).sum()), 0.0) / norm2)
        return Composed(B2, A2, error)


@register
class Ties(DeltaMethod):
    name = "ties"
    peft_aliases = ("ties_svd",)
    summary = "TIES of the dense deltas (magnitude pruning, sign election, disjoint mean), randomized SVD"
    combine = staticmethod(disjoint_mean)


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
    combine = staticmethod(disjoint_mean)


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
