"""The plain merge's arithmetic in numpy, so that ``merge`` need not import torch on the CPU.

``import torch`` costs a second or more of one core, as much as the whole arithmetic of merging
an r=16 adapter into a 1.1B model. For the plain case (one adapter at weight ±1 on a Linear
weight; no DoRA, no bias, float dtypes) the merge repeats PEFT's float32 arithmetic, and that
arithmetic needs no torch:

    D = B @ A              float32 GEMM: each element a chain of r fused multiply-adds, k = 0..r-1
    D = D · s              skipped when s = 1 (PEFT's ``(B @ A) * scale``; s rounded to float32)
    V = float32(W) + D     one rounding
    W' = V rounded once to the output dtype (round to nearest even)

The bits of that sequence equal torch's (``engines.TensorMath``, the PEFT-exact path) as long as
both GEMMs compute every element as one chain of FMAs in k order. Inside their register-blocked
kernels both BLAS libraries (MKL in torch, OpenBLAS in numpy) do; not in every kernel: torch's
differs for matrices of a few rows or columns, OpenBLAS's small-matrix path for some shapes
(e.g. 131 columns at r ≥ 32). So this path is taken for tensors of at least 16 rows and
columns with r ≤ 128, and only after a probe (``gemm_is_sequential``) has run numpy's GEMM on
this machine in the exact shape of each block and found the sequential chain;
``tests/test_npmerge.py`` checks torch's GEMM against the same chain, and the merge tests
compare the output with PEFT's bit for bit. Where anything does not hold, ``merge`` uses torch.

NaNs (a base that holds NaN or Inf weights; the merge refuses such adapters) are written as
torch writes them (``_torch_nans``), which the integer rounding alone would not do. Inf or NaN
where the base is finite is never written (issue 11): ``PlainMath`` checks each block before
rounding it (two reductions, max and min, in place of the NaN scan they make unnecessary) and
raises ``NonFiniteBlock``, which ends the merge with nothing published.

``NumpyEngine`` puts ``PlainMath`` behind the executor's row-block interface
(``engines.BlockEngine``): blocks in a few worker threads at once, on read-only mappings of the base rows, into
output arrays reused once the writer has copied them out.

A base file truncated by another process while the merge reads it (after the size check) ends the
process with SIGBUS on the mapped pages instead of an error line; the temporary output is left
beside OUT, as after a kill -9, never at OUT.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Callable

import numpy as np

from loratool._threads import default_workers
from loratool.adapter import LayerKind, TensorSource
from loratool.merge.engines import BLOCK_BYTES
from loratool.merge.overflow import _nonfinite_error
from loratool.merge.plan import Action, TensorPlan
from loratool.safetensors_io import TensorRef

# safetensors dtype -> numpy dtype of the raw elements (bfloat16 has none: its bits, as uint16)
RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
MIN_SIDE = 16  # rows and columns at least this (torch's GEMM sums smaller shapes differently)
MAX_RANK = 128


def raw_array(buf, dtype: str, count: int) -> np.ndarray:
    """The ``count`` elements at the start of ``buf`` (raw little-endian bytes) as RAW[dtype]."""
    return np.frombuffer(buf, dtype=RAW[dtype], count=count)


def to_float32(src: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Raw elements of ``dtype`` → float32 into ``out`` (exact for all three dtypes)."""
    if dtype == "BF16":
        bits = out.view(np.uint32)
        np.copyto(bits, src)  # two plain passes: faster than one shift with a cast
        np.left_shift(bits, 16, out=bits)
    else:
        np.copyto(out, src)
    return out


def _torch_nans(v: np.ndarray, dtype: str) -> np.ndarray:
    """The raw elements torch's float32 → ``dtype`` conversion gives for the NaNs ``v`` holds:
    0xFFFF for bfloat16 whatever the NaN; for float16 the hardware conversion's sign, quiet bit
    and top payload bits (numpy keeps the payload of a signalling NaN unquieted)."""
    if dtype == "BF16":
        return np.full(v.shape, 0xFFFF, np.uint16)
    u = v.view(np.uint32)
    return ((u >> 16) & 0x8000 | 0x7E00 | (u >> 13) & 0x3FF).astype(np.uint16).view(np.float16)


def round_from_float32(v: np.ndarray, dtype: str, out: np.ndarray, scratch: np.ndarray,
                       nans: np.ndarray | None = None, check_nans: bool = True) -> np.ndarray:
    """float32 ``v`` rounded to nearest even into ``out`` (raw elements of ``dtype``), NaNs as
    torch writes them; ``v`` and ``scratch`` (uint32, v's shape) are clobbered, ``nans`` (bool,
    v's shape) is scratch for the NaN check, which ``check_nans=False`` skips (the caller knows
    that ``v`` holds no NaN)."""
    if dtype != "F32" and check_nans:
        isnan = np.isnan(v, out=nans)
        if isnan.any():  # rare: NaN in the base, or a delta of inf - inf
            fixed = _torch_nans(v[isnan], dtype).view(out.dtype)
            v[isnan] = 0
            round_from_float32(v, dtype, out, scratch)
            out[isnan] = fixed
            return out
    if dtype == "BF16":
        u = v.view(np.uint32)
        np.right_shift(u, 16, out=scratch)
        np.bitwise_and(scratch, 1, out=scratch)
        np.add(scratch, 0x7FFF, out=scratch)
        np.add(u, scratch, out=u)
        np.right_shift(u, 16, out=u)
        np.copyto(out, u, casting="unsafe")
    else:
        with np.errstate(over="ignore"):  # overflow to ±inf is a value here, as in torch
            np.copyto(out, v, casting="same_kind")
    return out


@lru_cache(maxsize=None)
def _openblas_threads() -> tuple | None:
    """(get, set) of the OpenBLAS that numpy's wheels bundle (``numpy.libs``), or None."""
    import ctypes
    from pathlib import Path

    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(libs.glob("*openblas*")) if libs.is_dir() else []:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", "_64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                    return get, put
    return None


@contextmanager
def single_threaded_blas():
    """numpy's BLAS on the calling thread only, inside the block: the merge spreads blocks over
    its own threads, and OpenBLAS's pool would spin on the same cores. The setting is the
    process's (OpenBLAS has no other), restored on leaving; the CLI also sets
    OPENBLAS_NUM_THREADS=1 before numpy loads, for BLAS builds this cannot reach."""
    fns = _openblas_threads()
    if fns is None:
        yield
        return
    get, put = fns
    old = get()
    put(1)
    try:
        yield
    finally:
        put(old)


def _fma_chain(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The sequential FMA chain acc = fma(b[:, k], a[k], acc), k = 0..r-1, in float32. Exact only
    for the probe's values (in [1, 2): every acc + b·a fits a float64 without rounding)."""
    acc = np.zeros((b.shape[0], a.shape[1]), dtype=np.float32)
    b64, a64 = b.astype(np.float64), a.astype(np.float64)
    for k in range(b.shape[1]):
        acc = (acc + np.multiply.outer(b64[:, k], a64[k])).astype(np.float32)
    return acc


@lru_cache(maxsize=None)
def gemm_is_sequential(rows: int, cols: int, rank: int, gemm: Callable | None = None) -> bool:
    """Whether numpy's float32 GEMM (or ``gemm(b, a)``, given) computes (rows×rank) @ (rank×cols)
    as the sequential FMA chain here. BLAS libraries pick their kernels by shape and by CPU
    (OpenBLAS has a separate path for small products, and edge tiles; on AMD Zen 3 its kernel
    splits k from r = 8 on), so the probe runs the exact shape of the blocks it vouches for and
    checks the edge columns and a sample of the others against the chain."""
    rng = np.random.default_rng(rows * 1_000_003 + cols * 131 + rank)
    b = rng.uniform(1, 2, (rows, rank)).astype(np.float32)
    a = rng.uniform(1, 2, (rank, cols)).astype(np.float32)
    with single_threaded_blas():  # as the blocks will run
        got = (gemm or np.matmul)(b, a)
    cols_checked = np.unique(np.concatenate([np.arange(min(cols, 48)), np.arange(max(0, cols - 48), cols),
                                             rng.integers(0, cols, 32)]))
    return bool(np.array_equal(got[:, cols_checked], _fma_chain(b, a[:, cols_checked])))


def _factor(src: TensorSource, shape: tuple[int, ...]) -> np.ndarray | None:
    """A factor as a C-contiguous float32 array of ``shape`` (PEFT upcasts half-precision
    factors to float32), or None when it is not a float tensor in a file."""
    if not isinstance(src, TensorRef) or src.dtype not in RAW:
        return None
    raw = raw_array(src.raw(), src.dtype, src.info.numel)
    return to_float32(raw, src.dtype, np.empty(src.info.numel, np.float32)).reshape(shape)


def eligible(t: "TensorPlan", spans: list[tuple[int, int]]) -> bool:
    """Whether ``t``, computed in the row ``spans``, is a plain merge this module computes with
    PEFT's bits (see the module docstring)."""
    if t.action is not Action.MERGE or len(t.terms) != 1 or len(t.shape) != 2:
        return False
    term = t.terms[0]
    m = term.module
    # plain LoRA only: this engine reads the lora_A/lora_B bytes itself
    if term.part != "weight" or m.module_kind != "lora" or m.kind is not LayerKind.LINEAR or abs(term.coef) != m.scale:
        return False
    if t.src.dtype not in RAW or t.dtype not in RAW:
        return False
    if not all(isinstance(s, TensorRef) and s.dtype in RAW for s in (m.lora_A, m.lora_B)):
        return False
    rows, cols = t.shape
    rank = m.lora_A.shape[0]
    if not (1 <= rank <= MAX_RANK and rows >= MIN_SIDE and cols >= MIN_SIDE):
        return False
    if tuple(m.lora_B.shape) != (rows, rank) or tuple(m.lora_A.shape) != (rank, cols):
        return False
    return all(gemm_is_sequential(j - i, cols, rank) for i, j in set(spans))


_SCRATCH = threading.local()  # per thread, reused across blocks and tensors: no fresh pages to fault in


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = _SCRATCH.__dict__
    if s.get("n", 0) < n:
        s["v"], s["u"], s["b"], s["n"] = np.empty(n, np.float32), np.empty(n, np.uint32), np.empty(n, bool), n
    return s["v"][:n], s["u"][:n], s["b"][:n]


def _scale_commutes(b: np.ndarray, a: np.ndarray, coef: float) -> bool:
    """Whether B @ (coef·A) has exactly the bits of (B @ A)·coef: coef = ±2^k, and no product,
    partial sum or result of either chain leaves the normal range (scaling by 2^k then commutes
    with every rounding). Every nonzero intermediate is a multiple of the smallest product's
    quantum, min|b|·min|a|·2^-46, so bounding that from below and r·max|b|·max|a| from above
    is enough."""
    if coef == 0 or abs(math.frexp(coef)[0]) != 0.5:
        return False
    nb, na = np.abs(b[b != 0]), np.abs(a[a != 0])
    if not nb.size or not na.size:
        return True  # a zero factor: zeros either way
    low = float(nb.min()) * float(na.min()) * min(1.0, abs(coef)) * 2.0 ** -46
    high = float(nb.max()) * float(na.max()) * b.shape[1] * max(1.0, abs(coef))
    return low >= 2.0 ** -125 and high <= 2.0 ** 120


# The smallest float32 magnitude that rounds to ±inf in each output dtype: round to nearest even
# takes the midpoint between the largest finite value and the next power of two up to inf.
OVERFLOW = {"F32": np.float32(np.inf), "F16": np.float32(65520.0),
            "BF16": np.array(0x7F7F8000, np.uint32).view(np.float32)[()]}


class NonFiniteBlock(ArithmeticError):
    """Rows [i, j) of a merged tensor hold Inf or NaN where the base is finite: the adapter's
    values overflow the output dtype (issue 11). The executor turns it into an error that names
    the tensor and the adapters, and publishes nothing."""

    def __init__(self, i: int, j: int, count: int, row: int, col: int, value: float, base: float):
        super().__init__(f"rows [{i}, {j}): {count} non-finite values, first at [{row}, {col}]")
        self.i, self.j, self.count, self.row, self.col, self.value, self.base = i, j, count, row, col, value, base


class PlainMath:
    """Rows [i, j) of W + coef · B @ A for one eligible tensor, rounded to the output dtype.
    ``rows`` may run in several threads at once: each thread has its own scratch buffers.

    ``gemm``: numpy's matmul, which ``eligible`` has probed on this machine; tests put another
    GEMM here to check the rest of the arithmetic on CPUs whose BLAS sums differently.
    ``guard``: raise ``NonFiniteBlock`` where a block would be written with Inf/NaN that the base
    does not hold (the merge's last guard against overflow; tests turn it off to compare the
    rounding of overflowing values with torch's)."""

    gemm = staticmethod(np.matmul)
    guard = True

    def __init__(self, t: "TensorPlan"):
        term = t.terms[0]
        rows, cols = t.shape
        rank = term.module.lora_A.shape[0]
        self.src_dtype, self.dtype = t.src.dtype, t.dtype
        self.b = _factor(term.module.lora_B, (rows, rank))
        self.a = _factor(term.module.lora_A, (rank, cols))
        self.coef = None if term.coef == 1 else np.float32(term.coef)
        if self.coef is not None and _scale_commutes(self.b, self.a, term.coef):
            self.a, self.coef = self.a * self.coef, None  # one pass less per block, same bits
        self.cols = cols

    def rows(self, w: np.ndarray, i: int, j: int, out: np.ndarray | None = None) -> np.ndarray:
        """``w``: the base rows [i, j) as raw elements (RAW[src dtype]), shape (j - i, cols).
        ``out``: where to put the result (RAW[output dtype], at least (j - i) · cols elements)."""
        with np.errstate(all="ignore"):  # overflow to ±inf is a value here, as in torch
            return self._rows(w, i, j, out)

    def _rows(self, w: np.ndarray, i: int, j: int, out: np.ndarray | None) -> np.ndarray:
        n = (j - i) * self.cols
        v, u, nans = (x.reshape(j - i, self.cols) for x in _scratch(n))
        self.gemm(self.b[i:j], self.a, out=v)
        if self.coef is not None:
            np.multiply(v, self.coef, out=v)
        w32 = to_float32(w, self.src_dtype, u.view(np.float32))
        np.add(v, w32, out=v)
        no_nans = self.guard and self._check_finite(v, w32, i)
        out = np.empty(n, RAW[self.dtype]) if out is None else out[:n]
        return round_from_float32(v, self.dtype, out.reshape(j - i, self.cols), u, nans, check_nans=not no_nans)

    def _check_finite(self, v: np.ndarray, w32: np.ndarray, i: int) -> bool:
        """Raise ``NonFiniteBlock`` if the unrounded rows ``v`` round to Inf/NaN anywhere the base
        rows ``w32`` are finite; return whether ``v`` is free of NaN (the rounding then need not
        look for them). The common case is two read-only reductions (NaN propagates through
        max and min, so the comparisons fail on it): no slower than the NaN check it replaces."""
        limit = OVERFLOW[self.dtype]
        if v.max() < limit and v.min() > -limit:
            return True
        bad = ~(np.abs(v) < limit) & np.isfinite(w32)
        if bad.any():
            k = int(np.argmax(bad))
            row, col = divmod(k, self.cols)
            value = float(v.flat[k])  # unrounded: as written, it is inf unless NaN
            raise NonFiniteBlock(i, i + v.shape[0], int(np.count_nonzero(bad)), i + row, col,
                                 value if math.isnan(value) else math.copysign(math.inf, value), float(w32.flat[k]))
        return False


class NumpyEngine:
    """``PlainMath`` behind the executor's row-block interface (``engines.BlockEngine``), for
    plans where every computed tensor is ``eligible``: blocks of read-only mapped base rows (no
    bytes copied), computed in ``default_workers()`` threads at once, each BLAS call on its own
    thread (``single_threaded_blas``); output arrays come back through ``recycle`` (no fresh
    pages to fault in for every block)."""

    device = "cpu"
    mapped = True

    def __init__(self):
        self.workers = default_workers()
        self.outs: list[np.ndarray] = []  # output arrays to reuse (list.pop and append are atomic)

    def running(self):
        return single_threaded_blas()

    def takes_transform(self, t) -> bool:
        """The executor applies transforms (``basequant``) to the base rows before this engine."""
        return False

    def tensor(self, t: TensorPlan) -> Callable:
        return partial(self._block, t, PlainMath(t))

    def _block(self, t: TensorPlan, math_: PlainMath, buf, n: int, i: int, j: int) -> np.ndarray:
        """Rows [i, j) of ``t`` from the first ``n`` bytes of ``buf`` (in a worker thread)."""
        w = raw_array(buf, t.src.dtype, n // RAW[t.src.dtype].itemsize).reshape(j - i, -1)
        try:
            out = self.outs.pop()
        except IndexError:
            out = None
        size = w.size * RAW[math_.dtype].itemsize
        if out is None or out.nbytes < size:
            out = np.empty(-(-max(size, BLOCK_BYTES) // 8) * 8, np.uint8)  # any itemsize views it
        try:
            return math_.rows(w, i, j, out.view(RAW[math_.dtype]))
        except NonFiniteBlock as e:
            raise _nonfinite_error(t, e.count, e.row, e.col, e.value, e.base) from None

    def recycle(self, block: np.ndarray) -> None:
        self.outs.append(block.base if block.base is not None else block)
