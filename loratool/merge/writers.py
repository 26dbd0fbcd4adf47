"""Writing the output: the files, their headers, raw copies and computed blocks.

The executor hands every byte of the output, file by file and in file order, to one writer
through one interface (``OutputWriter``). Two kinds:

* ``PrefillWriter`` (with torch's engine): ``_Prefill`` creates the output files, writes their
  headers and copies the untouched tensors raw (``copy_file_range``) in a thread while torch is
  imported; ``_Writer`` then writes the computed blocks at their offsets, starting write-back
  every 256 MB (``sync_file_range``) so that the final fsync has little left;
* ``SequentialWriter`` (with numpy's engine): each file written front to back (``_DirectFile``)
  from a few page-aligned 8 MB buffers by ``_DirectIO``, with O_DIRECT where the filesystem takes
  it (``_direct_supported``; ``direct``, a property of the writer): no bytes copied into the page
  cache, nothing for the final fsync to wait for, while the device writes as the math goes on;
  else through the page cache.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from loratool import boundary
from loratool.errors import InputError, OutputError
from loratool.merge.plan import Action, MergePlan, ShardPlan, TensorPlan
from loratool.merge.workers import _Stop, _Worker

COPY_CHUNK = 64 << 20  # bytes per copy_file_range call (progress and Ctrl-C granularity)
SYNC_EVERY = 256 << 20  # start write-back every this many bytes written
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers are multiples of this
DIRECT_CHUNK = 8 << 20  # bytes per O_DIRECT write
DIRECT_BUFFERS = 8  # chunks being filled or written at once


# -- messages to the writer ---------------------------------------------------------------------

@dataclass
class _Open:
    path: Path


@dataclass
class _Copy:
    src: Path
    offset: int
    nbytes: int


@dataclass
class _Skip:
    """Bytes the prefill wrote (the header, raw copies): the writer moves past them."""

    nbytes: int


class _Close:
    pass


# -- the prefill and the writer at offsets ------------------------------------------------------

def _libc_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``: start writing a range back
    without waiting for it (Linux; None elsewhere: the final fsync then does all the work)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; errors surface at the final fsync

    return start


_WRITE_BEHIND = _libc_sync_file_range()


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, nbytes: int, stop: threading.Event,
                advance: Callable[[int], None], where: Path, chunk: int = COPY_CHUNK,
                fast: bool = True) -> bool:
    """Copy ``nbytes`` from ``src`` at ``src_off`` to ``dst`` at ``dst_off``: in the kernel
    (``copy_file_range``: the bytes never enter our memory) or, where the filesystem refuses that,
    through a small buffer. Returns whether the kernel copy still works (the caller's ``fast``)."""
    while nbytes and fast:
        if stop.is_set():
            raise _Stop()
        try:
            n = os.copy_file_range(src, dst, min(nbytes, chunk), src_off, dst_off)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                fast = False  # e.g. across filesystems on old kernels: copy by hand
                break
            raise
        if n == 0:
            raise InputError(f"{where}: truncated while copying (expected {nbytes} more bytes)")
        src_off, dst_off, nbytes = src_off + n, dst_off + n, nbytes - n
        advance(n)
    while nbytes:
        if stop.is_set():
            raise _Stop()
        data = os.pread(src, min(nbytes, 8 << 20), src_off)
        if not data:
            raise InputError(f"{where}: truncated while copying (expected {nbytes} more bytes)")
        view = memoryview(data)
        while view:
            n = os.pwrite(dst, view, dst_off)
            view, dst_off = view[n:], dst_off + n
            advance(n)
        src_off, nbytes = src_off + len(data), nbytes - len(data)
    return fast


class _Prefill:
    """Writes what needs no torch while torch is imported (a second or more on one core, during
    which the other cores would idle; ``copy_file_range`` releases the GIL): creates the output
    files, writes their headers and copies the untouched tensors raw, starting their write-back.
    The writer waits for a file to exist before writing the computed tensors into it, at their
    offsets; the two write different ranges of the same files.

    (Copying the base bytes of the tensors to merge into place too, for the merge to overwrite,
    was tried: it made the import slower and the stream no faster.)"""

    def __init__(self, plan: MergePlan, root: Path, progress: Callable[[int], None] | None):
        self.plan = plan
        self.root = root
        self.progress = progress
        self.written = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.created: dict[Path, threading.Event] = {self.path(s): threading.Event() for s in plan.shards}
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="loratool-prefill", daemon=True)

    def path(self, shard: ShardPlan) -> Path:
        return self.root if self.plan.single_file else self.root / shard.rel

    def start(self) -> "_Prefill":
        self.thread.start()
        return self

    def _advance(self, n: int) -> None:
        with self._lock:
            self.written += n
        if self.progress is not None and n:
            self.progress(n)

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        outs: list[tuple[ShardPlan, int]] = []
        try:
            fast = hasattr(os, "copy_file_range")
            for shard in self.plan.shards:
                path = self.path(shard)
                if self.plan.single_file:
                    os.unlink(path)  # atomic_path created the temporary file: write it from scratch
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                outs.append((shard, fd))
                self.created[path].set()
            for shard, fd in outs:
                header = shard.header()
                os.pwrite(fd, header, 0)
                self._advance(len(header))
                for t, offset in _offsets(shard, len(header)):
                    if t.action is Action.COPY:
                        src = self._src(fds, t.src.file.path)
                        fast = _copy_range(src, fd, t.src.info.start, offset, t.src.nbytes, self.stop,
                                           self._advance, t.src.file.path, fast=fast)
                        if _WRITE_BEHIND is not None:
                            _WRITE_BEHIND(fd, offset, t.src.nbytes)
        except _Stop:
            pass
        except BaseException as e:  # handed to the main thread
            self.error = e
        finally:
            for fd in fds.values():
                os.close(fd)
            for _, fd in outs:
                os.close(fd)
            for ev in self.created.values():
                ev.set()  # never leave the writer waiting (it sees ``error``)

    @staticmethod
    def _src(fds: dict[Path, int], path: Path) -> int:
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = boundary.open_regular(path)  # inputs are opened read-only
        return fd

    def wait_created(self, path: Path) -> None:
        self.created[path].wait()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> int:
        self.thread.join()
        self.check()
        return self.written

    def abort(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _offsets(shard: ShardPlan, start: int) -> Iterator[tuple[TensorPlan, int]]:
    """Each tensor of ``shard`` (each of its pieces: ``TensorPlan.pieces``) with its offset in the
    output file (data after the header)."""
    offset = start
    for t in shard.tensors:
        for p in t.pieces():
            yield p, offset
            offset += p.nbytes


class _Writer(_Worker):
    """Writes the computed tensors (row blocks) and replacements into the files the prefill
    created, at their offsets, in file order; starts write-back of what is final every 256 MB,
    so that the final fsync has little left."""

    def __init__(self, progress: Callable[[int], None] | None, prefill: _Prefill):
        super().__init__("loratool-writer")
        self.progress = progress
        self.prefill = prefill
        self.fd: int | None = None
        self.pos = 0  # where the next byte goes in the open file
        self.sources: dict[Path, int] = {}
        self.written = 0
        self._fast_copy = hasattr(os, "copy_file_range")
        self._unsynced = 0
        self._synced_to = 0
        self._syncs: list[threading.Thread] = []

    def _src(self, path: Path) -> int:
        fd = self.sources.get(path)
        if fd is None:
            fd = self.sources[path] = boundary.open_regular(path)  # inputs are opened read-only
        return fd

    def _advance(self, n: int) -> None:
        self.pos += n
        self.written += n
        self._unsynced += n
        if self._unsynced >= SYNC_EVERY:
            self._sync_behind()
        if self.progress is not None and n:
            self.progress(n)

    def _sync_behind(self) -> None:
        """Start writing back [where the last call stopped, here) in the background, without
        waiting for it (``sync_file_range``; an ``fdatasync`` here waited for the whole file and
        slowed the stream by what it saved the final fsync). One at a time; a dup'd descriptor,
        so that closing the file does not race with it."""
        if _WRITE_BEHIND is None or (self._syncs and self._syncs[-1].is_alive()):
            return
        self._unsynced = 0
        fd, off, n = os.dup(self.fd), self._synced_to, self.pos - self._synced_to
        self._synced_to = self.pos

        def sync() -> None:
            try:
                _WRITE_BEHIND(fd, off, n)
            finally:
                os.close(fd)

        t = threading.Thread(target=sync, name="loratool-sync", daemon=True)
        t.start()
        self._syncs.append(t)

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, self.pos)
            view = view[n:]
            self._advance(n)

    def handle(self, item) -> None:
        if isinstance(item, _Open):
            self.prefill.wait_created(item.path)
            self.fd = os.open(item.path, os.O_WRONLY)
            self.pos = self._synced_to = 0
        elif isinstance(item, _Close):
            os.close(self.fd)
            self.fd = None
        elif isinstance(item, _Skip):
            self.pos += item.nbytes
        elif isinstance(item, _Copy):
            self._fast_copy = _copy_range(self._src(item.src), self.fd, item.offset, self.pos, item.nbytes,
                                          self.stop, self._advance, item.src, fast=self._fast_copy)
        elif len(item):  # computed bytes: a numpy array (or bytes)
            self._write(item)

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            if self.fd is not None:
                os.close(self.fd)
            for fd in self.sources.values():
                os.close(fd)
            for t in self._syncs:
                t.join()


# -- each file front to back, with O_DIRECT -----------------------------------------------------

def _direct_supported(where: Path) -> bool:
    """Whether files in the folder ``where`` take O_DIRECT writes (tmpfs, for one, refuses them)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    import tempfile

    fd0, probe = tempfile.mkstemp(prefix=".loratool-direct-", dir=where)
    os.close(fd0)
    buf = mmap.mmap(-1, DIRECT_ALIGN)
    try:
        fd = os.open(probe, os.O_WRONLY | flag)
        try:
            return os.pwrite(fd, buf, 0) == DIRECT_ALIGN
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        buf.close()
        os.unlink(probe)


class _DirectIO(_Worker):
    """Writes full chunks with O_DIRECT, in a thread, from a few page-aligned buffers: the bytes
    go from our buffer to the device (no copy into the page cache, no write-back to wait for at
    the fsync), while the math goes on."""

    def __init__(self, progress: Callable[[int], None] | None):
        super().__init__("loratool-direct-io", depth=DIRECT_BUFFERS)
        self.progress = progress
        self.written = 0
        self.free: queue.Queue = queue.Queue()
        self.idle = threading.Condition()
        self.busy = 0
        for _ in range(DIRECT_BUFFERS):
            self.free.put(mmap.mmap(-1, DIRECT_CHUNK))  # anonymous mappings: page-aligned

    def buffer(self) -> mmap.mmap:
        while True:
            if self.error is not None:
                raise self.error
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                self.check_alive()

    def submit(self, fds: tuple[int, int], buf: mmap.mmap, offset: int, length: int, payload: int) -> None:
        with self.idle:
            self.busy += 1
        self.put((*fds, buf, offset, length, payload))

    def handle(self, item) -> None:
        fd, buffered, buf, offset, length, payload = item
        try:
            view = memoryview(buf)[:length]
            while view:
                # after a short write (a file-size limit, a full disk) the rest is unaligned: it
                # goes through the page cache, where the error, if any, is then reported
                # (a limit can also cut an O_DIRECT write to an unaligned length before it starts,
                # which fails with EINVAL: the same bytes then go through the page cache too)
                n = 0
                whole = len(view) // DIRECT_ALIGN * DIRECT_ALIGN  # the file's tail goes buffered
                if offset % DIRECT_ALIGN == 0 and whole:
                    try:
                        n = os.pwrite(fd, view[:whole], offset)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                if n == 0:
                    n = os.pwrite(buffered, view, offset)
                view, offset = view[n:], offset + n
            view.release()
            self.written += payload
            if self.progress is not None:
                self.progress(payload)
        finally:
            self.free.put(buf)
            with self.idle:
                self.busy -= 1
                self.idle.notify_all()

    def drain(self) -> None:
        """Wait until every submitted chunk is written."""
        with self.idle:
            while self.busy and self.error is None and self.thread.is_alive():
                self.idle.wait(0.1)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        super().close()
        self._unmap()

    def abort(self) -> None:
        super().abort()
        self._unmap()

    def _unmap(self) -> None:
        while True:
            try:
                self.free.get_nowait().close()
            except queue.Empty:
                return
            except BufferError:  # still viewed by a failed write: left to the garbage collector
                continue


class _DirectFile:
    """One output file, written front to back in DIRECT_CHUNK pieces through ``_DirectIO``: with
    O_DIRECT (``direct``), the last piece's whole pages too and its tail through the page cache
    (never past the file's size, which a file-size limit would refuse); else all through the page
    cache."""

    def __init__(self, path: Path, size: int, io: _DirectIO, direct: bool):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o644)
        self.buffered = -1
        self.size = size
        self.io = io
        self.pos = 0  # file offset of the buffer's first byte
        self.fill = 0
        try:
            self.buffered = os.open(path, os.O_WRONLY)
            self.buf = io.buffer()  # raises the I/O thread's error, if it has one
        except BaseException:
            self.release()
            raise

    def put(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            k = min(len(view), DIRECT_CHUNK - self.fill)
            self.buf[self.fill:self.fill + k] = view[:k]
            self.fill += k
            view = view[k:]
            if self.fill == DIRECT_CHUNK:
                self._flush()

    def copy_from(self, src: int, offset: int, nbytes: int, where: Path, key: str) -> None:
        """``nbytes`` of the file ``src`` from ``offset``, read straight into the buffer."""
        while nbytes:
            k = min(nbytes, DIRECT_CHUNK - self.fill)
            got = os.preadv(src, [memoryview(self.buf)[self.fill:self.fill + k]], offset)
            if got == 0:
                raise InputError(f"{where}: truncated while reading tensor {key!r}")
            self.fill, offset, nbytes = self.fill + got, offset + got, nbytes - got
            if self.fill == DIRECT_CHUNK:
                self._flush()

    def _flush(self) -> None:
        n = self.fill
        self.io.submit((self.fd, self.buffered), self.buf, self.pos, n, n)
        self.pos += n
        self.fill = 0
        self.buf = None
        self.buf = self.io.buffer()

    def close(self) -> None:
        if self.fill:
            self._flush()
        self.io.free.put(self.buf)
        self.buf = None
        self.io.drain()
        if self.pos != self.size:
            raise OutputError(f"internal error: wrote {self.pos} bytes of a {self.size}-byte file")
        self.release()

    def release(self) -> None:
        """Close the file's descriptors (once)."""
        for fd in (self.fd, self.buffered):
            if fd >= 0:
                os.close(fd)
        self.fd = self.buffered = -1


# -- the two writers behind the executor's interface --------------------------------------------

class OutputWriter(Protocol):
    """What the executor asks of a writer: every byte of each file, in file order."""

    copies: bool  # ``put`` has copied the bytes when it returns (the caller may reuse the array)

    def begin(self, shard: ShardPlan) -> None:
        """Start the file of ``shard`` (its header included)."""

    def put(self, data) -> None:
        """The next bytes of the file: a computed block or converted tensor (a numpy array)."""

    def copy(self, t: TensorPlan, src: _Copy) -> None:
        """The next bytes of the file: tensor ``t``, raw, from ``src``."""

    def end(self) -> None:
        """The file is complete."""

    def close(self) -> int:
        """Wait for every write; the bytes written."""

    def abort(self) -> None:
        """Stop and release everything (after an error; the temporary output is then removed)."""


class PrefillWriter:
    """The output through ``_Prefill`` (started here, so that it runs while the engine starts:
    torch's import) and ``_Writer``, which writes the rest at its offsets. ``put`` queues the
    array it is given: the caller must not reuse it (``copies`` is False)."""

    copies = False

    def __init__(self, plan: MergePlan, root: Path, progress: Callable[[int], None] | None):
        self.prefill = _Prefill(plan, root, progress).start()
        self.writer = _Writer(progress, self.prefill).start()

    def begin(self, shard: ShardPlan) -> None:
        self.writer.put(_Open(self.prefill.path(shard)))
        self.writer.put(_Skip(len(shard.header())))  # the prefill writes it

    def put(self, data) -> None:
        self.writer.put(data)

    def copy(self, t: TensorPlan, src: _Copy) -> None:
        # the prefill copies the untouched tensors; the writer copies replacements
        self.writer.put(_Skip(src.nbytes) if t.action is Action.COPY else src)

    def end(self) -> None:
        self.writer.put(_Close())

    def close(self) -> int:
        self.writer.close()
        return self.writer.written + self.prefill.finish()

    def abort(self) -> None:
        self.writer.abort()
        self.prefill.abort()  # before atomic_dir removes the directory it writes into
        # the error travels on; a copy kept here would tie it to the caller's frames in a cycle
        # that only the garbage collector breaks
        self.writer.error = self.prefill.error = None


class SequentialWriter:
    """Each output file front to back (``_DirectFile``) through one ``_DirectIO`` thread: with
    O_DIRECT (``direct``) or through the page cache. ``put`` copies what it is given into the
    I/O buffers before it returns (``copies``: the caller may reuse the array)."""

    copies = True

    def __init__(self, plan: MergePlan, root: Path, progress: Callable[[int], None] | None, direct: bool):
        self.plan = plan
        self.root = root
        self.direct = direct
        self.io = _DirectIO(progress).start()
        self.sources: dict[Path, int] = {}
        self.files: list[_DirectFile] = []

    def begin(self, shard: ShardPlan) -> None:
        path = self.root if self.plan.single_file else self.root / shard.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(_DirectFile(path, shard.nbytes, self.io, self.direct))
        self.files[-1].put(shard.header())

    def put(self, data) -> None:
        self.files[-1].put(data)

    def copy(self, t: TensorPlan, src: _Copy) -> None:
        fd = self.sources.get(src.src)
        if fd is None:
            fd = self.sources[src.src] = boundary.open_regular(src.src)  # inputs are opened read-only
        self.files[-1].copy_from(fd, src.offset, src.nbytes, src.src, t.key)

    def end(self) -> None:
        self.files[-1].close()

    def close(self) -> int:
        self.io.close()
        self._release()
        return self.io.written

    def abort(self) -> None:
        self.io.abort()
        # the error travels on; a copy kept here would tie it to the caller's frames (their
        # views, mappings and descriptors) in a cycle that only the garbage collector breaks
        self.io.error = None
        self._release()

    def _release(self) -> None:
        for fd in self.sources.values():
            os.close(fd)
        self.sources.clear()
        for f in self.files:
            f.release()
        self.files.clear()
