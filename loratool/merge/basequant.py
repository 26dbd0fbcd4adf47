"""The base as the adapter saw it: a transform of each row block of a base tensor before the
deltas are added (issue 16).

* ``Requantize`` (``merge --base-precision nf4|fp4[,blocksize=N][,double-quant]`` over a 16-bit
  base): the rows become bitsandbytes' dequant(quant(W)) (``loratool.quant.bnb``), bit for bit,
  so that the merge writes round(dequant(quant(W)) + ΔW), the weight a QLoRA adapter was trained
  against plus the adapter. Row blocks hold whole quantization blocks (``rows_quantum``) and are
  computed by ``bnb.roundtrip_norms`` (the fused, table-driven round trip) in the engine's worker
  threads; with double quantization the nested absmax needs the whole tensor's absmax vector,
  computed first (``prepare``: ``streamed_absmax``, one pass over the tensor a few MB at a time, a
  float32 per block kept). It also measures, per tensor, ‖W‖ and ‖W − dequant(quant(W))‖ (the
  report: ``QuantTerm``; float32 sums of 64K elements added in float64).
* ``Dequantize`` (a base whose weights are stored in 4 bits, ``loratool.quant.stored``): the
  packed rows become the 16-bit rows bitsandbytes' ``dequantize_4bit`` gives.

The executor applies ``prepare(t)`` to each block's bytes before the engine sees them; numpy's
and torch's engines are unchanged. On CUDA, ``Requantize`` of a weight whose rows are whole
quantization blocks is left to the engine (``engines.gpu_requant``): the Triton merge kernel
computes the round trip of each tile in its QUANT prologue (``loratool.kernels.merge``), and
``engines._GpuRequant`` adds the report's sums with ``add_term``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from loratool import boundary
from loratool._threads import default_workers
from loratool.errors import InputError
from loratool.kernels import cpu as native
from loratool.kinds.layout import LayerKind
from loratool.quant import bnb
from loratool.quant.stored import QuantizedRef
from loratool.safetensors_io import DTYPES, SafetensorsFile, TensorRef, encode_header

RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
UINT = bnb.UINT


@dataclass
class QuantTerm:
    """‖W‖² and ‖W − dequant(quant(W))‖² of one tensor, summed over its blocks (float64)."""

    w_sq: float = 0.0
    q_sq: float = 0.0


class BaseTransform:
    """What the executor asks of a transform: row blocks whole in quantization blocks, and the
    function that maps a block's base bytes to the bytes the engine computes with."""

    name = "transform"
    blocksize = 1

    def rows_quantum(self, cols: int) -> int:
        """Row blocks are multiples of this many rows (cols · rows a multiple of the blocksize)."""
        return self.blocksize // math.gcd(max(1, cols), self.blocksize)

    def prepare(self, t) -> Callable:
        raise NotImplementedError


class Requantize(BaseTransform):
    """dequant(quant(W)) of a 16-bit base tensor, as bitsandbytes computes it."""

    def __init__(self, spec: bnb.QuantSpec):
        self.spec = spec
        self.blocksize = spec.blocksize
        self.name = str(spec)
        self.terms: dict[str, QuantTerm] = {}
        self._lock = threading.Lock()
        self._ahead = _Ahead()
        self._conv1d: RequantizeConv1D | None = None

    def for_conv1d(self) -> "RequantizeConv1D":
        """The transform of this plan's Conv1D weights (transposed blocks), sharing its report."""
        if self._conv1d is None:
            self._conv1d = RequantizeConv1D(self)
        return self._conv1d

    def add_term(self, name: str, w_sq: float, q_sq: float) -> None:
        """Adds a row block's ‖W‖² and ‖W − dequant(quant(W))‖² into tensor ``name``'s term (the GPU
        path's, ``engines._GpuRequant``; ``prepare``'s blocks add theirs the same way)."""
        with self._lock:
            term = self.terms.setdefault(name, QuantTerm())
            term.w_sq += w_sq
            term.q_sq += q_sq

    def prepare(self, t) -> Callable:
        dtype, shape = t.src.dtype, tuple(t.shape)
        rows = shape[0] if shape else 1
        cols = t.numel // max(1, rows)
        bs = self.blocksize
        scale = absmax = None
        if self.spec.double_quant:  # the nested absmax: the whole tensor's absmax vector first
            absmax = streamed_absmax(t.src, bs)
            scale = bnb.quantize_absmax(absmax).dequantize()
        self.add_term(t.name, 0.0, 0.0)  # listed in the report even with no rows
        item = RAW[dtype].itemsize

        def part(raw: np.ndarray, out: np.ndarray, b0: int, e0: int, e1: int) -> tuple[float, float]:
            """Elements [e0, e1) of a row block whose first quantization block is b0."""
            c0, c1 = b0 + e0 // bs, b0 + -(-e1 // bs)
            _, w_sq, q_sq = bnb.roundtrip_norms(raw[e0:e1], dtype, self.spec, shape=shape, out=out[e0:e1],
                                                scale=None if scale is None else scale[c0:c1],
                                                absmax=None if absmax is None else absmax[c0:c1])
            return w_sq, q_sq

        def compute(raw: np.ndarray, out: np.ndarray, b0: int, ways: int) -> tuple[float, float]:
            """The whole block now: its first piece on this thread, the others in the pool."""
            cuts = split_points(raw.size, bs, ways)
            jobs = [_pool().submit(part, raw, out, b0, e0, e1) for e0, e1 in zip(cuts[1:-1], cuts[2:])]
            sums = [part(raw, out, b0, cuts[0], cuts[1])] + [f.result() for f in jobs]
            return sum(s[0] for s in sums), sum(s[1] for s in sums)

        mapped: list[np.ndarray] = []  # the tensor's elements, mapped from the base file once

        def ahead_part(slot: _Slot, first: int, e0: int, e1: int) -> tuple[float, float]:
            """Elements [e0, e1) of the row block from element ``first``, from the base file's
            pages themselves (mapped, as the merge's reader maps them: no copy)."""
            if not mapped:
                with self._lock:
                    if not mapped:
                        mapped.append(_map_elements(t.src))
            return part(mapped[0][first: first + slot.out.size], slot.out, first // bs, e0, e1)

        def start_ahead(i: int, j: int, ways: int) -> None:
            """Rows [i, j), the block the engine will most likely ask for next, in the background."""
            if i >= j:
                return
            n = (j - i) * cols
            slot = self._ahead.free_slot(n * item)
            view = _Slot(slot.raw.view(RAW[dtype])[:n], slot.out.view(RAW[dtype])[:n])
            cuts = split_points(n, bs, ways + 1) if ways != 2 else _lead_split(n, bs)
            job = _Job(lambda e0, e1: ahead_part(view, i * cols, e0, e1), list(zip(cuts[:-1], cuts[1:])))
            runners = [_ahead_pool().submit(job.run) for _ in range(max(1, ways - 1))]
            self._ahead.pending = _Pending(apply, i, j, slot, view.out, job, runners)

        def apply(buf, n: int, i: int, j: int):
            raw = np.frombuffer(buf, RAW[dtype], count=n // item)
            ways = _ways()
            if ways == 1 or not isinstance(t.src, TensorRef):  # blocks computed in parallel already
                out = _out(raw.size * item).view(RAW[dtype])
                w_sq, q_sq = compute(raw, out, i * cols // bs, ways)
            else:  # one block at a time on this thread: the next one is computed meanwhile
                got = self._ahead.take(apply, i, j)
                if got is None:
                    slot = self._ahead.handed = self._ahead.free_slot(raw.size * item)
                    out = slot.out.view(RAW[dtype])[: raw.size]
                    w_sq, q_sq = compute(raw, out, i * cols // bs, ways)
                else:
                    out, w_sq, q_sq = got
                if j < rows:
                    start_ahead(j, min(rows, j + (j - i)), ways)
                else:  # the tensor's last block: its mapping goes now (its pages would count in the
                    mapped.clear()  # RSS until the closures' reference cycle is collected)
            self.add_term(t.name, w_sq, q_sq)
            return out, out.nbytes

        return apply


# -- ahead of the engine: the next row block's round trip while the engine computes this one -------
#
# The torch engine computes a tensor's row blocks one by one on the executor's thread, so the round
# trip of a block and the engine's arithmetic on it would run one after the other. Instead, when
# the executor hands block k over, the round trip of block k + 1 (rows [j, 2j - i), read from the
# base file itself) starts in the background, and block k's, started the same way, is usually done.
# The block is cut into pieces that ``ways - 1`` threads take one by one (the engine keeps a core),
# and that the executor's thread takes too when it needs the block before they are done. Two slots
# of buffers alternate: the one handed to the engine (read before the executor hands over the next
# block) and the one being computed. A guess that misses (another span, another tensor) is dropped
# (its pieces not started are not computed, those started are waited for); its block is then
# computed at once, as without this.


@dataclass
class _Slot:
    raw: np.ndarray  # the base bytes of the block (uint8 or the dtype's raw elements)
    out: np.ndarray  # its round trip


@dataclass
class _Pending:
    owner: object  # the ``apply`` of the tensor it belongs to
    i: int
    j: int
    slot: _Slot
    out: np.ndarray
    job: "_Job"
    runners: list


class _Job:
    """The pieces of a block computed ahead: ``fn(e0, e1)`` of each, in whichever thread takes it
    first; the (w_sq, q_sq) of those computed."""

    def __init__(self, fn: Callable, pieces: list[tuple[int, int]]):
        self.fn, self.pieces, self.lock = fn, pieces, threading.Lock()
        self.sums: list[tuple[float, float]] = []
        self.failed = False

    def _next(self) -> tuple[int, int] | None:
        with self.lock:
            return self.pieces.pop(0) if self.pieces else None

    def run(self) -> None:
        while (piece := self._next()) is not None:
            try:
                s = self.fn(*piece)
            except Exception:  # the reader reports a truncated or unreadable file in its own words
                self.failed = True
                continue
            with self.lock:
                self.sums.append(s)

    def drop(self) -> None:
        with self.lock:
            self.pieces.clear()


class _Ahead:
    """The two slots and the block being computed ahead (one at a time: executor thread only)."""

    def __init__(self):
        self.slots = [_Slot(np.empty(0, np.uint8), np.empty(0, np.uint8)) for _ in range(2)]
        self.pending: _Pending | None = None
        self.handed: _Slot | None = None  # the slot the engine was last given

    def free_slot(self, nbytes: int) -> _Slot:
        """The slot that is not the engine's (``handed``; none is being computed when this is
        asked), ``nbytes`` long at least."""
        slot = self.slots[1] if self.slots[0] is self.handed else self.slots[0]
        if slot.raw.size < nbytes:
            slot.raw, slot.out = np.empty(max(nbytes, 1 << 20), np.uint8), np.empty(max(nbytes, 1 << 20), np.uint8)
        return slot

    def take(self, owner, i: int, j: int):
        """(out, w_sq, q_sq) of rows [i, j) of ``owner``'s tensor when they were computed ahead; else
        None (after waiting for whatever was being computed: its slot is then free)."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        hit = p.owner is owner and (p.i, p.j) == (i, j)
        if hit:
            p.job.run()  # the pieces no runner has started yet: on this thread, now
        else:
            p.job.drop()
        for f in p.runners:
            f.result()
        if not hit or p.job.failed:
            return None
        self.handed = p.slot
        return p.out, sum(s[0] for s in p.job.sums), sum(s[1] for s in p.job.sums)


def _map_elements(src: TensorRef) -> np.ndarray:
    """The raw elements of the tensor ``src`` as a read-only array over a private mapping of its
    file (opened through ``loratool.boundary``), as the merge's reader maps the base; a file
    shorter than its header says is refused in one line (pages past its end would fault)."""
    import mmap

    path, start, end = src.file.path, src.info.start, src.info.start + src.nbytes
    fd = boundary.open_regular(path)
    try:
        if os.fstat(fd).st_size < end:
            raise InputError(f"{path}: truncated: tensor {src.info.name!r} ends at byte {end}")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, end - base, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ, offset=base)
    finally:
        os.close(fd)
    return np.frombuffer(mm, RAW[src.dtype], count=src.nbytes // RAW[src.dtype].itemsize, offset=start - base)


_OUT = threading.local()


def _out(nbytes: int) -> np.ndarray:
    """This thread's output buffer of ``nbytes`` bytes (uint8), reused from block to block (no
    fresh pages to fault in for every block): ``transformed`` hands a block's output to the
    engine, which reads it, on the same thread, before the thread transforms its next block."""
    buf = getattr(_OUT, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _OUT.buf = np.empty(max(nbytes, 1 << 20), np.uint8)
    return buf[:nbytes]


# -- threads: a block split across the cores where the engine runs one block at a time ------------

SPLIT_MIN = 1 << 16  # elements: smaller pieces are not worth a thread's hand-off
MATH_THREADS = "loratool-math"  # the executor's pool (numpy's engine): blocks already run in parallel
_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _ways() -> int:
    """Pieces to cut a block into: one in the executor's worker threads (the engine computes
    blocks in parallel already), else one per worker (``default_workers``): the torch engine
    computes blocks one by one on the executor's thread, and the round trip, which is numpy and
    releases the GIL, takes the other cores meanwhile."""
    if threading.current_thread().name.startswith(MATH_THREADS):
        return 1
    return default_workers()


def _pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max(1, default_workers() - 1), thread_name_prefix="loratool-quant"))
        return _POOL[0]


def _ahead_pool() -> ThreadPoolExecutor:
    """The threads that compute a block ahead of the engine (one piece each)."""
    with _POOL_LOCK:
        if not _AHEAD:
            _AHEAD.append(ThreadPoolExecutor(default_workers(), thread_name_prefix="loratool-quant-ahead"))
        return _AHEAD[0]


_AHEAD: list[ThreadPoolExecutor] = []


LEAD = 0.55  # with two cores: the share of a block computed ahead that the runner starts with


def _lead_split(n: int, blocksize: int, lead: float = LEAD) -> list[int]:
    """[0, c, n] with c about ``lead`` of the ``n`` elements (whole blocks): the runner starts the
    first piece at once; the executor's thread takes the second when it comes for the block after
    the engine's work on the one before (or the runner does, if it is done first). The two then end
    together when lead ≈ (1 + engine/round trip) / 2, about 0.55 on the 1.1B workload: fewer, larger
    pieces than an even three-way split, and less waiting at the end of each block."""
    if n < 2 * SPLIT_MIN:
        return [0, n]
    c = min(n, max(blocksize, int(n * lead) // blocksize * blocksize))
    return [0, c, n] if c < n else [0, n]


def split_points(n: int, blocksize: int, ways: int) -> list[int]:
    """Cuts [0, ..., n] of ``n`` elements into at most ``ways`` pieces of whole blocks, none under
    SPLIT_MIN elements (one piece when ``n`` is small)."""
    ways = max(1, min(ways, n // SPLIT_MIN))
    blocks = -(-n // blocksize)
    cuts = [min(n, blocks * k // ways * blocksize) for k in range(ways)] + [n]
    return cuts


CHUNK_BYTES = 4 << 20  # bytes of the base read at a time by ``streamed_absmax``


def streamed_absmax(src, blocksize: int, ways: int | None = None) -> np.ndarray:
    """The absmax of each 4-bit block of the base tensor ``src`` (``bnb.absmax_4bit``): where the C
    loop runs, over the tensor's mapped pages in one call (the mapping dropped after it); else read a
    chunk of whole blocks at a time into one reused buffer: a float32 per block is all it keeps,
    so the pass before a double-quantized tensor's blocks leaves the peak where it was. The tensor
    is cut into ``ways`` runs of whole chunks (``default_workers()`` by default; CHUNK_BYTES over
    them all), read and reduced in as many threads."""
    dtype = src.dtype
    item = RAW[dtype].itemsize
    if not isinstance(src, TensorRef):  # already in memory
        return bnb.absmax_bits(np.frombuffer(src.raw(), RAW[dtype]), dtype, blocksize)
    if native.available():  # the C loop reads the mapped pages themselves: no copy, one pass
        got = native.absmax(_map_elements(src), dtype, blocksize)  # the mapping goes with the array
        if got is not None:
            return got
    numel = src.nbytes // item
    ways = max(1, ways or default_workers())
    step = max(1, CHUNK_BYTES // ways // (blocksize * item)) * blocksize  # elements a chunk (all runs: CHUNK_BYTES)
    out = np.empty(-(-numel // blocksize), np.float32)
    chunks = -(-numel // step)
    ways = min(chunks, ways)
    runs = [(chunks * k // ways * step, min(numel, chunks * (k + 1) // ways * step)) for k in range(ways)]
    jobs = [_ahead_pool().submit(_absmax_run, src, blocksize, step, out, r0, r1) for r0, r1 in runs[1:]]
    _absmax_run(src, blocksize, step, out, *runs[0])
    for f in jobs:
        f.result()
    return out


def _absmax_run(src: TensorRef, blocksize: int, step: int, out: np.ndarray, r0: int, r1: int) -> None:
    """``streamed_absmax`` of elements [r0, r1) (r0 a multiple of ``step``, of the blocksize) into ``out``."""
    dtype = src.dtype
    item = RAW[dtype].itemsize
    buf = bytearray(min(r1 - r0, step) * item)
    scratch = np.empty(min(r1 - r0, step), UINT[dtype])
    path, name = src.file.path, src.info.name
    try:
        fd = boundary.open_regular(path)
        try:
            for e0 in range(r0, r1, step):
                e1 = min(r1, e0 + step)
                view, off, got = memoryview(buf)[: (e1 - e0) * item], src.info.start + e0 * item, 0
                while got < len(view):
                    k = os.preadv(fd, [view[got:]], off + got)
                    if k == 0:
                        raise InputError(f"{path}: truncated while reading tensor {name!r}")
                    got += k
                raw = np.frombuffer(buf, RAW[dtype], count=e1 - e0)
                out[e0 // blocksize: -(-e1 // blocksize)] = bnb.absmax_bits(raw, dtype, blocksize, scratch)
        finally:
            os.close(fd)
    except OSError as e:
        raise InputError(f"{path}: cannot read tensor {name!r}: {e.strerror or e}") from None


class RequantizeConv1D(BaseTransform):
    """``Requantize`` of a Conv1D weight (GPT-2's (in, out) layout). transformers quantizes such a
    layer as the Linear it stands for, its weight transposed first (``integrations/bitsandbytes``:
    "transposing the weight matrix prior to quantization"), so the blocks run along the input
    dimension, down W's columns: the transform is dequant(quant(Wᵀ))ᵀ. A row block of W whose rows
    are whole blocks of ``blocksize`` (the input dimension a multiple of it: ``plan_merge``
    refuses others) holds whole blocks of Wᵀ: it is transposed, round-tripped and transposed back.
    Double quantization's absmax comes from a pass over the tensor's mapped rows in Wᵀ's order.
    The report's terms go into the ``Requantize`` it stands beside."""

    def __init__(self, parent: Requantize):
        self.parent, self.spec = parent, parent.spec
        self.blocksize, self.name = parent.blocksize, parent.name

    def rows_quantum(self, cols: int) -> int:
        return self.blocksize

    def prepare(self, t) -> Callable:
        dtype = t.src.dtype
        rows, cols = t.shape
        bs, item = self.blocksize, RAW[dtype].itemsize
        scale2d = None
        if self.spec.double_quant:  # the nested absmax of all Wᵀ's blocks, in Wᵀ's order
            absmax = transposed_absmax(t.src, bs, rows, cols)
            scale2d = bnb.quantize_absmax(absmax.reshape(-1)).dequantize().reshape(cols, rows // bs)
        self.parent.add_term(t.name, 0.0, 0.0)

        def apply(buf, n: int, i: int, j: int):
            raw = np.frombuffer(buf, RAW[dtype], count=(j - i) * cols).reshape(j - i, cols)
            scale = None if scale2d is None else np.ascontiguousarray(scale2d[:, i // bs: j // bs]).reshape(-1)
            back, w_sq, q_sq = bnb.roundtrip_norms(np.ascontiguousarray(raw.T).reshape(-1), dtype, self.spec,
                                                   scale=scale, shape=(cols, rows))
            out = _out(raw.size * item).view(RAW[dtype])
            out.reshape(j - i, cols)[...] = back.view(RAW[dtype]).reshape(cols, j - i).T
            self.parent.add_term(t.name, w_sq, q_sq)
            return out, out.nbytes

        return apply


def transposed_absmax(src, blocksize: int, rows: int, cols: int) -> np.ndarray:
    """float32 (cols, rows // blocksize): the absmax of each block of Wᵀ, W the (rows, cols) base
    tensor ``src``, read from its mapped pages a few MB of rows at a time."""
    dtype = src.dtype
    item = RAW[dtype].itemsize
    w = (_map_elements(src) if isinstance(src, TensorRef) else np.frombuffer(src.raw(), RAW[dtype])).reshape(rows, cols)
    out = np.empty((cols, rows // blocksize), np.float32)
    step = max(blocksize, CHUNK_BYTES // max(1, cols * item) // blocksize * blocksize)
    mask = UINT[dtype].type(bnb._ABS_MASK[dtype])
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        a = np.bitwise_and(w[r0:r1].view(UINT[dtype]), mask)  # |x| by its bits (see bnb.absmax_bits)
        m = a.reshape((r1 - r0) // blocksize, blocksize, cols).max(axis=1)
        out[:, r0 // blocksize: r1 // blocksize] = bnb.from_dtype_bits(m, dtype).reshape(m.shape).T
    return out


class Dequantize(BaseTransform):
    """The 16-bit rows of a 4-bit weight stored by bitsandbytes (``QuantizedRef``)."""

    name = "stored"

    def __init__(self, ref: QuantizedRef):
        self.ref = ref
        self.blocksize = ref.spec.blocksize

    def rows_quantum(self, cols: int) -> int:
        return max(super().rows_quantum(cols), 2 // math.gcd(max(1, cols), 2))  # whole bytes too

    def prepare(self, t) -> Callable:
        ref = self.ref
        scale = ref.scale()
        rows = t.shape[0] if t.shape else 1
        cols = t.numel // max(1, rows)

        def apply(buf, n: int, i: int, j: int):
            count = (j - i) * cols
            packed = buf if n >= (count + 1) // 2 else None  # odd columns: read the bytes whole
            out = ref.dequantized(packed, first=i * cols, count=count, scale=scale)
            return out, out.nbytes

        return apply


def transformed(rows: Callable, apply: Callable) -> Callable:
    """An engine's block function ``rows(buf, n, i, j)`` on the transformed bytes."""

    def block(buf, n: int, i: int, j: int):
        out, m = apply(buf, n, i, j)
        return rows(out, m, i, j)

    return block


# -- the report -----------------------------------------------------------------------------------

def delta_norm(t) -> float:
    """‖Σ coef·ΔW‖_F of the terms of ``t``: from the low-rank factors (numpy) for LoRA modules,
    ‖B A‖² = Σ (BᵀB) ⊙ (A Aᵀ) over the stacked factors; from the dense delta for other kinds."""
    bs, as_ = [], []
    for term in t.terms:
        m = term.module
        if term.part != "weight" or m.module_kind != "lora":
            return _dense_norm(t)
        rows, cols = t.shape
        if m.kind is LayerKind.CONV1D:  # the base holds ΔWᵀ, whose norm is ΔW's
            rows, cols = cols, rows
        rank = m.lora_A.shape[0]
        b, a = _factor(m.lora_B, (rows, rank)), _factor(m.lora_A, (rank, cols))
        if b is None or a is None:
            return _dense_norm(t)
        bs.append(b.astype(np.float64) * term.coef)
        as_.append(a.astype(np.float64))
    b, a = np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)
    return math.sqrt(max(0.0, float(np.sum((b.T @ b) * (a @ a.T)))))


def _factor(src, shape: tuple[int, ...]) -> np.ndarray | None:
    """A LoRA factor in a file as float32 (exact), or None (not a float tensor in a file)."""
    if not isinstance(src, TensorRef) or src.dtype not in RAW:
        return None
    return bnb.from_dtype_bits(np.frombuffer(src.raw(), RAW[src.dtype]), src.dtype).reshape(shape)


def _dense_norm(t) -> float:
    import torch

    total = None
    for term in t.terms:
        d = term.module.delta(torch.float64) * math.copysign(abs(term.weight), term.coef)
        total = d if total is None else total + d
    return float(torch.linalg.vector_norm(total)) if total is not None else 0.0


def report(plan) -> list[dict]:
    """Per merged tensor the base precision changed: ‖W‖, ‖q‖ = ‖W − dequant(quant(W))‖, ‖ΔW‖,
    ‖q‖/‖ΔW‖ and the relative change of the merged weight ‖q‖/‖W‖ (the choice moves every merged
    value by −q, up to the output's rounding); ``warn`` where q outweighs the adapter's delta."""
    rq = plan.requantize
    if rq is None:
        return []
    rows = []
    for t in plan.tensors():
        term = rq.terms.get(t.name)
        if getattr(t.transform, "parent", t.transform) is not rq or term is None:  # rq, or its Conv1D view
            continue
        w, q, d = math.sqrt(term.w_sq), math.sqrt(term.q_sq), delta_norm(t)
        rows.append({"name": t.name, "numel": t.numel, "base_norm": w, "quant_norm": q, "delta_norm": d,
                     "quant_over_delta": q / d if d else None, "relative_change": q / w if w else 0.0,
                     "warn": q > d})
    return rows


# -- the output in 4 bits (merge --output-precision) ----------------------------------------------

@dataclass
class RequantTerm:
    """‖M − dequant(quant(M))‖² of one merged tensor M (float64), and the spec it was written in."""

    spec: bnb.QuantSpec
    err_sq: float = 0.0


class OutputQuant:
    """``merge --output-precision nf4|fp4[,...]|stored`` onto a base stored in 4 bits: after the
    executor has written the 16-bit output, each merged tensor the base held in 4 bits is quantized
    by ``bnb.quantize_4bit`` (bitsandbytes' bits) and written as transformers serialises a
    ``Linear4bit`` weight (packed uint8, absmax, quant_map, nested tensors, the quant state's JSON);
    the base's untouched 4-bit weights are copied raw from the base (never requantized). The files
    are rewritten in the temporary output, a chunk of whole blocks at a time (with double
    quantization the tensor's absmax vector, a float32 a block, is read first)."""

    def __init__(self, spec: bnb.QuantSpec | None):
        self.spec = spec  # None: each tensor as the base stored it ("stored")
        self.terms: dict[str, RequantTerm] = {}

    def __str__(self) -> str:
        return "stored" if self.spec is None else str(self.spec)

    @staticmethod
    def jobs(t) -> str | None:
        """"requant" (a merged 4-bit weight), "raw" (an untouched one) or None (written as computed)."""
        if not isinstance(t.src, QuantizedRef):
            return None
        if t.action.value == "merge":
            return "requant"
        return "raw" if t.action.value == "cast" else None

    def rewrite(self, root, plan) -> None:
        """Rewrite the safetensors files of ``plan`` under ``root`` (the temporary output) and
        their indexes; ``root`` is the file itself for a single-file output."""
        from pathlib import Path

        root = Path(root)
        written: dict = {}  # path -> (its keys, its data bytes)
        for shard in plan.shards:
            kinds = {t.key: (t, self.jobs(t)) for t in shard.tensors}
            if not any(k for _, k in kinds.values()):
                continue
            path = root if plan.single_file else root / shard.rel
            entries, size = self._entries(path, kinds)
            _write_file(path, entries, shard.metadata)
            written[path] = ([e[0] for e in entries], size)
        for rel in plan.indexes:  # the quant-state tensors join the weight map
            path = root / rel
            data = boundary.read_json(path)
            wm = data.get("weight_map", {})
            sizes = {}
            for p, (keys, size) in written.items():
                if p.parent == path.parent:
                    wm.update(dict.fromkeys(keys, p.name))
                    sizes[p.name] = size
            total = sum(sizes[f] if f in sizes else _data_size(path.parent / f) for f in sorted(set(wm.values())))
            data["weight_map"] = dict(sorted(wm.items()))
            data.setdefault("metadata", {})["total_size"] = total
            _write_file(path, None, None, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def _entries(self, path, kinds) -> tuple[list, int]:
        """(key, dtype, shape, producer of the bytes) of every tensor of the file at ``path``, and
        their total bytes."""
        st = SafetensorsFile(path)
        entries: list = []
        for key in sorted(st.keys(), key=lambda k: st.info(k).start):
            t, kind = kinds[key]
            ref = st.ref(key)
            if kind == "requant":
                entries += self._requantized(t, ref)
            elif kind == "raw":
                src = t.src
                names = [src.packed.info.name] + [f"{src.packed.info.name}.{s}" for s in bnb.AUX_SUFFIXES] + [
                    f"{src.packed.info.name}.{bnb.STATE_PREFIX}{src.state['quant_type']}"]
                f = src.packed.file
                entries += [(n, f.info(n).dtype, tuple(f.info(n).shape), _copier(f.ref(n))) for n in names if n in f]
            else:
                entries.append((key, ref.dtype, tuple(ref.shape), _copier(ref)))
        return entries, sum(_nbytes(dt, shape) for _, dt, shape, _ in entries)

    def _requantized(self, t, ref) -> list:
        """The entries of the merged tensor ``ref`` (16-bit, in the temporary output) in 4 bits."""
        spec = self.spec or t.src.spec
        dtype, shape, bs = ref.dtype, tuple(ref.shape), spec.blocksize
        n = ref.info.numel
        absmax = streamed_absmax(ref, bs)
        nested = bnb.quantize_absmax(absmax) if spec.double_quant else None
        scale = nested.dequantize() if nested is not None else absmax
        term = self.terms[t.name] = RequantTerm(spec)
        item = RAW[dtype].itemsize

        def packed(fd_out) -> None:
            step = max(1, CHUNK_BYTES // (bs * item)) * bs
            fd = boundary.open_regular(ref.file.path)
            try:
                for e0 in range(0, n, step):
                    e1 = min(n, e0 + step)
                    raw = np.frombuffer(_pread(fd, ref.info.start + e0 * item, (e1 - e0) * item, ref), RAW[dtype])
                    x = bnb.from_dtype_bits(raw, dtype)
                    c0, c1 = e0 // bs, -(-e1 // bs)
                    q, _ = bnb.quantize_4bit(x, bs, spec.quant_type, absmax=absmax[c0:c1])
                    back = bnb.from_dtype_bits(bnb.dequantize(q, scale[c0:c1], shape, dtype, bs, spec.quant_type,
                                                              count=e1 - e0), dtype)
                    d = (x - back).astype(np.float64)
                    term.err_sq += float(d @ d)
                    _write_all(fd_out, q.tobytes())
            finally:
                os.close(fd)

        out = [(t.key, "U8", ((n + 1) // 2, 1), packed)]
        out += [(k, dt, shp, _const(b)) for k, dt, shp, b in bnb.state_tensors(t.key, spec, dtype, shape, absmax, nested)]
        return out


def _nbytes(dtype: str, shape) -> int:
    return math.prod(shape) * DTYPES[dtype][0]


def _data_size(path) -> int:
    st = SafetensorsFile(path)
    return sum(st.info(k).nbytes for k in st.keys())


def _const(data: bytes) -> Callable:
    return lambda fd_out: _write_all(fd_out, data)


def _copier(ref: TensorRef) -> Callable:
    """Writes the bytes of ``ref`` (a tensor in a file), CHUNK_BYTES at a time."""

    def copy(fd_out) -> None:
        fd = boundary.open_regular(ref.file.path)
        try:
            for off in range(0, ref.nbytes, CHUNK_BYTES):
                _write_all(fd_out, _pread(fd, ref.info.start + off, min(CHUNK_BYTES, ref.nbytes - off), ref))
        finally:
            os.close(fd)

    return copy


def _pread(fd: int, offset: int, n: int, ref: TensorRef) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise InputError(f"{ref.file.path}: truncated while reading tensor {ref.info.name!r}")
        got += k
    return bytes(buf)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _write_file(path, entries, metadata, content: bytes | None = None) -> None:
    """Replace ``path`` (inside the temporary output of ``boundary.atomic_dir``/``atomic_path``)
    with a safetensors file of ``entries`` (key, dtype, shape, writer of its bytes), or with
    ``content``: written beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.requant")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        try:
            if content is not None:
                _write_all(fd, content)
            else:
                _write_all(fd, encode_header([(k, dt, shp) for k, dt, shp, _ in entries], metadata, where=str(path)))
                for _, _, _, write in entries:
                    write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def requant_report(plan, oq: OutputQuant | None) -> list[dict]:
    """Per requantized tensor: ‖M − dequant(quant(M))‖ (M: the merged 16-bit weight), ‖ΔW‖, their
    ratio, and ``warn`` where the requantization moves the weight more than the adapter did."""
    if oq is None:
        return []
    rows = []
    for t in plan.tensors():
        term = oq.terms.get(t.name)
        if term is None:
            continue
        e, d = math.sqrt(term.err_sq), delta_norm(t)
        rows.append({"name": t.name, "numel": t.numel, "precision": str(term.spec), "requant_norm": e,
                     "delta_norm": d, "requant_over_delta": e / d if d else None, "warn": e > d})
    return rows
