"""Compose methods that work on the factors, never forming a d×k delta: ``linear`` and ``cat``.

Their work per module is small and tall-skinny, so ``compose_adapters`` spreads modules over
threads (``ComposeMethod.dense`` is False). numpy float64 throughout (``loratool.lowrank``), no
torch (issue 14).
"""

from __future__ import annotations

from typing import Sequence

from loratool.compose_methods.base import ComposeMethod, Composed, ComposeOptions, Factors, register
from loratool.lowrank import core_svd, energy_kept, split_factors, stack_factors, truncation_error


@register
class Linear(ComposeMethod):
    """The exact weighted sum Σ wᵢ·sᵢ·Bᵢ·Aᵢ, cut optimally to the rank rule. The stacked factors
    [w₁s₁B₁ …] and [A₁; …] give it through a (Σrᵢ)×(Σrᵢ) core (``lowrank.core_svd``). This is
    PEFT's ``svd`` (weighted sum of get_delta_weight, then SVD) without the dense SVD; PEFT's
    ``linear`` weights A and B separately by √(w·s) and adds the factors, so its delta is not the
    weighted sum (PEFT issue #3004)."""

    name = "linear"
    peft_aliases = ("svd",)
    summary = "exact weighted sum of the deltas, optimally truncated to the rank rule"
    arrays = "numpy"

    def compose(self, name: str, factors: Sequence[Factors], options: ComposeOptions) -> Composed:
        rule = options.rule
        d_out, d_in = factors[0].B2.shape[0], factors[0].A2.shape[1]
        B, A = stack_factors([(f.weight * f.scale, f.B2, f.A2) for f in factors])
        U, S, Vh = core_svd(B, A, keep=lambda S: max(1, min(rule.choose(S, (d_out, d_in)), S.shape[0])))
        k = max(1, min(rule.choose(S, (d_out, d_in)), S.shape[0]))
        B2, A2 = split_factors(U, S, Vh, k)
        return Composed(B2, A2, truncation_error(S, k), energy_kept(S, k))


@register
class Cat(ComposeMethod):
    """Exact at rank Σrᵢ: the factors side by side, wᵢ·sᵢ folded into B (PEFT's ``cat`` folds them
    into A; the delta is the same)."""

    name = "cat"
    peft_aliases = ("cat",)
    summary = "exact, rank Σrᵢ (the factors side by side)"
    rank_rules = ()
    rule_note = "keeps every component (rank Σrᵢ) exactly"
    arrays = "numpy"

    def compose(self, name: str, factors: Sequence[Factors], options: ComposeOptions) -> Composed:
        B2, A2 = stack_factors([(f.weight * f.scale, f.B2, f.A2) for f in factors])
        return Composed(B2, A2, 0.0, 1.0)
