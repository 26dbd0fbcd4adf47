"""The merge kernel's QUANT prologue (``requant_merge_triton``) under the Triton interpreter, and
its torch reference, against loratool.quant.bnb's round trip (itself bit-equal to bitsandbytes,
tests/test_quant_bnb.py): merges onto the base a QLoRA adapter was trained against (issue 16).

TRITON_INTERPRET must be set before triton decorates the kernel (see test_merge_kernel.py).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from loratool.errors import UsageError  # noqa: E402
from loratool.kernels.merge import merge_triton, requant_merge, requant_merge_triton  # noqa: E402
from loratool.kernels.reference import requant_reference  # noqa: E402
from loratool.quant import bnb  # noqa: E402
from tests.kernels.test_merge_kernel import assert_merge_close, make_case  # noqa: E402

pytest.importorskip("triton")

ST = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _numpy_roundtrip(W: torch.Tensor, spec) -> torch.Tensor:
    """loratool.quant.bnb.roundtrip of W, as a tensor of W's dtype."""
    raw = W.contiguous().view(INT[W.dtype]).numpy().view(np.uint16 if W.element_size() == 2 else np.uint32)
    got = bnb.roundtrip(raw, ST[W.dtype], spec)
    return torch.from_numpy(got.view(np.int16 if W.element_size() == 2 else np.int32).copy()).view(W.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bits, -0 as +0 (a merge adds the delta to -0 and gets +0 where the numpy path keeps
    FP4's -0 code: the values are the same)."""
    t = torch.where(t == 0, torch.zeros_like(t), t)
    return t.view(INT[t.dtype])


SPECS = [bnb.QuantSpec("nf4", 64, False), bnb.QuantSpec("nf4", 64, True), bnb.QuantSpec("fp4", 128, False),
         bnb.QuantSpec("fp4", 64, True)]
CASES = [((40, 128), torch.bfloat16), ((33, 256), torch.float16), ((17, 384), torch.float32)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_the_reference_is_the_numpy_round_trip(spec, shape, dtype):
    W = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    W[0, :5] = 0  # zeros (FP4's signed zero codes) and a block's absmax exactly on a value
    assert torch.equal(requant_reference(W, spec).view(INT[dtype]), _numpy_roundtrip(W, spec).view(INT[dtype]))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_the_kernel_without_adapters_is_the_round_trip(spec, shape, dtype):
    W = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
    got = requant_merge_triton(W, [], [], [], spec, config={"BLOCK_M": 16, "BLOCK_N": 64})
    assert torch.equal(_bits(got), _bits(_numpy_roundtrip(W, spec)))


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_the_kernel_merges_onto_the_round_trip(spec, shape, dtype):
    """The prologue then the plain kernel's arithmetic: bit for bit merge_triton on the round trip
    done beforehand, and within the kernel tests' float64 bound of the exact merge onto it."""
    W, Bs, As, coeffs, _ = make_case(shape, (3, 17), dtype, seed=3)
    W = (W * 0.05).to(dtype)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64}
    got = requant_merge_triton(W, Bs, As, coeffs, spec, config=cfg)
    deq = _numpy_roundtrip(W, spec)
    assert torch.equal(_bits(got), _bits(merge_triton(deq, Bs, As, coeffs, config=cfg)))
    assert_merge_close(got, deq, Bs, As, coeffs, interpreted=True)
    # and the dispatcher's CPU path (torch reference) merges onto the same base
    assert_merge_close(requant_merge(W, Bs, As, coeffs, spec), deq, Bs, As, coeffs, interpreted=False)


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_non_finite_elements_round_trip_as_in_numpy(spec, value, dtype):
    """An inf or NaN makes its block's absmax non-finite: the scaled values NaN (the last code, as
    searchsorted and bucketize give it) or 0, times an infinite or NaN scale; NaN stays NaN through
    the kernel's bf16 rounding by bits."""
    W = (torch.randn(4, 128, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    W[1, 3] = value
    want = _numpy_roundtrip(W, spec).float()
    for got in (requant_reference(W, spec).float(),
                requant_merge_triton(W, [], [], [], spec, config={"BLOCK_M": 16, "BLOCK_N": 64}).float()):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~got.isnan()], want[~want.isnan()])
    assert not torch.isfinite(want[1, :64]).all()  # the block is non-finite
    if not spec.double_quant:  # the other blocks are not (double quantization's mean spreads it)
        assert torch.isfinite(want[0]).all()


def test_a_row_block_takes_the_whole_tensors_double_quantized_scale():
    """Rows [i, j) with the scale of their blocks from the whole tensor's nested absmax: the rows
    of the whole tensor's round trip (a block's absmax alone would give another offset)."""
    spec = bnb.QuantSpec("nf4", 64, True)
    W = (torch.randn(48, 128, generator=torch.Generator().manual_seed(4)) * 0.05).to(torch.bfloat16)
    absmax = W.reshape(-1, 64).abs().amax(dim=1).float().numpy()
    scale = torch.from_numpy(bnb.quantize_absmax(absmax).dequantize())
    whole = _numpy_roundtrip(W, spec)
    i, j = 8, 24
    rows = requant_merge_triton(W[i:j].contiguous(), [], [], [], spec, scale=scale[i * 2:j * 2],
                                config={"BLOCK_M": 16, "BLOCK_N": 64})
    assert torch.equal(_bits(rows), _bits(whole[i:j]))
    assert not torch.equal(_bits(requant_merge_triton(W[i:j].contiguous(), [], [], [], spec,
                                                      config={"BLOCK_M": 16, "BLOCK_N": 64})), _bits(whole[i:j]))


@pytest.mark.parametrize("W,message", [
    (torch.zeros(4, 96), "multiple of the blocksize 64"),
    (torch.zeros(8, 128)[:, :64], "not contiguous"),
    (torch.zeros(4, 64, dtype=torch.int32), "dtype"),
])
def test_layouts_the_kernel_does_not_take_are_refused(W, message):
    with pytest.raises(UsageError, match=message):
        requant_merge_triton(W, [], [], [], bnb.QuantSpec("nf4", 64, False))
