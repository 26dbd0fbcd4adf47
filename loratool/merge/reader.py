"""Reading the base: the row blocks of the tensors to compute, ahead of the math, in a thread.

Base tensors are read with ``pread`` in blocks of about 1 MB into reused buffers (for engines that
want writable buffers: torch's), or mapped read-only and populated in the reader thread (for
engines that take read-only ones: numpy's; the engine's ``mapped``), released tensor by tensor;
either way the peak stays flat however large the model.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Any, Iterator

from loratool import boundary
from loratool.errors import InputError, OutputError
from loratool.merge.plan import TensorPlan
from loratool.merge.workers import QUEUE_DEPTH, _Stop

POOL_MAX_BYTES = 16 << 20  # read buffers up to this size are reused


class _Reader:
    """Reads the row blocks of the tensors to compute, ahead of the math, in a thread: with
    ``pread`` into reused buffers, or (``mapped``, for numpy, which takes read-only buffers) as
    views of a read-only mapping of each tensor, populated here (``MAP_POPULATE``), so that the
    math threads find the pages mapped and no bytes are copied. A mapping is released when the
    last view of it is dropped: a few tensors at a time count toward the resident set."""

    _END = object()

    def __init__(self, jobs: list[tuple[TensorPlan, list[tuple[int, int]]]], mapped: bool = False):
        self.jobs = jobs
        self.mapped = mapped and hasattr(mmap, "MAP_POPULATE")
        self.out: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        # buffers handed back by ``release``: reused, so that blocks do not fault in fresh pages
        self.free: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH + 2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="loratool-reader", daemon=True)

    def start(self) -> "_Reader":
        self.thread.start()
        return self

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        try:
            item: Any = self._END
            try:
                for block in self._blocks(fds):
                    self._put(block)
            except _Stop:
                return
            except BaseException as e:  # handed to the main thread
                item = e
            self._put(item)
        except _Stop:
            pass
        finally:
            for fd in fds.values():
                os.close(fd)

    def _blocks(self, fds: dict[Path, int]) -> Iterator[tuple]:
        """(tensor, i, j, buf, n): rows [i, j) of the tensor as the first n bytes of buf."""
        for t, spans in self.jobs:
            path = t.src.file.path
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = boundary.open_regular(path)  # inputs are opened read-only
            rows = t.shape[0] if t.shape else 1
            row_bytes = t.src.nbytes // max(1, rows)
            if self.mapped and t.src.nbytes:
                yield from self._mapped(t, spans, fd, row_bytes)
                continue
            for i, j in spans:
                n = (j - i) * row_bytes
                buf = self._buffer(n)
                view, off, got = memoryview(buf)[:n], t.src.info.start + i * row_bytes, 0
                while got < n:
                    k = os.preadv(fd, [view[got:]], off + got)
                    if k == 0:
                        raise InputError(f"{path}: truncated while reading tensor {t.key!r}")
                    got += k
                yield t, i, j, buf, n

    @staticmethod
    def _mapped(t: TensorPlan, spans: list[tuple[int, int]], fd: int, row_bytes: int) -> Iterator[tuple]:
        start, end = t.src.info.start, t.src.info.start + t.src.nbytes
        if os.fstat(fd).st_size < end:  # mapped pages past the end would raise SIGBUS
            raise InputError(f"{t.src.file.path}: truncated: tensor {t.key!r} ends at byte {end}")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, end - base, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE, prot=mmap.PROT_READ,
                       offset=base)
        view = memoryview(mm)
        del mm  # the views keep the mapping alive; the last one dropped unmaps it
        for i, j in spans:
            off = start - base + i * row_bytes
            yield t, i, j, view[off:off + (j - i) * row_bytes], (j - i) * row_bytes

    def _buffer(self, n: int) -> bytearray:
        try:
            buf = self.free.get_nowait()
            if len(buf) >= n:
                return buf
        except queue.Empty:
            pass
        return bytearray(max(n, 1))

    def release(self, buf) -> None:
        """The main thread is done with a block's buffer (no tensor may view it any more)."""
        if isinstance(buf, bytearray) and len(buf) <= POOL_MAX_BYTES:
            try:
                self.free.put_nowait(buf)
            except queue.Full:
                pass

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop()

    def get(self):
        while True:
            try:
                item = self.out.get(timeout=0.1)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.out.empty():
                    raise OutputError("internal error: the reader thread stopped") from None
        if item is self._END:
            raise OutputError("internal error: the reader ran out of blocks")
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self) -> None:
        self.stop.set()
        while True:
            try:
                self.out.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)
