"""Parity's streaming check (issue 14): base and merged checkpoint read once, in row blocks, the
float64 reference recomputed blockwise in numpy, without torch.

For every merged tensor whose terms have a low-rank form laid out in rows (LoRA on Linear, Conv1D
and Embedding weights, and PEFT's lora_B bias; not DoRA, not Conv2d, which ``parity`` checks with
torch), rows [i, j) of the delta in the base layout are ``left[i:j] @ right`` (``layout.
block_factors``), the coefficients folded into ``left`` and the terms stacked along the rank:

    X = W + L[i:j] @ R                 float64 (one GEMM of r products per element: exact to
                                        float64 rounding, far below one ulp of M's dtype)
    tol = ulp(X) + γ·(|W| + |L|[i:j] @ |R|)     γ = (r + 4)·2⁻²⁴, ``parity._bound``'s formula
    pass: |M − X| ≤ tol

A term that adds into some rows of the tensor only (``plan.Term.rows``: q, k or v of a fused
``in_proj_weight``) has zero rows of ``left`` elsewhere.

The first pass over a block (X, ulp(X), |M − X| and their maxima: ``check_block``) runs in C
where the extension is built (``loratool.kernels.cpu.parity_block``: one fused loop, the rank-r
product included, against the dozen numpy passes); numpy computes it otherwise, and decides every
block the first pass does not pass (an element past one ulp of X, a value not finite).

Base and merged rows are mapped read-only and populated ahead of the math by two reader threads
(``reader._Reader``, as the merge reads its base); blocks are computed in a few worker threads,
each BLAS call on its own thread; mappings are released tensor by tensor, so the peak stays a few
tensors' bytes whatever the model's size. Untouched tensors are compared as raw bytes in 8 MB
chunks in another thread while the blocks are computed.

A checkpoint merged with ``--base-precision`` is streamed the same way, W being the base rows
through the merge's own transform (``basequant.Requantize``: bitsandbytes' round trip, in numpy,
row blocks cut at quantization blocks); bases stored quantized (bitsandbytes 4-bit, GPTQ, AWQ)
are checked in torch (``parity._check_merge``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from loratool import boundary
from loratool._threads import default_workers
from loratool.adapter import LayerKind, float_values
from loratool.errors import InputError
from loratool.kernels import cpu as native
from loratool.kinds.layout import block_factors
from loratool.merge.basequant import MATH_THREADS
from loratool.merge.engines import row_spans
from loratool.merge.numpy_engine import single_threaded_blas
from loratool.merge.plan import Action, TensorPlan
from loratool.merge.reader import _Reader
from loratool.merge.workers import QUEUE_DEPTH
from loratool.safetensors_io import TensorRef

U32 = 2.0**-24  # float32 unit roundoff
# safetensors dtype -> (raw elements, mantissa bits, smallest normal exponent)
FORMATS = {"BF16": (np.dtype("<u2"), 7, -126), "F16": (np.dtype("<f2"), 10, -14),
           "F32": (np.dtype("<f4"), 23, -126), "F64": (np.dtype("<f8"), 52, -1022)}
BLOCK_ELEMS = 1 << 16  # elements of one row block: its float64 scratch stays in the cache
# with the C first pass (no scratch), larger blocks: a quarter of the blocks' Python work (2.1 against
# 2.6 s for the 1.1B merge's parity, pages cached)
NATIVE_BLOCK_ELEMS = 1 << 18
CHUNK_BYTES = 8 << 20  # raw comparison of untouched tensors
EXPONENT = np.uint64(0x7FF0000000000000)
ROW_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.EMBEDDING)


@dataclass
class Stats:
    """What ``parity.LayerParity`` reports of one merged tensor, accumulated over its blocks."""

    max_abs: float = 0.0
    max_ulp: float = 0.0
    max_ratio: float = 0.0
    bad: int = 0

    def add(self, other: "Stats") -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_ulp = max(self.max_ulp, other.max_ulp)
        self.max_ratio = max(self.max_ratio, other.max_ratio)
        self.bad += other.bad


# -- the low-rank form, in numpy ----------------------------------------------------------------

def _low_rank_np(module) -> tuple[np.ndarray, np.ndarray] | None:
    """(B2, A2) of a module as float64 numpy arrays (delta_2d = scale · B2 @ A2), exactly: the
    kind's low-rank form (LoRA's factors decoded from their raw bytes, no torch), or None for a
    kind without one."""
    lr = module.low_rank()
    if lr is None:
        return None
    return np.asarray(lr.B2, dtype=np.float64), np.asarray(lr.A2, dtype=np.float64)


@dataclass
class BlockFactors:
    """Rows [i, j) of Σ coef·ΔW = left[i:j] @ right; γ's r (products per element)."""

    left: np.ndarray  # (rows, R) float64, C-contiguous, coefficients folded in
    right: np.ndarray  # (R, cols) float64, C-contiguous
    left_abs: np.ndarray  # |left|, |right| in float32 (see ``gamma``)
    right_abs: np.ndarray
    r: int

    @property
    def gamma(self) -> float:
        """γ = (r + 4)·2⁻²⁴, made larger by (1 + (R + 8)·2⁻²²): |W| + |L| @ |R| is computed in
        float32 (twice as fast as float64), whose roundings (of |L|, of the R products' sum, of the
        sum with |W|) lower it by less than that factor; the bound stays at least the float64
        bound, and exceeds it by a few millionths of itself."""
        return (self.r + 4) * U32 * (1 + (self.left.shape[1] + 8) * 2.0**-22)


def factors(t: TensorPlan) -> BlockFactors | None:
    """``t``'s terms as one stacked row-block product, or None where the check needs torch (DoRA,
    Conv2d, a kind without a low-rank form, dtypes numpy does not hold)."""
    if t.action is not Action.MERGE or t.dora or not t.terms or t.src.dtype not in FORMATS:
        return None
    rows = t.shape[0] if t.shape else 1
    cols = t.numel // max(1, rows)
    lefts, rights, r = [], [], 0
    for term in t.terms:
        m = term.module
        lo, hi = term.rows or (0, rows)  # a term that adds into some rows only: zero rows elsewhere
        if term.part == "bias":
            if len(t.shape) != 1:
                return None
            bias = float_values(m.lora_B_bias).reshape(-1, 1).astype(np.float64)
            if bias.shape[0] != hi - lo:
                return None
            lefts.append(_rows_into(bias * term.coef, lo, rows))
            rights.append(np.ones((1, 1)))
            r += 1
            continue
        if len(t.shape) != 2 or m.kind not in ROW_KINDS:
            return None
        lr = _low_rank_np(m)
        if lr is None:
            return None
        left, right = block_factors(m.kind, lr[0], lr[1], 0, hi - lo)
        if left.shape != (hi - lo, right.shape[0]) or right.shape[1] != cols:
            return None
        lefts.append(_rows_into(left * term.coef, lo, rows))
        rights.append(right)
        r += m.rank
    left = np.ascontiguousarray(np.concatenate(lefts, axis=1))
    right = np.ascontiguousarray(np.concatenate(rights, axis=0))
    return BlockFactors(left, right, np.abs(left).astype(np.float32), np.abs(right).astype(np.float32), r)


def _rows_into(left: np.ndarray, lo: int, rows: int) -> np.ndarray:
    """``left`` as rows [lo, lo + len) of a ``rows``-row factor, zero elsewhere."""
    if left.shape[0] == rows:
        return left
    out = np.zeros((rows,) + left.shape[1:])
    out[lo:lo + left.shape[0]] = left
    return out


# -- one row block ------------------------------------------------------------------------------

_SCRATCH = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, ...]:
    """Per-thread buffers, reused across blocks and tensors: three float64, three float32."""
    s = _SCRATCH.__dict__
    if s.get("n", 0) < n:
        s["bufs"], s["n"] = (np.empty(n), np.empty(n), np.empty(n), np.empty(n, np.float32),
                             np.empty(n, np.float32), np.empty(n, np.float32)), n
    return tuple(b[:n] for b in s["bufs"])


def decode(buf, dtype: str, count: int, out32: np.ndarray) -> np.ndarray:
    """The first ``count`` elements of ``buf`` (raw ``dtype``) as float32 (float64 for F64),
    exactly; ``out32`` (float32, ``count``) may be used."""
    raw = np.frombuffer(buf, FORMATS[dtype][0], count)
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        bits = out32.view(np.uint32)
        np.copyto(bits, raw)
        np.left_shift(bits, 16, out=bits)
        return out32
    if dtype == "F16":
        np.copyto(out32, raw)
        return out32
    return raw


def exponent_floor(x: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """2^⌊log2|x|⌋ of each float64 value of ``x`` (its exponent bits), at least ``dtype``'s
    smallest normal: ``parity.ulp`` is this times 2^-mantissa."""
    _, _, emin = FORMATS[dtype]
    bits = out.view(np.uint64)
    np.bitwise_and(x.view(np.uint64), EXPONENT, out=bits)
    return np.maximum(out, 2.0**emin, out=out)


def check_block(f: BlockFactors, src_dtype: str, dtype: str, wbuf, mbuf, i: int, j: int) -> Stats:
    """``Stats`` of rows [i, j): ``wbuf`` the base's raw rows, ``mbuf`` the merged checkpoint's.

    Tolerances are kept in units of 2^-mantissa (``tol' = tol · 2^mant``: ulp(X) is then X's
    exponent alone); scaling by a power of two commutes with every rounding, so the ratios are
    those of ``parity._check_merge``.

    First the cheap half: X, ulp(X) and |M − X|. When every element is within one ulp of X (a
    correct merge: half an ulp), it is within the tolerance ulp(X) + the accumulation bound, and
    the block passes without the bound (a second GEMM and four passes); its ``max_ratio`` is then
    max |M − X| / ulp(X), which exceeds the ratio to the tolerance by the bound's share of it (a
    few ten-thousandths for a bf16 or fp16 output). Otherwise the bound is computed and every
    element decided by it, as before."""
    cols = f.right.shape[1]
    n = (j - i) * cols
    if n == 0:
        return Stats()
    mant = FORMATS[dtype][1]
    if dtype in ("BF16", "F16"):  # the first pass in C (kernels/cpu.c), where it is built
        w = np.frombuffer(wbuf, FORMATS[src_dtype][0], n)
        got = native.parity_block(w, src_dtype, np.frombuffer(mbuf, FORMATS[dtype][0], n), dtype, f.left[i:j],
                                  f.right, FORMATS[dtype][2], mant)
        if got is not None and got[1] <= 1.0:
            return Stats(got[0], got[1], got[1], 0)
    shape = (j - i, cols)
    x, g, u, w32, m32, g32 = (b.reshape(shape) for b in _scratch(n))
    with np.errstate(all="ignore"):
        w = decode(wbuf, src_dtype, n, w32.reshape(-1)).reshape(shape)
        np.matmul(f.left[i:j], f.right, out=x)
        np.add(x, w, out=x)  # X
        exponent_floor(x, dtype, u)  # ulp(X), scaled
        np.subtract(decode(mbuf, dtype, n, m32.reshape(-1)).reshape(shape), x, out=g)
        np.abs(g, out=g)  # err = |M − X|
        max_abs = float(g.max())
        np.divide(g, u, out=x)  # X itself is not needed any more
        max_ulp = float(x.max()) * 2.0**mant  # ulps of X; NaN fails the comparison below
        if max_ulp <= 1.0 and dtype in ("BF16", "F16"):  # err ≤ ulp(X) ≤ tol everywhere (and ulp(X)
            # is most of tol: float32's accumulation bound is most of it for a float32 output)
            return Stats(max_abs, max_ulp, max_ulp, 0)
        # the whole check: the accumulation bound, each element decided by it
        np.matmul(f.left_abs[i:j], f.right_abs, out=g32)
        np.add(g32, np.abs(w, out=w32) if w.dtype == np.float32 else np.abs(w), out=g32, casting="unsafe")
        if np.isinf(g32).any():  # past float32's range (a delta past 3.4e38): the bound in float64,
            # or an infinite tolerance would pass any error
            np.matmul(np.abs(f.left[i:j]), np.abs(f.right), out=x)
            np.add(x, np.abs(w), out=x)
            g32 = x
        np.multiply(g32, f.gamma * 2.0**mant, out=x)  # the float32 accumulation bound, scaled
        np.add(x, u, out=x)  # tol, scaled
        np.divide(g, x, out=u)
        max_ratio = float(u.max()) * 2.0**mant
        # ratio < 1 means err < tol (the division rounds monotonically); NaN fails both
        bad = 0 if max_ratio < 1 else int(np.count_nonzero(~(g <= np.multiply(x, 2.0**-mant, out=x))))
    return Stats(*(v if v == v else float("inf") for v in (max_abs, max_ulp, max_ratio)), bad)


# -- the stream ---------------------------------------------------------------------------------

def block_spans(t: TensorPlan) -> list[tuple[int, int]]:
    """Row spans of about BLOCK_ELEMS elements, NATIVE_BLOCK_ELEMS where the C first pass runs on
    them (whole quantization blocks under a transform)."""
    rows = t.shape[0] if t.shape else 1
    cols = t.numel // max(1, rows)
    fast = native.available() and t.src.dtype in ("BF16", "F16")  # the C first pass takes its blocks
    step = max(1, (NATIVE_BLOCK_ELEMS if fast else BLOCK_ELEMS) // max(1, cols))
    if t.transform is not None:
        q = t.transform.rows_quantum(cols)
        step = max(q, step // q * q)
    return row_spans(rows, step)


@dataclass
class StreamJob:
    t: TensorPlan  # the plan's tensor: its source is the base's
    merged: TensorRef
    factors: BlockFactors
    # the base rows as the merge computed with them (merge --base-precision's dequant(quant(W))):
    # ``basequant.Requantize``, prepared for this tensor by its first block (with double
    # quantization that reads the tensor's absmax first) and dropped after its last
    transform: object | None = None
    _apply: Callable | None = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def base_rows(self, wbuf, wn: int, i: int, j: int):
        if self.transform is None:
            return wbuf
        with self._lock:
            if self._apply is None:
                self._apply = self.transform.prepare(self.t)
            apply = self._apply
        return apply(wbuf, wn, i, j)[0]

    def done(self) -> None:
        self._apply = None


def _check_job_block(job: StreamJob, wbuf, wn: int, mbuf, i: int, j: int) -> Stats:
    return check_block(job.factors, job.t.src.dtype, job.merged.dtype, job.base_rows(wbuf, wn, i, j), mbuf, i, j)


def check_merged(jobs: list[StreamJob], progress: Callable[[int], None] | None = None,
                 workers: int | None = None) -> list[Stats]:
    """``Stats`` of every job's tensor: base and merged rows mapped by two reader threads, blocks
    computed in ``workers`` threads (``default_workers()``), in order, a bounded number at once."""
    spans = [block_spans(job.t) for job in jobs]
    base = _Reader([(job.t, s) for job, s in zip(jobs, spans)], mapped=True)
    merged = _Reader([(dataclasses.replace(job.t, src=job.merged), s) for job, s in zip(jobs, spans)], mapped=True)
    stats = [Stats() for _ in jobs]
    workers = workers or default_workers()
    pending: deque[tuple[int, Future, object, object, int]] = deque()

    left = [len(s) for s in spans]  # blocks of each job not collected yet

    def collect() -> None:
        k, fut, wbuf, mbuf, nbytes = pending.popleft()
        stats[k].add(fut.result())
        base.release(wbuf)
        merged.release(mbuf)
        left[k] -= 1
        if not left[k]:
            jobs[k].done()
        if progress:
            progress(nbytes)

    base.start()
    merged.start()
    try:
        # the threads are named as the merge's math threads: a transform computes each block
        # whole in the thread that asks (``basequant._ways``), as for the numpy engine
        with single_threaded_blas(), ThreadPoolExecutor(workers, thread_name_prefix=MATH_THREADS + "-parity") as pool:
            for k, (job, job_spans) in enumerate(zip(jobs, spans)):
                for i, j in job_spans:
                    _, _, _, wbuf, wn = base.get()
                    _, _, _, mbuf, mn = merged.get()
                    pending.append((k, pool.submit(_check_job_block, job, wbuf, wn, mbuf, i, j),
                                    wbuf, mbuf, wn + mn))
                    while len(pending) > workers + QUEUE_DEPTH:
                        collect()
            while pending:
                collect()
    finally:
        base.abort()
        merged.abort()
    return stats


def same_bytes(pairs: list[tuple[TensorRef, TensorRef]], progress: Callable[[int], None] | None = None) -> list[bool]:
    """Whether each pair of tensors holds the same bytes, read with ``pread`` in CHUNK_BYTES chunks
    into two reused buffers."""
    fds: dict[Path, int] = {}
    bufs = bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES)
    out = []

    def read(ref: TensorRef, off: int, n: int, buf: bytearray) -> np.ndarray:
        path = ref.file.path
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = boundary.open_regular(path)  # inputs are opened read-only
        view, got = memoryview(buf)[:n], 0
        while got < n:
            k = os.preadv(fd, [view[got:]], ref.info.start + off + got)
            if k == 0:
                raise InputError(f"{path}: truncated while reading tensor {ref.info.name!r}")
            got += k
        return np.frombuffer(buf, np.uint8, n)

    try:
        for a, b in pairs:
            same = a.nbytes == b.nbytes
            for off in range(0, a.nbytes, CHUNK_BYTES) if same else ():
                n = min(CHUNK_BYTES, a.nbytes - off)
                x, y = read(a, off, n, bufs[0]), read(b, off, n, bufs[1])
                k = n - n % 8
                if not (np.array_equal(x[:k].view(np.uint64), y[:k].view(np.uint64))
                        and np.array_equal(x[k:], y[k:])):
                    same = False
                    break
            out.append(same)
            if progress:
                progress(2 * a.nbytes)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out
