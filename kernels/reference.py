"""Torch references for the merge kernels in ``merge.py`` (the CPU path, and the tests' oracles).

A merge folds N LoRA adapters into one base weight W (out × in)::

    W' = round(W + Σᵢ cᵢ · Bᵢ @ Aᵢ)          Bᵢ: out × rᵢ,  Aᵢ: rᵢ × in,  cᵢ = weightᵢ · scaleᵢ

with every product and sum in float32 and one rounding to the output dtype at the end (PEFT's
``get_delta_weight`` instead rounds each delta to the weight's dtype before adding it, so a bf16
merge there rounds twice per adapter).

DoRA (Liu et al. 2024, arXiv:2402.09353) rescales each output row of the merged weight to a learned
magnitude m. PEFT 0.21 ``tuners/lora/variants.py`` (``DoraLinearVariant.merge_safe``) and
``tuners/lora/dora.py`` (``get_weight_norm``) compute, for a Linear weight in (out, in) layout::

    V  = W + s · B @ A
    W' = (m / ‖V‖₂ along dim=1)[:, None] · V

i.e. the norm is taken per output row over the input features. PEFT rounds V and the norm to the
weight's dtype before dividing; here both stay in float32 and only W' is rounded, once. Several
adapters can be folded into one V (the same Σᵢ cᵢ Bᵢ Aᵢ as above) under one magnitude vector; PEFT
merges several DoRA adapters one after another, each with its own magnitude, which is a chain of
calls with one adapter each. A zero row of V gives inf/nan, as in PEFT (there is no epsilon there).

The ``*_exact`` functions compute the same in float64 without rounding; the tests compare both the
reference and the Triton kernel against them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from loratool.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

WEIGHT_DTYPES = ("bfloat16", "float16", "float32")


def check_factors(W: "torch.Tensor", Bs: Sequence["torch.Tensor"], As: Sequence["torch.Tensor"],
                  coeffs: Sequence[float], magnitude: "torch.Tensor | None" = None) -> None:
    """Raise UsageError unless W (out × in) and every Bᵢ (out × rᵢ), Aᵢ (rᵢ × in) fit together."""
    if W.dim() != 2:
        raise UsageError(f"merge: the base weight has shape {tuple(W.shape)}; expected a 2-D (out, in) "
                         f"matrix (reshape conv weights to (out, in·kh·kw) first)")
    if str(W.dtype).removeprefix("torch.") not in WEIGHT_DTYPES:
        raise UsageError(f"merge: the base weight has dtype {W.dtype}; expected one of "
                         f"{', '.join(WEIGHT_DTYPES)} (dequantize it first)")
    if not (len(Bs) == len(As) == len(coeffs)):
        raise UsageError(f"merge: got {len(Bs)} B factors, {len(As)} A factors and {len(coeffs)} "
                         f"coefficients; expected one of each per adapter")
    out_features, in_features = W.shape
    for i, (B, A) in enumerate(zip(Bs, As)):
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != out_features or A.shape[1] != in_features \
                or B.shape[1] != A.shape[0]:
            raise UsageError(f"merge: adapter {i} has B {tuple(B.shape)} and A {tuple(A.shape)}; expected "
                             f"B ({out_features}, r) and A (r, {in_features}) with the same rank r for "
                             f"the base weight {tuple(W.shape)}")
        if not (B.is_floating_point() and A.is_floating_point()):
            raise UsageError(f"merge: adapter {i} has factors of dtype {B.dtype} and {A.dtype}; "
                             f"expected floating point")
    if magnitude is not None and tuple(magnitude.shape) != (out_features,):
        raise UsageError(f"merge: the DoRA magnitude has shape {tuple(magnitude.shape)}; expected "
                         f"({out_features},), one value per output row of the base weight")


def _delta_into(acc: "torch.Tensor", Bs, As, coeffs) -> "torch.Tensor":
    """acc += Σ cᵢ Bᵢ Aᵢ, with the factors upcast to acc's dtype (float32 or float64)."""
    for B, A, c in zip(Bs, As, coeffs):
        acc.addmm_(B.to(device=acc.device, dtype=acc.dtype), A.to(device=acc.device, dtype=acc.dtype),
                   alpha=float(c))
    return acc


def merge_reference(W: "torch.Tensor", Bs: Sequence["torch.Tensor"], As: Sequence["torch.Tensor"],
                    coeffs: Sequence[float], out_dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """round(W + Σ cᵢ Bᵢ @ Aᵢ) to ``out_dtype`` (default W's dtype); float32 math, one rounding."""
    import torch

    check_factors(W, Bs, As, coeffs)
    acc = W.to(torch.float32, copy=True)
    return _delta_into(acc, Bs, As, coeffs).to(out_dtype or W.dtype)


def merge_exact(W, Bs, As, coeffs) -> "torch.Tensor":
    """W + Σ cᵢ Bᵢ @ Aᵢ in float64, not rounded: the oracle for tests."""
    import torch

    check_factors(W, Bs, As, coeffs)
    return _delta_into(W.to(torch.float64, copy=True), Bs, As, coeffs)


def dora_merge_reference(W, Bs, As, coeffs, magnitude: "torch.Tensor",
                         out_dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """DoRA merge: round(m[:, None] · V / ‖V‖_row), V = W + Σ cᵢ Bᵢ Aᵢ; float32 math, one rounding."""
    import torch

    check_factors(W, Bs, As, coeffs, magnitude)
    V = _delta_into(W.to(torch.float32, copy=True), Bs, As, coeffs)
    scale = magnitude.to(device=V.device, dtype=torch.float32) / torch.linalg.vector_norm(V, dim=1)
    return V.mul_(scale[:, None]).to(out_dtype or W.dtype)


def dora_merge_exact(W, Bs, As, coeffs, magnitude) -> "torch.Tensor":
    """The DoRA merge in float64, not rounded: the oracle for tests."""
    import torch

    check_factors(W, Bs, As, coeffs, magnitude)
    V = _delta_into(W.to(torch.float64, copy=True), Bs, As, coeffs)
    scale = magnitude.to(device=V.device, dtype=torch.float64) / torch.linalg.vector_norm(V, dim=1)
    return V * scale[:, None]
