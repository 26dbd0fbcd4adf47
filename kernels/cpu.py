"""The C loops of ``kernels/cpu.c`` (the extension ``loratool.kernels._cpu``), for numpy arrays.

    roundtrip(raw, dtype, vals, bnds, blocksize, scale, absmax, add_zero, out, norms)
        bitsandbytes' 4-bit round trip of whole blocks; its reference is ``loratool.quant.bnb``'s
        numpy path, which it equals bit for bit (tests/kernels/test_cpu_kernels.py)
    absmax(raw, dtype, blocksize)
        each block's absmax, as ``bnb.absmax_bits``
    kth_largest_abs(t, k)
        compose's magnitude-pruning threshold, as ``numpy.partition`` of |t| finds it
    parity_block(w, wdtype, m, mdtype, left, right, emin, mant)
        (max |M − X|, max |M − X| / ulp(X)) of a row block, X = W + left @ right in float64; its
        reference is ``loratool.merge.paritystream.check_block``'s first pass

Each returns None where it does not apply: the extension is not built (it is optional: no C
compiler at install), ``LORATOOL_NATIVE=0`` is set, or a value is not finite (NaN, Inf), which
numpy then decides as it always has. The extension is a plain shared object to ctypes, which
releases the GIL during each call; nothing is loaded before the first call.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading

import numpy as np

DTYPES = {"BF16": 0, "F16": 1, "F32": 2, "F64": 3}
MAX_BLOCK = 4096  # the largest quantization block the C loop takes (cpu.c's MAX_BLOCK)

_lock = threading.Lock()
_lib: list = []  # [the loaded library or None], once tried


def _load():
    try:
        spec = importlib.util.find_spec("loratool.kernels._cpu")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lt_roundtrip.argtypes = [p, i32, i64, i64, p, p, p, p, i32, p, p]
    lib.lt_roundtrip.restype = i32
    lib.lt_parity_block.argtypes = [p, i32, p, i32, p, p, i64, i64, i64, i32, i32, p]
    lib.lt_parity_block.restype = i32
    lib.lt_absmax.argtypes, lib.lt_absmax.restype = [p, i32, i64, i64, p], i32
    lib.lt_kth_largest_abs.argtypes, lib.lt_kth_largest_abs.restype = [p, i64, i64, p, p, p], i32
    lib.lt_isa.argtypes, lib.lt_isa.restype = [], i32
    lib.lt_cap_isa.argtypes, lib.lt_cap_isa.restype = [i32], i32
    return lib


def lib():
    """The loaded extension, or None (not built, or ``LORATOOL_NATIVE=0``)."""
    if os.environ.get("LORATOOL_NATIVE", "1") == "0":
        return None
    if not _lib:
        with _lock:
            if not _lib:
                _lib.append(_load())
    return _lib[0]


ISAS = {2: "x86-64-v4", 1: "x86-64-v3", 0: "none (numpy)"}


def available() -> bool:
    """Whether the C loops run here (built, and a CPU they were compiled for)."""
    L = lib()
    return L is not None and L.lt_isa() > 0


def isa() -> str | None:
    """The instruction set the C loops run on (``ISAS``), or None where they are not built."""
    L = lib()
    return None if L is None else ISAS[L.lt_isa()]


def cap_isa(level: int) -> str | None:
    """Caps the C loops' instruction set at ``level`` (2 x86-64-v4, 1 x86-64-v3, 0 none: numpy):
    tests run every copy the CPU can. Returns the one now used."""
    L = lib()
    return None if L is None else ISAS[L.lt_cap_isa(level)]


ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}


def _check(a: np.ndarray, dtype: str, count: int, write: bool = False) -> None:
    """The C loops read (or, ``write``, write) ``count`` elements of ``dtype`` from ``a``'s first
    byte: refused here, not read past its end, when it is shorter, not contiguous or read-only."""
    if not a.flags.c_contiguous or a.nbytes < count * ITEMSIZE[dtype] or (write and not a.flags.writeable):
        raise ValueError(f"{count} elements of {dtype} expected in a contiguous{' writable' if write else ''} "
                         f"buffer of {a.nbytes} bytes")


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


def roundtrip(raw: np.ndarray, dtype: str, vals: np.ndarray, bnds: np.ndarray, blocksize: int,
              scale: np.ndarray | None, absmax: np.ndarray | None, add_zero: bool, out: np.ndarray,
              norms: bool) -> tuple[float, float] | None:
    """Writes dequant(quant(raw)) into ``out`` (raw elements of ``dtype``, ``raw.size`` of them) and
    returns (‖W‖², ‖W − dequant(quant(W))‖²) (zeros unless ``norms``), or None where the numpy path
    must compute it (``out`` may then hold part of the result).

    ``raw``: flat, C-contiguous raw elements of ``dtype`` (BF16, F16, F32), whole blocks but for a
    tensor's last; ``vals``: the 16 code values in sorted order, ``bnds`` the 15 midpoints (float32);
    ``scale``: each block's dequantization factor, None for its absmax; ``absmax``: each block's
    absmax, None to compute it; ``add_zero``: FP4's -0 + 0 (``bnb._roundtrip_chunk``)."""
    L = lib()
    if L is None or dtype not in ("BF16", "F16", "F32") or blocksize > MAX_BLOCK:
        return None
    if any(a is not None and a.dtype != np.float32 for a in (scale, absmax)):
        return None  # numpy computes with float64 factors before rounding: its path, not this one
    blocks = -(-raw.size // blocksize)
    _check(raw, dtype, raw.size)
    _check(out, dtype, raw.size, write=True)
    for a, n in ((scale, blocks), (absmax, blocks), (vals, 16), (bnds, 15)):
        if a is not None and (a.dtype != np.float32 or a.size < n or not a.flags.c_contiguous):
            raise ValueError("roundtrip: tables or per-block factors of the wrong size, dtype or layout")
    sums = np.zeros(2) if norms else None
    rc = L.lt_roundtrip(raw.ctypes.data, DTYPES[dtype], raw.size, blocksize, vals.ctypes.data, bnds.ctypes.data,
                        _ptr(scale), _ptr(absmax), int(add_zero), out.ctypes.data, _ptr(sums))
    if rc:
        return None
    return (float(sums[0]), float(sums[1])) if norms else (0.0, 0.0)


def absmax(raw: np.ndarray, dtype: str, blocksize: int) -> np.ndarray | None:
    """The absmax of each block of the flat, C-contiguous raw elements ``raw`` (float32; the last
    block may be short, its absmax clamped to 1e-38), as ``bnb.absmax_bits``; or None (numpy
    decides: not built, a value not finite)."""
    L = lib()
    if L is None or dtype not in ("BF16", "F16", "F32"):
        return None
    _check(raw, dtype, raw.size)
    out = np.empty(-(-raw.size // blocksize), np.float32)
    return None if L.lt_absmax(raw.ctypes.data, DTYPES[dtype], raw.size, blocksize, out.ctypes.data) else out


def kth_largest_abs(t: np.ndarray, k: int) -> tuple[float, int, int] | None:
    """(the k-th largest |t|, how many |t| exceed it, how many equal it) of the flat float32 ``t``
    (1 <= k <= t.size), as ``numpy.partition`` of |t| finds it; or None (not built)."""
    L = lib()
    if L is None or t.dtype != np.float32 or not 1 <= k <= t.size:
        return None
    _check(t, "F32", t.size)
    thr, above, equal = np.zeros(1, np.uint32), np.zeros(1, np.int64), np.zeros(1, np.int64)
    if L.lt_kth_largest_abs(t.ctypes.data, t.size, k, thr.ctypes.data, above.ctypes.data, equal.ctypes.data):
        return None
    return float(thr.view(np.float32)[0]), int(above[0]), int(equal[0])


def parity_block(w: np.ndarray, wdtype: str, m: np.ndarray, mdtype: str, left: np.ndarray, right: np.ndarray,
                 emin: int, mant: int) -> tuple[float, float] | None:
    """(max |M − X|, max |M − X| / ulp(X)), X = W + left @ right in float64 and ulp(X) =
    2^(⌊log2|X|⌋ − mant), at least 2^(emin − mant); or None (numpy decides: not built, a dtype it
    does not take, a value not finite).

    ``w``: rows × cols raw elements of ``wdtype`` (BF16, F16, F32, F64), ``m``: of ``mdtype`` (BF16,
    F16), flat and C-contiguous; ``left`` (rows, R), ``right`` (R, cols): float64, C-contiguous."""
    L = lib()
    if L is None or mdtype not in ("BF16", "F16") or wdtype not in DTYPES:
        return None
    rows, R = left.shape
    cols = right.shape[1]
    if left.dtype != np.float64 or right.dtype != np.float64 or not (left.flags.c_contiguous
                                                                        and right.flags.c_contiguous):
        return None
    if right.shape[0] != R:
        raise ValueError("parity_block: left and right do not share their rank")
    _check(w, wdtype, rows * cols)
    _check(m, mdtype, rows * cols)
    res = np.empty(2)
    rc = L.lt_parity_block(w.ctypes.data, DTYPES[wdtype], m.ctypes.data, DTYPES[mdtype], left.ctypes.data,
                           right.ctypes.data, rows, cols, R, emin, mant, res.ctypes.data)
    return None if rc else (float(res[0]), float(res[1]))
