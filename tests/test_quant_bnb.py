"""loratool.quant.bnb against bitsandbytes itself: dequant(quant(W)) bit for bit (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest

from loratool.quant import bnb as Q

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}


def _bits(t) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 96), (37, 51), (33,), (300, 200)])
def test_roundtrip_is_bitsandbytes(dtype, quant_type, blocksize, double_quant, shape):
    g = torch.Generator().manual_seed(hash((dtype, quant_type, blocksize, double_quant, shape)) % 2**31)
    w = (torch.randn(shape, generator=g) * 0.05).to(DTYPES[dtype])
    w.view(-1)[:3] = 0  # zeros: FP4's signed zero codes
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    want = _bits(F.dequantize_4bit(packed, state))
    got = Q.roundtrip(_bits(w), dtype, Q.QuantSpec(quant_type, blocksize, double_quant))
    assert got.shape == want.shape
    assert np.array_equal(got.view(np.uint16), want), f"{np.count_nonzero(got.view(np.uint16) != want)} elements differ"
    # and the intermediate state itself
    x = Q.from_dtype_bits(_bits(w).reshape(-1), dtype)
    mine_packed, absmax = Q.quantize_4bit(x, blocksize, quant_type)
    assert np.array_equal(mine_packed, packed.numpy().reshape(-1))
    if double_quant:
        nest = Q.quantize_absmax(absmax)
        assert nest.offset == np.float32(state.offset.item())
        assert np.array_equal(nest.qabsmax, state.absmax.numpy())
        assert np.array_equal(nest.nested_absmax, state.state2.absmax.numpy())
        assert np.array_equal(nest.nested_code, state.state2.code.numpy())
    else:
        assert np.array_equal(absmax, state.absmax.numpy())


def test_dynamic_map_is_bitsandbytes():
    assert np.array_equal(Q.dynamic_map(), F.create_dynamic_map().numpy())


@pytest.mark.parametrize("n", [7, 100, 1000, 40000, 70001])
def test_offset_sum_is_torchs_single_threaded_sum(n):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 0.1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = torch.mean(x).item()
    finally:
        torch.set_num_threads(threads)
    assert np.float32(want) == Q.torch_sum_f32(x.numpy()) / np.float32(n)


def test_row_blocks_equal_the_whole_tensor():
    """A row block quantized with the whole tensor's scales gives the whole tensor's bits."""
    w = (torch.randn(96, 64, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    spec = Q.QuantSpec("nf4", 64, True)
    raw = _bits(w)
    whole = Q.roundtrip(raw, "BF16", spec)
    x = Q.from_dtype_bits(raw.reshape(-1), "BF16")
    scale, absmax = Q.scales(x, spec), Q.absmax_4bit(x, 64)
    for i, j in [(0, 32), (32, 33), (33, 96)]:
        b0, b1 = i * 64 // 64, j * 64 // 64
        part = Q.roundtrip(raw[i:j], "BF16", spec, scale=scale[b0:b1], absmax=absmax[b0:b1], shape=(96, 64))
        assert np.array_equal(part, whole[i:j])


@pytest.mark.parametrize("text,want", [
    ("keep", None), ("nf4", Q.QuantSpec("nf4", 64, False)), ("fp4,blocksize=128", Q.QuantSpec("fp4", 128, False)),
    ("nf4,blocksize=64,double-quant", Q.QuantSpec("nf4", 64, True)),
])
def test_parse_precision(text, want):
    assert Q.parse_precision(text) == want


@pytest.mark.parametrize("text", ["int4", "nf4,blocksize=100", "nf4,foo", "keep,double-quant", ""])
def test_parse_precision_refuses(text):
    with pytest.raises(ValueError):
        Q.parse_precision(text)
