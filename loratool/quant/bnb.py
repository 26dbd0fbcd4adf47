"""bitsandbytes' 4-bit quantization (NF4, FP4, double quantization) in numpy, bit for bit.

QLoRA holds the base in 4 bits: each weight tensor is flattened and cut into blocks of
``blocksize`` elements (64 by default); each block keeps its absolute maximum (``absmax``, float32)
and each element the index of the nearest value of a 16-entry code (NF4's normal quantiles or
FP4's floats, scaled to [-1, 1]), two indices per byte (the first element in the high nibble).
Double quantization ("compress_statistics", bnb_4bit_use_double_quant) stores the absmax vector
itself in 8 bits: its mean (``offset``) is subtracted and the rest quantized blockwise (256 values
a block) with bitsandbytes' signed dynamic 8-bit code. The adapter of a QLoRA run learns a
correction to ``dequant(quant(W))``, not to W.

This module repeats, in numpy, the arithmetic that bitsandbytes 0.50 runs on the CPU, down to
the rounding (``tests/test_quant_bnb.py`` compares it with ``bitsandbytes.functional`` bit for
bit):

* ``quantize_4bit`` (the ``default`` torch kernel): the element times ``1 / absmax`` (a float32
  reciprocal, absmax clamped to 1e-38), clamped to [-1, 1], except in the short last block,
  where it is divided by its absmax; the index is ``bucketize`` against the midpoints of the
  sorted code (a value on a midpoint takes the lower code), FP4's sorted order mapped back to
  its bit patterns (there +0 sorts before -0: small positive values get -0's pattern);
* ``dequantize_4bit`` (the C kernel): ``code[q] * absmax`` in float32, rounded to nearest even
  to the original dtype;
* double quantization: ``offset`` is torch's float32 ``mean`` of the absmax vector (its
  summation order: ``torch_sum_f32``); the 8-bit quantization (the C kernel) divides by the
  block's absmax and looks the index up in a 65536-entry table of [-1, 1] (``_lut``), which is
  not always the nearest code; dequantization is ``code[q] * nested_absmax`` in float32, plus
  ``offset`` in float32;
* a tensor whose last dimension is odd is dequantized by the ``default`` torch kernel (compiled by
  ``torch.compile``), which writes +0 where FP4's -0 code comes out (``dequantize``).

The one input to all of this that depends on the machine is the offset's last bit: torch sums
in an order that depends on its vector width (AVX2: 8 lanes; AVX-512: 16) and, past 32768
absmax values (tensors of 2M elements and more at blocksize 64), on its thread count. This module
sums in the single-threaded order of the given vector width (``LANES``); a checkpoint that
bitsandbytes wrote stores its offset, and reading it is exact whatever the machine.

``roundtrip`` (what a merge onto dequant(quant(W)) needs) does not go through the packed codes:
``roundtrip_norms`` maps each scaled value to its code's value by a table of its top 18 bits and
decides the few values near a midpoint as ``quantize_4bit`` does, with the same bits as the
step-by-step ``roundtrip_reference`` at a tenth of its cost (see "the fused round trip" below).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass

import numpy as np

from loratool.kernels import cpu as native

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # double quantization's blocks of absmax values
LANES = 8  # torch's float32 vector width on AVX2 (the summation order of the offset)

# NF4: bitsandbytes' get_4bit_type("nf4"), as float32
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)
# FP4 (1 sign, 2 exponent, 1 mantissa bits, bias 2) in bit-pattern order, divided by its max (12) in float32
FP4 = np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
               dtype=np.float32) / np.float32(12.0)
CODES = {"nf4": NF4, "fp4": FP4}
# the codes sorted by value, as torch.argsort orders them (FP4's +0 before -0)
ORDER = {"nf4": np.arange(16), "fp4": np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3])}
_CLAMP_MIN = np.float32(1e-38)


def bounds(quant_type: str) -> np.ndarray:
    """The midpoints between the sorted code values (float32): bucketize's boundaries."""
    c = CODES[quant_type][ORDER[quant_type]]
    return (c[:-1] + c[1:]) / np.float32(2)


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is (or is to be) held in 4 bits."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False

    def __str__(self) -> str:
        return f"{self.quant_type},blocksize={self.blocksize}" + (",double-quant" if self.double_quant else "")


def parse_precision(text: str) -> QuantSpec | None:
    """``keep`` (None) or ``nf4|fp4[,blocksize=N][,double-quant]``; ValueError with the reason."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty; expected keep, nf4 or fp4")
    head = parts[0].lower()
    if head == "keep":
        if len(parts) > 1:
            raise ValueError("keep takes no options")
        return None
    if head not in QUANT_TYPES:
        raise ValueError(f"{parts[0]!r}: expected keep, nf4 or fp4")
    blocksize, double = 64, False
    for p in parts[1:]:
        key, _, value = p.partition("=")
        key = key.strip().lower().replace("_", "-")
        if key in ("double-quant", "dq") and not value:
            double = True
        elif key == "blocksize" and value.strip().isdigit() and int(value) in BLOCKSIZES:
            blocksize = int(value)
        elif key == "blocksize":
            raise ValueError(f"blocksize {value!r}: expected one of {', '.join(map(str, BLOCKSIZES))}")
        else:
            raise ValueError(f"{p!r}: unknown option; expected blocksize=N or double-quant")
    return QuantSpec(head, blocksize, double)


# -- 4-bit ----------------------------------------------------------------------------------------

def absmax_4bit(x: np.ndarray, blocksize: int) -> np.ndarray:
    """The absolute maximum of each block of the flat float32 ``x`` (the last one may be short)."""
    n = x.size
    full = n - n % blocksize
    out = np.empty(-(-n // blocksize), np.float32)
    if full:
        np.abs(x[:full].reshape(-1, blocksize)).max(axis=1, out=out[: full // blocksize])
    if n % blocksize:
        out[-1] = max(np.abs(x[full:]).max(), _CLAMP_MIN)  # bitsandbytes stores the clamped value here
    return out


def quantize_4bit(x: np.ndarray, blocksize: int = 64, quant_type: str = "nf4",
                  absmax: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 of ceil(n/2) bytes, absmax float32) of the flat float32 ``x``, as
    ``bitsandbytes.functional.quantize_4bit`` computes them. ``absmax``: the blocks' absmax when
    known already (``x`` may then be any run of whole blocks, ``absmax`` theirs)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    if absmax is None:
        absmax = absmax_4bit(x, blocksize)
    full = n - n % blocksize
    scaled = np.empty(n + n % 2, np.float32)
    scaled[n:] = 0  # an odd count is padded with a zero
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if full:
            recip = np.float32(1) / np.maximum(absmax[: full // blocksize], _CLAMP_MIN)
            np.multiply(x[:full].reshape(-1, blocksize), recip[:, None], out=scaled[:full].reshape(-1, blocksize))
        if n % blocksize:
            np.divide(x[full:], absmax[-1], out=scaled[full:n])
    np.clip(scaled, -1, 1, out=scaled)
    q = np.searchsorted(bounds(quant_type), scaled, side="left").astype(np.uint8)
    if quant_type != "nf4":
        q = ORDER[quant_type].astype(np.uint8)[q]
    return (q[0::2] << 4) | q[1::2], absmax


def codes_4bit(packed: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` 4-bit indices of ``packed`` (high nibble first), as uint8."""
    q = np.empty(packed.size * 2, np.uint8)
    np.right_shift(packed, 4, out=q[0::2])
    np.bitwise_and(packed, 0xF, out=q[1::2])
    return q[:n]


def dequantize_4bit_f32(packed: np.ndarray, absmax: np.ndarray, n: int, blocksize: int = 64,
                        quant_type: str = "nf4") -> np.ndarray:
    """``code[q] * absmax`` in float32 (flat, ``n`` values), before the cast to the dtype."""
    v = CODES[quant_type][codes_4bit(np.asarray(packed, np.uint8).reshape(-1), n)]
    full = n - n % blocksize
    if full:
        v[:full].reshape(-1, blocksize).__imul__(absmax[: full // blocksize, None])
    if n % blocksize:
        v[full:] *= absmax[full // blocksize]
    return v


def to_dtype_bits(v: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``v`` rounded to nearest even to ``dtype`` ("BF16", "F16", "F32") as raw elements
    (bfloat16 as its uint16 bits)."""
    if dtype == "F32":
        return v.astype("<f4", copy=False)
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return v.astype("<f2")
    u = v.astype(np.float32, copy=False).view(np.uint32)
    return ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype("<u2")


def from_dtype_bits(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw elements of ``dtype`` (bfloat16 as uint16 bits) as float32 (exact)."""
    if dtype == "BF16":
        return (np.asarray(raw).view("<u2").astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw).view("<f2" if dtype == "F16" else "<f4").astype(np.float32)


# -- double quantization --------------------------------------------------------------------------

def dynamic_map() -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map()`` (signed, 7 exponent bits, 8 bits) in float32: the
    midpoints of ``torch.linspace(0.1, 1, 2**i + 1)`` times 10**(i - 6), both signs, 0 and 1."""
    data: list[float] = []
    for i in range(7):
        m = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (m[:-1] + m[1:]) / np.float32(2)
        vals = np.float32(10.0 ** (-6 + i)) * means
        data += vals.tolist() + (-vals).tolist()
    data += [0.0, 1.0]
    return np.sort(np.array(data, np.float32))


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on the CPU: a float32 step, then
    start + step·i for the first half and end - step·(steps - 1 - i) for the second, each one
    fused multiply-add (exact product, one rounding to float32)."""
    s, e = np.float32(start), np.float32(end)
    step = (e - s) / np.float32(steps - 1)
    i = np.arange(steps, dtype=np.float64)
    half = steps // 2
    out = np.where(i < half, np.float64(s) + np.float64(step) * i, np.float64(e) - np.float64(step) * (steps - 1 - i))
    return out.astype(np.float32)


def torch_sum_f32(x: np.ndarray, lanes: int = LANES) -> np.float32:
    """torch's single-threaded float32 sum of a contiguous vector (``cascade_sum`` in
    aten/src/ATen/native/cpu/SumKernel.cpp): vectors of ``lanes`` elements summed by four
    accumulators with a 4-level cascade (16 steps a level), the leftover vectors into the first,
    the four added together, then the scalar tail and the lanes added one by one."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    n = x.size
    if n < lanes:  # shorter than a vector: the same cascade over single elements
        lanes = 1
    nvec = n // lanes
    size = nvec // 4  # rows of 4 vectors
    acc0 = np.zeros((4, lanes), np.float32)
    if size:
        rows = x[: size * 4 * lanes].reshape(size, 4, lanes)
        power = max(4, _ceil_log2(size) // 4)
        step = 1 << power
        mask = step - 1
        levels = [np.zeros((4, lanes), np.float32) for _ in range(4)]
        i = 0
        groups = size // step
        if groups:
            # each full group of ``step`` rows: a sequential chain from zero into level 0
            g = np.add.accumulate(rows[: groups * step].reshape(groups, step, 4, lanes), axis=1,
                                  dtype=np.float32)[:, -1]
            for k in range(groups):
                levels[0] = levels[0] + g[k]
                i += step
                for j in range(1, 4):
                    levels[j] = levels[j] + levels[j - 1]
                    levels[j - 1] = np.zeros((4, lanes), np.float32)
                    if i & (mask << (j * power)):
                        break
        for r in range(i, size):
            levels[0] = levels[0] + rows[r]
        acc0 = levels[0]
        for j in range(1, 4):
            acc0 = acc0 + levels[j]
    vec = acc0[0].copy()
    for r in range(size * 4, nvec):
        vec = vec + x[r * lanes:(r + 1) * lanes]
    for k in range(1, 4):
        vec = vec + acc0[k]
    total = np.float32(0)
    for v in x[nvec * lanes:]:
        total = np.float32(total + v)
    for v in vec:
        total = np.float32(total + v)
    return total


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else math.ceil(math.log2(x))


LUT_STEPS = 65535  # the CPU kernel's table of normalized values: 65536 entries over [-1, 1]


def _lut(code: np.ndarray) -> np.ndarray:
    """The CPU kernel's lookup table: for each k of 0..65535, the index of the code value nearest
    to k/65535·2 - 1 (the lower one on a tie)."""
    key = code.tobytes()
    lut = _LUTS.get(key)
    if lut is None:
        vals = np.arange(LUT_STEPS + 1) / LUT_STEPS * 2 - 1
        c = code.astype(np.float64)
        lo = np.clip(np.searchsorted(c, vals, side="right") - 1, 0, c.size - 1)
        hi = np.minimum(lo + 1, c.size - 1)
        lut = np.where(np.abs(vals - c[hi]) < np.abs(vals - c[lo]), hi, lo).astype(np.uint8)
        _LUTS[key] = lut
    return lut


_LUTS: dict[bytes, np.ndarray] = {}


def quantize_blockwise_8bit(x: np.ndarray, code: np.ndarray, blocksize: int = NESTED_BLOCKSIZE
                            ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 indices, absmax float32) of the flat float32 ``x``, as bitsandbytes' CPU kernel
    computes them: each value divided by its block's absmax, clamped to [-1, 1], mapped to
    k = trunc(((v + 1)·0.5)·65535 + 0.5) in float32, and k through a table of the nearest code
    index (``_lut``): not always the nearest code to v itself."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    n = x.size
    nb = -(-n // blocksize)
    padded = np.zeros(nb * blocksize, np.float32)
    padded[:n] = x
    absmax = np.abs(padded.reshape(nb, blocksize)).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (padded.reshape(nb, blocksize) / absmax[:, None]).reshape(-1)[:n]
    v = np.clip(v, np.float32(-1), np.float32(1))
    k = ((v + np.float32(1)) * np.float32(0.5)) * np.float32(LUT_STEPS) + np.float32(0.5)
    k = np.nan_to_num(k, nan=0.0).astype(np.int64)
    return _lut(np.asarray(code, np.float32))[k], absmax


def dequantize_blockwise_8bit(q: np.ndarray, absmax: np.ndarray, code: np.ndarray,
                              blocksize: int = NESTED_BLOCKSIZE) -> np.ndarray:
    """``code[q] * absmax`` in float32 (flat)."""
    q = np.asarray(q, np.uint8).reshape(-1)
    v = code.astype(np.float32)[q]
    return v * np.repeat(absmax.astype(np.float32), blocksize)[: q.size]


@dataclass
class NestedAbsmax:
    """The absmax vector of a 4-bit tensor in 8 bits (double quantization)."""

    qabsmax: np.ndarray  # uint8, one per 4-bit block
    nested_absmax: np.ndarray  # float32, one per NESTED_BLOCKSIZE values
    nested_code: np.ndarray  # float32 (256,)
    offset: np.float32
    blocksize: int = NESTED_BLOCKSIZE

    def dequantize(self) -> np.ndarray:
        """The float32 absmax the 4-bit dequantization scales by."""
        v = dequantize_blockwise_8bit(self.qabsmax, self.nested_absmax, self.nested_code, self.blocksize)
        return v + np.float32(self.offset)


def quantize_absmax(absmax: np.ndarray, lanes: int = LANES) -> NestedAbsmax:
    """Double quantization of ``absmax``, as ``quantize_4bit(..., compress_statistics=True)``."""
    absmax = np.asarray(absmax, np.float32)
    offset = np.float32(torch_sum_f32(absmax, lanes) / np.float32(absmax.size))
    code = dynamic_map()
    q, nested = quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
    return NestedAbsmax(q, nested, code, offset)


def scales(x: np.ndarray, spec: QuantSpec, lanes: int = LANES) -> np.ndarray:
    """The float32 factor each 4-bit block of the flat float32 ``x`` is dequantized with: its
    absmax, or with double quantization the absmax after its 8-bit round trip."""
    absmax = absmax_4bit(x, spec.blocksize)
    return quantize_absmax(absmax, lanes).dequantize() if spec.double_quant else absmax


def dequantize(packed: np.ndarray, scale: np.ndarray, shape: tuple[int, ...], dtype: str, blocksize: int = 64,
               quant_type: str = "nf4", count: int | None = None) -> np.ndarray:
    """Raw elements of ``dtype`` (flat): bitsandbytes' ``dequantize_4bit`` of a tensor of
    ``shape`` (``count`` of its first elements; all by default) from its ``packed`` bytes and the
    float32 ``scale`` of each block (absmax, or the double-quantized absmax dequantized)."""
    n = math.prod(shape) if count is None else count
    v = dequantize_4bit_f32(packed, scale, n, blocksize, quant_type)
    if shape and shape[-1] % 2 and quant_type == "fp4":
        v += np.float32(0)  # -0 + 0 = +0: the compiled fallback kernel's zeros (see the module docstring)
    return to_dtype_bits(v, dtype)


def roundtrip(raw: np.ndarray, dtype: str, spec: QuantSpec, scale: np.ndarray | None = None,
              absmax: np.ndarray | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """dequant(quant(W)) of the raw elements ``raw`` (``dtype``: "BF16", "F16" or "F32"), as raw
    elements of ``dtype``, in ``raw``'s shape: bitsandbytes' ``dequantize_4bit(*quantize_4bit(W))``.

    ``raw`` may be a run of whole blocks of a larger tensor (a row block) whose ``shape`` is then
    given; ``scale`` (the dequantization factors, ``scales``) and ``absmax`` (the blocks' absmax)
    are then those blocks'. Without them they are computed from ``raw`` (which must then be the
    whole tensor). Computed by ``roundtrip_norms`` (the fused path)."""
    return roundtrip_norms(raw, dtype, spec, scale, absmax, shape, norms=False)[0]


def roundtrip_reference(raw: np.ndarray, dtype: str, spec: QuantSpec, scale: np.ndarray | None = None,
              absmax: np.ndarray | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``roundtrip`` step by step, as bitsandbytes runs it: the packed codes by ``searchsorted``
    against the midpoints, then ``dequantize`` (the reference ``roundtrip`` is checked against).

    ``raw`` may be a run of whole blocks of a larger tensor (a row block) whose ``shape`` is then
    given; ``scale`` (the dequantization factors, ``scales``) and ``absmax`` (the blocks' absmax)
    are then those blocks'. Without them they are computed from ``raw`` (which must then be the
    whole tensor)."""
    out_shape = np.shape(raw)
    x = from_dtype_bits(np.ascontiguousarray(raw).reshape(-1), dtype)
    if absmax is None:
        absmax = absmax_4bit(x, spec.blocksize)
    if scale is None:
        scale = quantize_absmax(absmax).dequantize() if spec.double_quant else absmax
    packed, _ = quantize_4bit(x, spec.blocksize, spec.quant_type, absmax=absmax)
    bits = dequantize(packed, scale, shape or out_shape, dtype, spec.blocksize, spec.quant_type, count=x.size)
    return bits.reshape(out_shape)


# -- the fused round trip -------------------------------------------------------------------------
#
# Where the C extension is built (``loratool.kernels.cpu.roundtrip``, x86-64 with AVX2 or AVX-512),
# ``_roundtrip_chunk`` hands each chunk to its loop, which computes the same float32 operations in
# the same order (the code found by a binary search of the midpoints) and so the same bits; what
# follows is the numpy path, taken elsewhere, with ``LORATOOL_NATIVE=0``, and for values not finite.
#
# dequant(quant(W)) needs the code *value* of each element, never its packed index, so the fused
# path goes straight from the scaled float32 value to the code value, by table: the top KEY_BITS
# (18) bits of a float32 (sign, exponent, 9 mantissa bits) name a run of 16384 consecutive floats,
# monotonic in value, and for all but the few runs that hold a midpoint between two codes every
# float of the run has the same nearest code. ``key_table`` holds that code's value for each run,
# NaN for the runs that straddle a midpoint; the elements that land there (0.3% of a weight's
# elements, against 1.4% with 16 bits; of the 1 MB table, the scaled values in [-1, 1] read a small
# part) are decided exactly as
# ``quantize_4bit`` decides them (``searchsorted`` against the midpoints, a value on a midpoint
# taking the lower code). Everything else is float32 arithmetic in the order bitsandbytes runs it,
# in per-thread buffers reused from block to block.

UINT = {"BF16": np.dtype("<u2"), "F16": np.dtype("<u2"), "F32": np.dtype("<u4")}
_ABS_MASK = {"BF16": 0x7FFF, "F16": 0x7FFF, "F32": 0x7FFFFFFF}
_KEYS: dict[str, np.ndarray] = {}
_SCRATCH = threading.local()
SCRATCH_MAX = 1 << 22  # elements: per-thread buffers are kept for blocks up to this size
NORM_CHUNK = 1 << 16  # float32 elements summed by one dot product (the chunks' sums added in float64)


KEY_BITS = 18  # the top bits of a scaled float32 that index ``key_table``
KEY_SHIFT = 32 - KEY_BITS


def key_table(quant_type: str) -> np.ndarray:
    """float32 (2**KEY_BITS,): the code value (unscaled) of the float32 values whose top KEY_BITS
    bits are the index, NaN where those values do not all have the same nearest code."""
    table = _KEYS.get(quant_type)
    if table is None:
        first = np.arange(1 << KEY_BITS, dtype=np.uint32) << np.uint32(KEY_SHIFT)
        b = bounds(quant_type)
        lo = np.searchsorted(b, first.view(np.float32), side="left")
        hi = np.searchsorted(b, (first | np.uint32((1 << KEY_SHIFT) - 1)).view(np.float32), side="left")
        table = CODES[quant_type][ORDER[quant_type][lo]].astype(np.float32)
        table[lo != hi] = np.nan
        _KEYS[quant_type] = table
    return table


def absmax_bits(raw: np.ndarray, dtype: str, blocksize: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """``absmax_4bit`` of the flat raw elements ``raw`` (``dtype``) from their bits: |x| is the
    bits without the sign, whose integer order is the order of the values (a NaN above them all,
    as ``max`` propagates it). ``scratch``: room for ``raw.size`` elements of UINT[dtype]."""
    u = np.asarray(raw).view(UINT[dtype]).reshape(-1)
    if u.flags.c_contiguous:
        got = native.absmax(u, dtype, blocksize)  # the C loop, where it is built (kernels/cpu.c)
        if got is not None:
            return got
    n = u.size
    a = np.empty(n, u.dtype) if scratch is None else scratch.view(u.dtype)[:n]
    np.bitwise_and(u, u.dtype.type(_ABS_MASK[dtype]), out=a)
    full = n - n % blocksize
    m = np.empty(-(-n // blocksize), u.dtype)
    if full:
        a[:full].reshape(-1, blocksize).max(axis=1, out=m[: full // blocksize])
    if n % blocksize:
        m[-1] = a[full:].max()
    out = from_dtype_bits(m, dtype)
    if n % blocksize:
        out[-1] = max(out[-1], _CLAMP_MIN)  # bitsandbytes stores the clamped value here
    return out


def _buffers(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Four float32 buffers of ``n`` elements: this thread's, reused, for blocks up to SCRATCH_MAX."""
    if n > SCRATCH_MAX:
        return tuple(np.empty(n, np.float32) for _ in range(4))
    s = _SCRATCH.__dict__
    if s.get("n", 0) < n:
        s["bufs"], s["n"] = [np.empty(n, np.float32) for _ in range(4)], n
    return tuple(b[:n] for b in s["bufs"])


def _index_buffer(n: int) -> np.ndarray:
    """An intp buffer of ``n`` elements: this thread's, reused, for blocks up to SCRATCH_MAX."""
    if n > SCRATCH_MAX:
        return np.empty(n, np.intp)
    s = _SCRATCH.__dict__
    if s.get("ni", 0) < n:
        s["index"], s["ni"] = np.empty(n, np.intp), n
    return s["index"][:n]


def _sum_sq(x: np.ndarray) -> float:
    """Σ x² of float32 ``x``: float32 dot products of NORM_CHUNK elements, added in float64."""
    return sum(float(np.dot(x[k:k + NORM_CHUNK], x[k:k + NORM_CHUNK])) for k in range(0, x.size, NORM_CHUNK))


def roundtrip_norms(raw: np.ndarray, dtype: str, spec: QuantSpec, scale: np.ndarray | None = None,
                    absmax: np.ndarray | None = None, shape: tuple[int, ...] | None = None,
                    norms: bool = True, out: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """(``roundtrip``'s raw elements, ‖W‖², ‖W − dequant(quant(W))‖²) of ``raw``; the two sums
    (float32 chunks added in float64) are 0 unless ``norms``. Arguments as ``roundtrip``; ``out``:
    where to write the raw elements (flat, ``raw.size`` of them, dtype's raw elements), else a new
    array. Per-thread buffers: calls may run in several threads at once.

    The elements go through in chunks of CHUNK (whole blocks), so that the dozen passes over each
    chunk work in the core's cache and the buffers stay small: pieces of 4M elements (the blocks
    the torch engine's workers compute ahead) took 7.3 ns/element in one call, 4.4 in chunks
    (one thread, on the 1.1B base's up_proj, bf16, nf4); the numpy engine's row
    blocks are small enough already (no change in its merges). The C loop keeps no buffers: it
    takes chunks of NATIVE_CHUNK, one call each."""
    out_shape = np.shape(raw)
    raw = np.ascontiguousarray(raw).reshape(-1)
    n, bs = raw.size, spec.blocksize
    if shape is None:
        shape = out_shape
    if scale is None and spec.double_quant:  # the nested absmax needs all the blocks' absmax
        absmax = absmax_bits(raw, dtype, bs) if absmax is None else absmax
        scale = quantize_absmax(absmax).dequantize()
    step = max(bs, (NATIVE_CHUNK if native.available() else CHUNK) // bs * bs)
    if n <= step:
        got, w_sq, q_sq = _roundtrip_chunk(raw, dtype, spec, scale, absmax, shape, norms, out)
        return got.reshape(out_shape), w_sq, q_sq
    if out is None:
        out = np.empty(n, _OUT_DTYPE[dtype])
    w_sq = q_sq = 0.0
    for e0 in range(0, n, step):
        e1, b0, b1 = min(n, e0 + step), e0 // bs, -(-min(n, e0 + step) // bs)
        _, w, q = _roundtrip_chunk(raw[e0:e1], dtype, spec, None if scale is None else scale[b0:b1],
                                   None if absmax is None else absmax[b0:b1], shape, norms, out[e0:e1])
        w_sq, q_sq = w_sq + w, q_sq + q
    return out.view(_OUT_DTYPE[dtype]).reshape(out_shape), w_sq, q_sq


CHUNK = 1 << 17  # elements of a tensor that the round trip takes at a time (its buffers: 2.5 MB)
NATIVE_CHUNK = 1 << 22  # the C loop keeps no buffers: a call per 4M elements (the Python around it once)
_OUT_DTYPE = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}  # as _round_into


def _roundtrip_chunk(raw: np.ndarray, dtype: str, spec: QuantSpec, scale: np.ndarray | None,
                     absmax: np.ndarray | None, shape: tuple[int, ...], norms: bool,
                     out: np.ndarray | None) -> tuple[np.ndarray, float, float]:
    """``roundtrip_norms`` of the flat ``raw``, whole blocks (but for a tensor's last), at once;
    ``scale`` given where the spec double-quantizes (``roundtrip_norms`` computes it)."""
    n, bs = raw.size, spec.blocksize
    add_zero = bool(shape and shape[-1] % 2 and spec.quant_type == "fp4")
    # the C loop (kernels/cpu.c), equal to what follows bit for bit, where it is built
    out_c = np.empty(n, _OUT_DTYPE[dtype]) if out is None else out.view(_OUT_DTYPE[dtype])
    got = native.roundtrip(raw, dtype, *_sorted_codes(spec.quant_type), bs, scale, absmax, add_zero, out_c, norms)
    if got is not None:
        return out_c, *got
    x, s, v, k = _buffers(n)
    if absmax is None:
        absmax = absmax_bits(raw, dtype, bs, k)
    if scale is None:  # no double quantization: the blocks scale by their absmax
        scale = absmax
    if dtype == "BF16":  # exact: the bits, shifted up
        xu = x.view(np.uint32)
        np.copyto(xu, raw.view("<u2"))
        np.left_shift(xu, 16, out=xu)
    else:
        np.copyto(x, raw.view(RAW_FLOAT[dtype]))
    full, nb = n - n % bs, n // bs
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # the scaled values, as quantize_4bit computes them (no clamp: no midpoint lies outside (-1, 1))
        if full:
            recip = np.float32(1) / np.maximum(absmax[:nb], _CLAMP_MIN)
            np.multiply(x[:full].reshape(-1, bs), recip[:, None], out=s[:full].reshape(-1, bs))
        if n % bs:
            np.divide(x[full:], absmax[nb], out=s[full:])
        # their codes' values, by the table of top KEY_BITS bits (indices straight into intp, which
        # take would convert them to); the straddling runs exactly
        ku = k.view(np.uint32)
        ki = _index_buffer(n)
        np.right_shift(s.view(np.uint32), KEY_SHIFT, out=ki)
        np.take(key_table(spec.quant_type), ki, out=v, mode="clip")  # keys < 2**KEY_BITS: no check
        amb = np.flatnonzero(np.isnan(v))
        if amb.size:
            q = np.searchsorted(bounds(spec.quant_type), s[amb], side="left")
            v[amb] = CODES[spec.quant_type][ORDER[spec.quant_type][q]]
        # dequantize: code · scale in float32, rounded to the dtype
        if full:
            np.multiply(v[:full].reshape(-1, bs), scale[:nb, None], out=v[:full].reshape(-1, bs))
        if n % bs:
            np.multiply(v[full:], scale[nb], out=v[full:])
    if add_zero:
        v += np.float32(0)  # -0 + 0 = +0: the compiled fallback kernel's zeros (see the module docstring)
    out = _round_into(v, dtype, ku, out)
    if not norms:
        return out, 0.0, 0.0
    np.subtract(x, v, out=s)  # v holds the rounded values now: the quantization term q, exact
    return out, _sum_sq(x), _sum_sq(s)


RAW_FLOAT = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
_SORTED: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _sorted_codes(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(the 16 code values in sorted order, the 15 midpoints), float32: the C loop's tables."""
    got = _SORTED.get(quant_type)
    if got is None:
        got = _SORTED[quant_type] = (np.ascontiguousarray(CODES[quant_type][ORDER[quant_type]], np.float32),
                                     np.ascontiguousarray(bounds(quant_type)))
    return got


def _round_into(v: np.ndarray, dtype: str, scratch: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``v`` rounded to nearest even to ``dtype`` (as ``to_dtype_bits``) into ``out`` (raw
    elements; a new array if None); ``v`` is left holding the rounded values as float32.
    ``scratch``: uint32 of ``v``'s size."""
    if dtype == "BF16":
        u = v.view(np.uint32)
        np.right_shift(u, 16, out=scratch)
        np.bitwise_and(scratch, 1, out=scratch)
        np.add(scratch, 0x7FFF, out=scratch)
        np.add(u, scratch, out=u)
        np.bitwise_and(u, np.uint32(0xFFFF0000), out=u)
        out = np.empty(v.size, "<u2") if out is None else out.view("<u2")
        np.right_shift(u, 16, out=out, casting="unsafe")
        return out
    if dtype == "F16":
        out = np.empty(v.size, "<f2") if out is None else out.view("<f2")
        with np.errstate(over="ignore"):
            np.copyto(out, v, casting="same_kind")
        np.copyto(v, out)
        return out
    out = np.empty(v.size, "<f4") if out is None else out.view("<f4")
    np.copyto(out, v)
    return out

# -- the quant state as transformers serialises it ------------------------------------------------

STATE_PREFIX = "quant_state.bitsandbytes__"
AUX_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def parse_state(payload: bytes) -> dict:
    """The JSON of a ``quant_state.bitsandbytes__nf4|fp4`` tensor (``pack_dict_to_tensor``);
    ValueError on anything else."""
    state = json.loads(bytes(payload).decode("utf-8"))
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    qt = state.get("quant_type")
    if qt not in QUANT_TYPES:
        raise ValueError(f"quant_type {qt!r}: expected nf4 or fp4")
    if state.get("blocksize") not in BLOCKSIZES:
        raise ValueError(f"blocksize {state.get('blocksize')!r}: expected one of {BLOCKSIZES}")
    if state.get("dtype") not in TORCH_TO_ST:
        raise ValueError(f"dtype {state.get('dtype')!r}: expected bfloat16, float16 or float32")
    shape = state.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"shape {shape!r}: expected a list of sizes")
    if "nested_offset" in state and not isinstance(state["nested_offset"], (int, float)):
        raise ValueError(f"nested_offset {state['nested_offset']!r}: expected a number")
    return state


# -- writing: the quant state as ``QuantState.as_dict(packed=True)`` gives it ---------------------

ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


def state_json(spec: QuantSpec, dtype: str, shape: tuple[int, ...], nested: NestedAbsmax | None = None) -> bytes:
    """The bytes of ``quant_state.bitsandbytes__<type>``: ``pack_dict_to_tensor`` of the quant
    state's non-tensor entries, in ``as_dict``'s order (``json.dumps`` with its default separators)."""
    d = {"quant_type": spec.quant_type, "blocksize": spec.blocksize, "dtype": ST_TO_TORCH[dtype],
         "shape": list(shape)}
    if nested is not None:
        d.update({"nested_blocksize": nested.blocksize, "nested_dtype": "float32",
                  "nested_offset": float(nested.offset)})
    return json.dumps(d).encode("utf-8")


def state_tensors(name: str, spec: QuantSpec, dtype: str, shape: tuple[int, ...], absmax: np.ndarray,
                  nested: NestedAbsmax | None = None) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """(name, safetensors dtype, shape, bytes) of the tensors transformers writes beside the packed
    weight ``name`` (``absmax``: the blocks' float32 absmax; ``nested``: its double quantization)."""
    if nested is not None:
        aux = [("absmax", "U8", nested.qabsmax), ("quant_map", "F32", CODES[spec.quant_type]),
               ("nested_absmax", "F32", nested.nested_absmax), ("nested_quant_map", "F32", nested.nested_code)]
    else:
        aux = [("absmax", "F32", absmax), ("quant_map", "F32", CODES[spec.quant_type])]
    out = [(f"{name}.{k}", dt, (int(np.size(v)),), np.ascontiguousarray(v, STORE[dt]).tobytes()) for k, dt, v in aux]
    js = state_json(spec, dtype, shape, nested)
    out.append((f"{name}.{STATE_PREFIX}{spec.quant_type}", "U8", (len(js),), js))
    return out


STORE = {"U8": np.dtype("u1"), "F32": np.dtype("<f4")}
