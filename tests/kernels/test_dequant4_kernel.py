"""The Triton kernel of bitsandbytes' dequantize_4bit (kernels/dequant4.py) under the interpreter,
and its torch reference, against loratool.quant.bnb.dequantize (bit-equal to bitsandbytes,
tests/test_quant_bnb.py) (issue 16)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from loratool.errors import UsageError  # noqa: E402
from loratool.kernels.dequant4 import dequantize_4bit_reference, dequantize_4bit_triton  # noqa: E402
from loratool.quant import bnb  # noqa: E402

pytest.importorskip("triton")

ST = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _case(shape, dtype, spec, seed=0):
    x = (np.random.default_rng(seed).standard_normal(int(np.prod(shape))) * 0.05).astype(np.float32)
    x[:5] = 0
    w = torch.from_numpy(x).to(dtype)
    flat = bnb.from_dtype_bits(w.view(torch.int16 if dtype != torch.float32 else torch.int32).numpy()
                               .view(np.uint16 if dtype != torch.float32 else np.uint32), ST[dtype])
    packed, absmax = bnb.quantize_4bit(flat, spec.blocksize, spec.quant_type)
    scale = bnb.quantize_absmax(absmax).dequantize() if spec.double_quant else absmax
    want = bnb.dequantize(packed, scale, shape, ST[dtype], spec.blocksize, spec.quant_type)
    return torch.from_numpy(packed.copy()), scale, want


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().view(
        np.uint16 if t.element_size() == 2 else np.uint32)


@pytest.mark.parametrize("spec", [bnb.QuantSpec("nf4", 64, False), bnb.QuantSpec("nf4", 64, True),
                                  bnb.QuantSpec("fp4", 128, False), bnb.QuantSpec("fp4", 64, True)], ids=str)
@pytest.mark.parametrize("shape,dtype", [((40, 128), torch.bfloat16), ((37, 51), torch.bfloat16),
                                         ((33, 100), torch.float16), ((3001,), torch.float32)],
                         ids=lambda v: str(v).removeprefix("torch."))
def test_the_kernel_and_the_reference_are_bnb_dequantize(spec, shape, dtype):
    packed, scale, want = _case(shape, dtype, spec)
    n = int(np.prod(shape))
    zero_fix = shape[-1] % 2 == 1 and spec.quant_type == "fp4"
    got = dequantize_4bit_triton(packed, scale, n, dtype, spec, zero_fix=zero_fix)
    assert np.array_equal(_bits(got), want.view(_bits(got).dtype))
    ref = dequantize_4bit_reference(packed, scale, n, dtype, spec, zero_fix=zero_fix)
    assert np.array_equal(_bits(ref), want.view(_bits(ref).dtype))


def test_a_row_block_from_a_block_boundary():
    spec = bnb.QuantSpec("nf4", 64, True)
    packed, scale, want = _case((48, 128), torch.bfloat16, spec, seed=2)
    first, count = 8 * 128, 16 * 128 + 5  # rows 8.. and part of a block at the end
    got = dequantize_4bit_triton(packed[first // 2:], scale, count, torch.bfloat16, spec, first=first)
    assert np.array_equal(_bits(got), want[first:first + count].view(np.uint16))


def test_misaligned_or_short_input_is_refused():
    spec = bnb.QuantSpec("nf4", 64, False)
    with pytest.raises(UsageError, match="block boundary"):
        dequantize_4bit_triton(torch.zeros(64, dtype=torch.uint8), np.ones(4, np.float32), 64, torch.bfloat16,
                               spec, first=32)
    with pytest.raises(UsageError, match="block boundary"):
        dequantize_4bit_triton(torch.zeros(10, dtype=torch.uint8), np.ones(4, np.float32), 64, torch.bfloat16, spec)
