"""loratool.lowrank: QR-core SVD, rank rules, randomized SVD (PEFT's delta merges: test_compose_methods).

The factor-space math is numpy (float64, no torch: issue 14) and takes numpy arrays or torch
tensors; the references here are torch's float64 SVDs of the dense deltas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loratool.errors import UsageError
from loratool.lowrank import (
    RankRule,
    core_svd,
    effective_rank,
    energy_kept,
    numerical_rank,
    singular_values,
    split_factors,
    stack_factors,
    truncation_error,
)


def factors(d=37, k=23, r=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, r, generator=g, dtype=dtype), torch.randn(r, k, generator=g, dtype=dtype)


@pytest.mark.parametrize("shape", [(37, 23, 6), (5, 40, 8), (40, 5, 8), (64, 64, 16)])
@pytest.mark.parametrize("scale", [1.0, 0.37, -2.0])
def test_core_svd_is_the_svd_of_the_delta(shape, scale):
    d, k, r = shape
    B, A = factors(d, k, r)
    M = (B.double() @ A.double()) * scale
    for inputs in ((B, A), (B.numpy(), A.numpy())):  # torch tensors or numpy arrays: the same
        U, S, Vh = map(torch.from_numpy, core_svd(*inputs, scale))
        assert U.dtype == S.dtype == Vh.dtype == torch.float64
        p = min(d, k, r)
        assert U.shape == (d, p) and S.shape == (p,) and Vh.shape == (p, k)
        Sd = torch.linalg.svdvals(M)
        torch.testing.assert_close(S, Sd[:p], rtol=1e-10, atol=1e-12)
        assert float(Sd[p:].sum()) < 1e-10 * float(Sd[0])
        torch.testing.assert_close((U * S) @ Vh, M, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(U.T @ U, torch.eye(p, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(Vh @ Vh.T, torch.eye(p, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.from_numpy(singular_values(*inputs, scale)), S, rtol=1e-10, atol=1e-12)


def test_core_svd_signs_are_deterministic():
    B, A = factors()
    U, S, Vh = core_svd(B, A)
    idx = np.abs(U).argmax(axis=0)
    assert bool((U[idx, np.arange(U.shape[1])] > 0).all())
    # the same delta from other factors (B·T, T⁻¹·A) gives the same U and Vh
    T = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    U2, S2, Vh2 = core_svd(B.double() @ T, T.T @ A.double())
    np.testing.assert_allclose(U2, U, rtol=0, atol=1e-10)
    np.testing.assert_allclose(Vh2, Vh, rtol=0, atol=1e-10)
    # and the same bits every time
    U3, S3, Vh3 = core_svd(B, A)
    assert np.array_equal(U3, U) and np.array_equal(S3, S) and np.array_equal(Vh3, Vh)


def test_rank_deficient_and_zero_modules():
    B, A = factors(r=8)
    B[:, 3:] = B[:, [0, 1, 2, 0, 1]] * 2.0  # dependent columns: rank(B) = 3
    U, S, Vh = core_svd(B, A)
    M = (B.double() @ A.double()).numpy()
    assert numerical_rank(S, M.shape) == 3 == int(np.linalg.matrix_rank(M))
    np.testing.assert_allclose((U * S) @ Vh, M, rtol=1e-10, atol=1e-10)
    assert RankRule(energy=1.0).choose(S, M.shape) == 3
    assert RankRule(sv_ratio=1e6).choose(S, M.shape) == 3
    assert truncation_error(S, 3) < 1e-12

    Z = torch.zeros(20, 4), torch.zeros(4, 9)
    U, S, Vh = core_svd(*Z)
    assert bool((S == 0).all()) and not np.isnan(U).any() and not np.isnan(Vh).any()
    assert numerical_rank(S) == 0 and effective_rank(S, 0.9) == 0
    assert RankRule(energy=0.9).choose(S) == 1  # min_rank: a module keeps rank 1 (zero factors)
    assert truncation_error(S, 1) == 0.0 and energy_kept(S, 1) == 1.0
    Bk, Ak = split_factors(U, S, Vh, 1)
    assert bool((Bk == 0).all()) and bool((Ak == 0).all())


def test_stacked_factors_give_the_weighted_sum():
    (B1, A1), (B2, A2) = factors(r=4, seed=1), factors(r=7, seed=2)
    B, A = map(torch.from_numpy, stack_factors([(0.7 * 2.0, B1, A1), (-0.3 * 0.5, B2, A2)]))
    M = 1.4 * B1.double() @ A1.double() - 0.15 * B2.double() @ A2.double()
    torch.testing.assert_close(B @ A, M, rtol=1e-12, atol=1e-12)
    U, S, Vh = core_svd(B, A)
    for k in (1, 5, 11):
        Bk, Ak = map(torch.from_numpy, split_factors(U, S, Vh, k, scale=0.25))
        # optimal error from the singular values == the error of the factors == full SVD of the delta
        Sd = torch.linalg.svdvals(M)
        opt = math.sqrt(float((Sd[k:] ** 2).sum() / (Sd ** 2).sum()))
        assert truncation_error(S, k) == pytest.approx(opt, rel=1e-9, abs=1e-12)
        assert float(torch.linalg.norm(M - 0.25 * Bk @ Ak) / torch.linalg.norm(M)) == pytest.approx(opt, rel=1e-9, abs=1e-12)
        # balanced split: the columns of B and rows of A have equal norms
        torch.testing.assert_close(Bk.norm(dim=0), Ak.norm(dim=1), rtol=1e-10, atol=1e-12)


def test_rank_rules():
    S = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    e = S ** 2 / (S ** 2).sum()  # cumulative: 0.7507, 0.9384, 0.9853, 0.9971, 1
    assert RankRule(rank=3).choose(S) == 3
    assert RankRule(rank=9).choose(S) == 9  # not capped here; callers decide
    assert RankRule(energy=0.75).choose(S) == 1
    assert RankRule(energy=0.9).choose(S) == 2
    assert RankRule(energy=float(e[:3].sum())).choose(S) == 3  # exactly at a boundary: keep 3
    assert RankRule(energy=1.0).choose(S) == 5  # never the zero component
    assert RankRule(sv_ratio=4).choose(S) == 3  # σ ≥ 8/4 = 2, inclusive: 8, 4, 2
    assert RankRule(sv_ratio=3.9).choose(S) == 2
    assert RankRule(sv_ratio=1).choose(S) == 1
    # Σσ = 15.5; cumulative shares 0.516, 0.774, 0.903, 0.968, 1
    assert RankRule(sv_cumulative=8 / 15.5).choose(S) == 1
    assert RankRule(sv_cumulative=0.8).choose(S) == 3
    assert RankRule(sv_cumulative=1.0).choose(S) == 5
    # kohya's sv_cumulative sums σ, not σ²: at 0.9 the σ² rule keeps 2, the σ rule 3
    assert RankRule(sv_cumulative=0.9).choose(S) == 3 and RankRule(energy=0.9).choose(S) == 2
    # sv_fro: Frobenius share √(Σₖσ²/Σσ²): 0.8665, 0.9687, 0.9926, 0.9985, 1
    assert RankRule(sv_fro=0.86).choose(S) == 1
    assert RankRule(sv_fro=0.9).choose(S) == 2
    assert RankRule(sv_fro=float(math.sqrt(e[:3].sum()))).choose(S) == 3  # exactly at a boundary
    assert RankRule(sv_fro=0.99).choose(S) == 3
    assert RankRule(sv_fro=1.0).choose(S) == 5
    assert RankRule(sv_fro=0.99, max_rank=2).choose(S) == 2
    assert RankRule(energy=0.5, min_rank=2).choose(S) == 2
    assert RankRule(energy=1.0, max_rank=2).choose(S) == 2


def test_rank_rule_options_collect_every_problem():
    with pytest.raises(UsageError) as e:
        RankRule.from_options(rank=0, energy=1.5, min_rank=4, max_rank=2)
    msg = str(e.value)
    assert "give one rank rule" in msg and "--rank must be at least 1" in msg and "--energy must be in (0, 1]" in msg
    assert "--min-rank 4 is above --max-rank 2" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="give a rank rule"):
        RankRule.from_options()
    assert RankRule.from_options(default_rank=16) == RankRule(rank=16)
    assert RankRule.from_options(energy=0.9, max_rank=8).describe() == "energy 0.9, max rank 8"
    assert RankRule.from_options(sv_fro=0.95).describe() == "sv-fro 0.95"
    with pytest.raises(UsageError, match=r"give one rank rule, found --sv-ratio, --sv-fro; --sv-fro must be in \(0, 1\]"):
        RankRule.from_options(sv_ratio=2, sv_fro=1.5)


def test_rule_with_rank_is_kohyas_conv_rank():
    S = [8.0, 4.0, 2.0, 1.0]
    assert RankRule(rank=3, max_rank=2).with_rank(1) == RankRule(rank=1)
    conv = RankRule(sv_fro=1.0, min_rank=3).with_rank(2)  # a dynamic rule is capped at the conv rank
    assert conv == RankRule(sv_fro=1.0, min_rank=2, max_rank=2) and conv.choose(S) == 2
    assert RankRule(sv_ratio=2).with_rank(3).choose(S) == 2  # under the cap: the rule's own choice


@pytest.mark.parametrize("rule", [RankRule(energy=0.9), RankRule(sv_ratio=3.0), RankRule(sv_cumulative=0.7),
                                  RankRule(rank=2)])
def test_rules_take_numpy_or_torch(rule):
    S = np.array([5.0, 3.0, 1.0, 0.25, 0.0])
    assert rule.choose(S, (9, 7)) == rule.choose(torch.from_numpy(S), (9, 7)) == rule.choose(list(S), (9, 7))
    assert effective_rank(S, 0.99) == effective_rank(torch.from_numpy(S), 0.99) == 3


@pytest.mark.parametrize("cond", [1.0, 1e2, 9e2, 1e5, 1e9])
def test_singular_values_keep_their_accuracy_whatever_the_conditioning(cond):
    """``singular_values`` takes R from the Gram's Cholesky factor when a tall factor is well
    conditioned and from Householder QR otherwise: either way the spectrum of scale·B@A matches
    the dense SVD (float64) to 1e-9 relative to each value, small ones included."""
    rng = np.random.default_rng(int(cond) % 997)
    d, k, r = 400, 300, 8
    qb, _ = np.linalg.qr(rng.standard_normal((d, r)))
    qa, _ = np.linalg.qr(rng.standard_normal((k, r)))
    sig = np.geomspace(1.0, 1.0 / cond, r)
    B = qb * sig  # cond(B) = cond
    A = (qa * np.linspace(1.0, 0.5, r)).T
    want = np.linalg.svd(0.75 * B @ A, compute_uv=False)[:r]
    got = singular_values(B, A, 0.75)
    keep = want > 1e-12 * want[0]  # values below the dense SVD's own rounding are not compared
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-9 if cond < 1e6 else 1e-6)


@pytest.mark.parametrize("cond", [1.0, 50.0, 1e4, 1e9])
def test_core_svd_factors_stay_orthonormal_whatever_the_conditioning(cond):
    """core_svd forms U = B·R⁻¹·Uc from the Gram's Cholesky factor only for cond ≤ 100 and takes
    Householder QR otherwise: U and Vh orthonormal to 1e-11 and U·S·Vh the delta, in every case."""
    rng = np.random.default_rng(7)
    d, k, r = 500, 350, 12
    qb, _ = np.linalg.qr(rng.standard_normal((d, r)))
    qa, _ = np.linalg.qr(rng.standard_normal((k, r)))
    B = qb * np.geomspace(1.0, 1.0 / cond, r)
    A = (qa * np.linspace(2.0, 1.0, r)).T
    U, S, Vh = core_svd(B, A, 1.5, keep=6)
    assert U.shape == (d, 6) and Vh.shape == (6, k) and S.shape == (r,)
    np.testing.assert_allclose(U.T @ U, np.eye(6), atol=1e-11)
    np.testing.assert_allclose(Vh @ Vh.T, np.eye(6), atol=1e-11)
    M = 1.5 * B @ A
    Ud, Sd, Vhd = np.linalg.svd(M, full_matrices=False)
    np.testing.assert_allclose((U * S[:6]) @ Vh, (Ud[:, :6] * Sd[:6]) @ Vhd[:6], atol=1e-10 * Sd[0])
