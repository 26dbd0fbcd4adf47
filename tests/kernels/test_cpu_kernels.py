"""The C loops (kernels/cpu.c) against their numpy references, on every instruction set this CPU
runs: bitsandbytes' 4-bit round trip bit for bit (``bnb._roundtrip_chunk``'s numpy path), and
parity's first pass (``paritystream.check_block``'s numpy path) to float64 rounding.

The bitsandbytes tests (tests/test_quant_bnb.py) compare the default path, the C loop where it is
built, with bitsandbytes and the step-by-step reference; these compare each copy of the loop
(x86-64-v4, x86-64-v3) with the numpy path, on the values where they could differ: zeros of both
signs, subnormals, float16's overflow, short last blocks, every blocksize, given absmax and scales,
values that are not finite (which the loop hands back to numpy).
"""

from __future__ import annotations

import platform
import shutil

import numpy as np
import pytest

from loratool.kernels import cpu
from loratool.merge import paritystream as P
from loratool.quant import bnb as Q

LEVELS = {"x86-64-v4": 2, "x86-64-v3": 1}


def _available() -> list[str]:
    best = cpu.isa()
    if best not in LEVELS:
        return []
    return [name for name, level in LEVELS.items() if level <= LEVELS[best]]


@pytest.fixture(params=_available() or [pytest.param("none", marks=pytest.mark.skip("the C loops are not built"))])
def isa(request):
    """Each instruction set the C loops run on here, in turn (restored afterwards)."""
    best = LEVELS[cpu.isa()]
    assert cpu.cap_isa(LEVELS[request.param]) == request.param
    yield request.param
    cpu.cap_isa(best)


def test_the_extension_is_built_where_it_can_be():
    """On x86-64 with a C compiler the install builds it; a silent numpy fallback would hide a
    broken build (and the speed it exists for)."""
    if platform.machine() not in ("x86_64", "AMD64") or not shutil.which("gcc"):
        pytest.skip("not x86-64 with gcc")
    assert cpu.lib() is not None, "loratool.kernels._cpu did not build or load"
    assert cpu.isa() in LEVELS or cpu.isa() == "none (numpy)"


def test_numpy_only_when_told(monkeypatch):
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    assert cpu.lib() is None and cpu.isa() is None


# -- the round trip ---------------------------------------------------------------------------------

def _raw(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if dtype == "BF16":
        return Q.to_dtype_bits(x, "BF16")
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).view(np.uint16)
    return x.view(np.uint32).copy()


def _values(n: int, rng, scale: float) -> np.ndarray:
    """Normal values times ``scale``, within float16's range, with zeros of both signs."""
    x = np.clip(rng.standard_normal(n) * scale, -65504, 65504).astype(np.float32)
    x[rng.random(n) < 0.02] = 0.0
    x[rng.random(n) < 0.02] = -0.0
    return x


def _both(raw, dtype, spec, shape, monkeypatch, **kw):
    got = Q.roundtrip_norms(raw, dtype, spec, shape=shape, **kw)
    with monkeypatch.context() as m:
        m.setenv("LORATOOL_NATIVE", "0")
        want = Q.roundtrip_norms(raw, dtype, spec, shape=shape, **kw)
    return got, want


def _same(got, want):
    assert np.array_equal(np.asarray(got[0]).view(np.uint8), np.asarray(want[0]).view(np.uint8)), \
        f"{np.count_nonzero(np.asarray(got[0]) != np.asarray(want[0]))} elements differ"
    assert got[1] == pytest.approx(want[1], rel=1e-5, abs=1e-30)
    assert got[2] == pytest.approx(want[2], rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_roundtrip_is_numpys(isa, monkeypatch, dtype, quant_type, blocksize, double_quant):
    rng = np.random.default_rng(blocksize + 7 * double_quant)
    spec = Q.QuantSpec(quant_type, blocksize, double_quant)
    # an odd last dimension (FP4's -0 + 0), a short last block, magnitudes from float16's subnormals
    # to past its largest value (which the round trip may round to Inf)
    for n, scale in ((1, 1.0), (7, 3e-6), (blocksize * 3 + 5, 1.0), (5003, 2e-7), (4099, 3e4), (5000, 0.02)):
        raw = _raw(_values(n, rng, scale), dtype)
        _same(*_both(raw, dtype, spec, (n,), monkeypatch))


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_every_finite_16_bit_value(isa, monkeypatch, dtype):
    """Every finite bfloat16 or float16 value, shuffled into blocks whose absmax varies (double
    quantization for float16 only: bfloat16's largest values overflow the float32 sum of absmax)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exp = (bits >> (7 if dtype == "BF16" else 10)) & (0xFF if dtype == "BF16" else 0x1F)
    raw = np.random.default_rng(3).permutation(bits[exp != (0xFF if dtype == "BF16" else 0x1F)])
    for spec in (Q.QuantSpec("nf4", 64, False), Q.QuantSpec("fp4", 128, dtype == "F16")):
        _same(*_both(raw, dtype, spec, (raw.size,), monkeypatch))


def test_given_absmax_and_scale_and_output_buffer(isa, monkeypatch):
    """A row block of a larger tensor: its blocks' absmax and scales given, written into ``out``."""
    rng = np.random.default_rng(5)
    raw = _raw(_values(64 * 40, rng, 0.05), "BF16")
    spec = Q.QuantSpec("nf4", 64, True)
    absmax = Q.absmax_bits(raw, "BF16", 64)
    scale = Q.quantize_absmax(absmax).dequantize()
    outs = []
    for native in ("1", "0"):
        monkeypatch.setenv("LORATOOL_NATIVE", native)
        out = np.zeros(raw.size, np.uint16)
        _, w_sq, q_sq = Q.roundtrip_norms(raw[640:], "BF16", spec, scale=scale[10:], absmax=absmax[10:],
                                          shape=(40, 64), out=out[640:])
        outs.append((out, w_sq, q_sq))
    assert np.array_equal(outs[0][0], outs[1][0]) and not outs[0][0][:640].any()
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-5) and outs[0][2] == pytest.approx(outs[1][2], rel=1e-5)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_absmax_is_numpys(isa, monkeypatch, dtype):
    rng = np.random.default_rng(21)
    for n, blocksize in ((1, 64), (64 * 9 + 3, 64), (4096 * 3, 4096), (1000, 128)):
        raw = _raw(_values(n, rng, 0.1), dtype)
        raw[: min(n, 64)] = 0  # an all-zero block (and, when n is small, a short one: clamped)
        got = cpu.absmax(raw, dtype, blocksize)
        monkeypatch.setenv("LORATOOL_NATIVE", "0")
        want = Q.absmax_bits(raw, dtype, blocksize)
        monkeypatch.delenv("LORATOOL_NATIVE")
        assert got is not None and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    raw[5] = _raw(np.array([np.inf], np.float32), dtype)[0]
    assert cpu.absmax(raw, dtype, 128) is None  # numpy's to decide


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_values_not_finite_are_numpys_to_decide(isa, monkeypatch, bad):
    rng = np.random.default_rng(9)
    x = _values(64 * 5, rng, 1.0)
    x[200] = bad
    raw = _raw(x, "BF16")
    vals, bnds = Q._sorted_codes("nf4")
    out = np.empty(raw.size, np.uint16)
    assert cpu.roundtrip(raw, "BF16", vals, bnds, 64, None, None, False, out, True) is None
    got, want = _both(raw, "BF16", Q.QuantSpec("nf4", 64, False), (raw.size,), monkeypatch)
    assert np.array_equal(got[0], want[0])


# -- parity's first pass ----------------------------------------------------------------------------

def _first_pass(w, wdtype, m, mdtype, left, right):
    """(max |M − X|, max |M − X| / ulp(X)) in numpy: X = W + left @ right in float64."""
    raw_w = np.frombuffer(w, P.FORMATS[wdtype][0])
    wv = raw_w.astype(np.float64) if wdtype == "F64" else Q.from_dtype_bits(raw_w, wdtype).astype(np.float64)
    mv = Q.from_dtype_bits(np.frombuffer(m, np.uint16), mdtype).astype(np.float64)
    x = (left @ right).reshape(-1) + wv
    err = np.abs(mv - x)
    _, mant, emin = P.FORMATS[mdtype]
    ulp = np.maximum(np.abs(x).view(np.uint64) & P.EXPONENT, np.uint64(emin + 1023) << np.uint64(52)).view(np.float64)
    return float(err.max()), float((err / ulp).max()) * 2.0**mant


def _block(rng, rows, cols, r, wdtype, mdtype, noise):
    left = np.ascontiguousarray(rng.standard_normal((rows, r)) * 0.01)
    right = np.ascontiguousarray(rng.standard_normal((r, cols)) * 0.01)
    w32 = (rng.standard_normal(rows * cols) * 0.02).astype(np.float32)
    w32[rng.random(w32.size) < 0.05] = 0  # X near zero: ulp(X) at the dtype's smallest normal
    if wdtype == "F64":
        w = w32.astype(np.float64)
        wv = w
    else:
        w = _raw(w32, wdtype)
        wv = Q.from_dtype_bits(w, wdtype).astype(np.float64)
    x = (left @ right).reshape(-1) + wv
    m = _raw((x * (1 + noise * rng.standard_normal(x.size))).astype(np.float32), mdtype)
    return w.tobytes(), m.tobytes(), left, right


@pytest.mark.parametrize("wdtype", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("mdtype", ["BF16", "F16"])
def test_parity_first_pass_is_numpys(isa, wdtype, mdtype):
    rng = np.random.default_rng(11)
    # rows not a multiple of four, columns not a multiple of the vector's, rank 1 to 24
    for rows, cols, r in ((1, 1, 1), (3, 7, 2), (4, 16, 16), (9, 37, 5), (12, 2048, 16), (5, 100, 24)):
        for noise in (0.0, 1e-2):
            w, m, left, right = _block(rng, rows, cols, r, wdtype, mdtype, noise)
            got = cpu.parity_block(np.frombuffer(w, np.uint8), wdtype, np.frombuffer(m, np.uint8), mdtype, left, right,
                                   P.FORMATS[mdtype][2], P.FORMATS[mdtype][1])
            want = _first_pass(w, wdtype, m, mdtype, left, right)
            assert got == pytest.approx(want, rel=1e-12, abs=0), (rows, cols, r, noise)


@pytest.mark.parametrize("noise", [0.0, 1e-3, 1e-1])
def test_check_block_reports_what_numpy_reports(isa, monkeypatch, noise):
    """The whole block check, C first pass or not: the same Stats (within float64 rounding)."""
    rng = np.random.default_rng(13)
    w, m, left, right = _block(rng, 11, 300, 16, "BF16", "BF16", noise)
    f = P.BlockFactors(left, right, np.abs(left).astype(np.float32), np.abs(right).astype(np.float32), 16)
    got = P.check_block(f, "BF16", "BF16", w, m, 0, 11)
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    want = P.check_block(f, "BF16", "BF16", w, m, 0, 11)
    assert got.bad == want.bad
    assert (got.max_abs, got.max_ulp, got.max_ratio) == pytest.approx((want.max_abs, want.max_ulp, want.max_ratio),
                                                                     rel=1e-12)
    if noise == 0:
        assert got.bad == 0
    if noise >= 1e-1:
        assert got.bad > 0


def test_parity_values_not_finite_are_numpys_to_decide(isa):
    rng = np.random.default_rng(17)
    w, m, left, right = _block(rng, 4, 40, 3, "BF16", "BF16", 0.0)
    m = bytearray(m)
    m[2 * 33:2 * 34] = np.array([0x7FC0], np.uint16).tobytes()  # a NaN in the merged rows
    assert cpu.parity_block(np.frombuffer(w, np.uint8), "BF16", np.frombuffer(bytes(m), np.uint8), "BF16", left, right,
                            -126, 7) is None


def test_short_buffers_are_refused_not_read_past(isa):
    """The wrappers check every size the C loops rely on: a short buffer is a ValueError, never a
    read past its end."""
    vals, bnds = Q._sorted_codes("nf4")
    raw = np.zeros(128, np.uint16)
    with pytest.raises(ValueError):
        cpu.roundtrip(raw, "BF16", vals, bnds, 64, np.ones(1, np.float32), None, False, np.empty(128, np.uint16), False)
    with pytest.raises(ValueError):
        cpu.roundtrip(raw, "BF16", vals, bnds, 64, None, None, False, np.empty(100, np.uint16), False)
    left, right = np.zeros((4, 2)), np.zeros((2, 8))
    with pytest.raises(ValueError):
        cpu.parity_block(np.zeros(31, np.uint16), "BF16", np.zeros(32, np.uint16), "BF16", left, right, -126, 7)
    with pytest.raises(ValueError):
        cpu.parity_block(np.zeros(32, np.uint16), "BF16", np.zeros(32, np.uint16), "BF16", left, np.zeros((3, 8)),
                         -126, 7)


# -- compose's magnitude-pruning threshold -----------------------------------------------------------

@pytest.mark.parametrize("case", ["normal", "ties", "zeros", "nan"])
def test_kth_largest_abs_is_the_partitions(case):
    """The threshold (and its ties' counts) of ``delta.MagnitudeThreshold`` as numpy's partition of
    |t| finds it: the value at ascending index n - k, NaN above everything."""
    rng = np.random.default_rng(23)
    t = rng.standard_normal(100_003).astype(np.float32)
    if case == "ties":  # few distinct magnitudes: many entries equal the threshold, of both signs
        t = (np.round(t * 4) / 4).astype(np.float32)
    elif case == "zeros":
        t[rng.random(t.size) < 0.7] = 0.0
    elif case == "nan":
        t[[5, 77, 900]] = np.nan
    if cpu.lib() is None:
        pytest.skip("the C loops are not built")
    a = np.abs(t)
    for k in (1, 2, 3, 17, t.size // 2, t.size - 1, t.size):
        thr, above, equal = cpu.kth_largest_abs(t, k)
        want = np.partition(a, t.size - k)[t.size - k]
        assert np.array_equal(np.float32(thr), want, equal_nan=True), k
        if want == want:
            above_want = np.count_nonzero((a > want) | np.isnan(a))  # NaN above everything, as partitioned
            assert above == above_want and equal == np.count_nonzero(a == want), k


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_magnitude_pruning_is_the_same_either_way(monkeypatch, density):
    """``delta.magnitude_prune_`` (TIES' trim) with the C threshold and with numpy's partition:
    the same bits, ties at the threshold included."""
    torch = pytest.importorskip("torch")
    from loratool.compose_methods import delta

    g = torch.Generator().manual_seed(29)
    t = (torch.randn(300, 257, generator=g) * 8).round() / 8  # many equal magnitudes
    got = delta.magnitude_prune_(t.clone(), density)
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    want = delta.magnitude_prune_(t.clone(), density)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert int((want != 0).sum()) == int(density * t.numel())


def test_what_the_loops_leave_to_numpy(isa, monkeypatch):
    """Inputs where the C loops would compute something other than numpy's path hand it back (found
    in review): |X| past 2^1023 (no normal 1/ulp), a short last block whose given absmax is 0
    (0/0), float64 factors (numpy rounds after computing with them)."""
    huge = cpu.parity_block(np.zeros(1, np.uint16), "BF16", np.zeros(1, np.uint16), "BF16", np.array([[1e308]]),
                            np.array([[1.5]]), -126, 7)
    assert huge is None
    raw = _raw(np.array([0.5] * 64 + [0.0] * 10, np.float32), "BF16")
    vals, bnds = Q._sorted_codes("nf4")
    out = np.empty(raw.size, np.uint16)
    assert cpu.roundtrip(raw, "BF16", vals, bnds, 64, None, np.array([0.5, 0], np.float32), False, out, False) is None
    got, want = _both(raw, "BF16", Q.QuantSpec("nf4", 64, False), (raw.size,), monkeypatch,
                      absmax=np.array([0.5, 0], np.float32))
    assert np.array_equal(got[0], want[0])
    assert cpu.roundtrip(raw, "BF16", vals, bnds, 64, None, np.array([0.5, 0.1]), False, out, False) is None


def test_tables_and_outputs_the_loops_cannot_use_are_refused(isa):
    vals, bnds = Q._sorted_codes("nf4")
    raw = np.zeros(64, np.uint16)
    with pytest.raises(ValueError):  # a reversed view: not contiguous
        cpu.roundtrip(raw, "BF16", np.concatenate([vals, vals])[::-2], bnds, 64, None, None, False,
                      np.empty(64, np.uint16), False)
    with pytest.raises(ValueError):  # read-only memory is never written
        cpu.roundtrip(raw, "BF16", vals, bnds, 64, None, None, False, np.frombuffer(bytes(128), np.uint16), False)
