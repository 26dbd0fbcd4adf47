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


# -- the base as a QLoRA adapter saw it: bitsandbytes' dequant(quant(W)) (issue 16) ----------------

def requant_tables(W: "torch.Tensor", spec, scale: "torch.Tensor | None" = None):
    """(scale, recip, bounds, codes), float32 on W's device, for ``requant_reference`` and the
    kernel's QUANT prologue, from the contiguous (out, in) ``W`` whose rows are whole blocks of
    ``spec.blocksize`` (``loratool.quant.bnb.QuantSpec``):

    * recip: 1 / max(absmax, 1e-38) of each block, as ``quantize_4bit`` scales a block;
    * scale: what ``dequantize_4bit`` multiplies a block's code by: the absmax, or with double
      quantization the absmax after its 8-bit round trip, which needs the whole tensor's absmax
      vector: pass ``scale`` (``loratool.quant.bnb.quantize_absmax(absmax).dequantize()``) when
      ``W`` is a row block of a larger tensor;
    * bounds: the 15 midpoints between the sorted codes; codes: the 16 codes, sorted."""
    import numpy as np
    import torch

    from loratool.quant import bnb

    check_requant(W, spec)
    absmax = W.reshape(-1, spec.blocksize).abs().amax(dim=1).to(torch.float32)  # exact: a max
    recip = torch.reciprocal(absmax.clamp_min(float(bnb._CLAMP_MIN)))
    if scale is None:
        scale = absmax
        if spec.double_quant:
            scale = torch.from_numpy(bnb.quantize_absmax(absmax.cpu().numpy()).dequantize()).to(W.device)
    codes = bnb.CODES[spec.quant_type][bnb.ORDER[spec.quant_type]]
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(W.device)  # noqa: E731
    return scale.to(device=W.device, dtype=torch.float32).contiguous(), recip, f32(bnb.bounds(spec.quant_type)), f32(codes)


def check_requant(W: "torch.Tensor", spec) -> None:
    """Raise UsageError unless ``W`` is a contiguous 2-D bf16/fp16/fp32 matrix whose rows are whole
    blocks of ``spec.blocksize`` (the other layouts go through ``loratool.quant.bnb`` in numpy)."""
    if W.dim() != 2 or not W.is_contiguous() or W.shape[1] % spec.blocksize:
        raise UsageError(f"requant: the base weight has shape {tuple(W.shape)}"
                         f"{'' if W.is_contiguous() else ' (not contiguous)'}; the kernel takes a "
                         f"contiguous (out, in) matrix with in a multiple of the blocksize {spec.blocksize}")
    if str(W.dtype).removeprefix("torch.") not in WEIGHT_DTYPES:
        raise UsageError(f"requant: the base weight has dtype {W.dtype}; expected one of {', '.join(WEIGHT_DTYPES)}")


def requant_reference(W: "torch.Tensor", spec, scale: "torch.Tensor | None" = None) -> "torch.Tensor":
    """bitsandbytes' ``dequantize_4bit(*quantize_4bit(W))`` in torch, bit for bit (W's dtype): each
    block scaled by 1 / absmax in float32, the code found among the sorted codes (``bucketize``:
    a value on a midpoint takes the lower code), code · scale in float32, rounded once."""
    import torch

    scale, recip, bounds, codes = requant_tables(W, spec, scale)
    bs = spec.blocksize
    s = W.to(torch.float32).reshape(-1, bs) * recip[:, None]
    idx = torch.bucketize(s, bounds, right=False)
    return (codes[idx] * scale[:, None]).to(W.dtype).reshape(W.shape)


def requant_merge_reference(W, Bs, As, coeffs, spec, scale=None, out_dtype=None) -> "torch.Tensor":
    """round(requant_reference(W) + Σ cᵢ Bᵢ @ Aᵢ): ``merge_reference`` on the base the adapter saw."""
    return merge_reference(requant_reference(W, spec, scale), Bs, As, coeffs, out_dtype=out_dtype)
