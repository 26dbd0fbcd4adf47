"""The streaming executor: runs a ``MergePlan`` into OUT, atomically.

One executor for every plan: ``check_overflow`` runs before any byte is written; the other files
of the model directory (config, tokenizer, indexes) are written, then the safetensors files, by
one of two paths below; the output appears at OUT only when complete (``atomic_dir``,
``atomic_path``).

Memory and time. A plain merge on the CPU (every computed tensor one adapter at weight ±1 on a
Linear, ``_numpy_plan``) never imports torch, which takes a second or more of one core:
``numpy_engine`` repeats PEFT's float32 sequence in numpy, in a few worker threads, on row
blocks of read-only mappings of the base (populated by a reader thread, released tensor by
tensor); each output file is written front to back with O_DIRECT from a few page-aligned 8 MB
buffers (``_stream_direct``), so that no bytes are copied into the page cache and the final fsync
has nothing to wait for, while the device writes as the math goes on. Where a filesystem refuses
O_DIRECT (tmpfs) the same stream writes through the page cache.

Everything else runs in torch. The output files, their headers and the raw copies of untouched
tensors are written first, in a thread, while torch is imported (``_Prefill``). Base tensors are
read with ``pread`` in blocks of about 1 MB into reused buffers; a reader thread prefetches blocks,
the math runs on one torch thread (the I/O threads need the other cores; OpenMP workers spinning
between small calls would take them), and a writer thread writes the blocks at their offsets,
starting write-back every 256 MB (``sync_file_range``) so that the final fsync has little left.
Reads, math and writes overlap and the peak stays flat however large the model
(bench/bench_merge.py).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from loratool import boundary
from loratool.adapter import load_tensor
from loratool.errors import OutputError, UsageError
from loratool.merge import numpy_engine
from loratool.merge.engines import (
    BLOCK_BYTES,
    TensorMath,
    _compute_block,
    _cpu_dtype,
    _CudaMath,
    check_engine,
    resolve_device,
    tensor_spans,
)
from loratool.merge.overflow import _nonfinite_error, check_overflow
from loratool.merge.plan import Action, MergePlan, TensorPlan
from loratool.merge.reader import _Reader
from loratool.merge.workers import QUEUE_DEPTH
from loratool.merge.writers import (
    _Close,
    _Copy,
    _direct_supported,
    _DirectFile,
    _DirectIO,
    _Open,
    _Prefill,
    _Skip,
    _Writer,
)
from loratool.safetensors_io import TensorRef, atomic_dir, atomic_path, torch_dtype


def execute(
    plan: MergePlan,
    out: str | os.PathLike,
    overwrite: bool = False,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    before_commit: Callable[[Path, MergePlan], None] | None = None,
    *,
    engine: str = "auto",
    direct_io: bool | None = None,
    block_bytes: int | None = None,
    fail_after_tensors: int | None = None,
) -> int:
    """Write ``plan`` to ``out`` atomically; return the bytes of safetensors data written.

    ``progress(n)`` is called from the writer threads with each number of bytes written.
    ``before_commit(tmp_dir, plan)`` runs when everything is written, before the rename (a place
    to add files, e.g. a manifest, that must appear together with the output).
    ``engine``: ``"auto"`` (numpy for plain merges on the CPU, ``_numpy_plan``; torch elsewhere),
    ``"torch"`` (always), ``"numpy"`` (a ``UsageError`` where the numpy path cannot give torch's
    bits). ``direct_io`` (the numpy path's output files): ``None``, O_DIRECT where the output's
    filesystem takes it; ``False``, through the page cache; ``True``, O_DIRECT or an ``OutputError``.
    ``block_bytes`` (the size of a row block) and ``fail_after_tensors`` (raise after that many
    tensors) are for tests.
    """
    return _execute(plan, out, overwrite, device, progress, before_commit, engine=engine, direct_io=direct_io,
                    block_bytes=block_bytes, fail_after=fail_after_tensors)[0]


def _execute(plan: MergePlan, out, overwrite, device, progress, before_commit, *, engine: str = "auto",
             direct_io: bool | None = None, block_bytes: int | None = None,
             fail_after: int | None = None) -> tuple[int, str]:
    """``execute``, with ``device`` resolved (torch imported) only once the prefill runs; returns
    (bytes written, the device)."""
    out = Path(out)
    check_engine(engine)
    check_overflow(plan)  # before any byte is written
    numpy_path = resolve_device(device, probe=True) == "cpu" and _numpy_plan(plan, "cpu", block_bytes, engine)
    if engine == "numpy" and not numpy_path:
        raise UsageError("engine 'numpy' cannot give torch's bits for this merge: it takes plain merges on the "
                         "CPU only (every merged tensor one adapter at weight ±1 on a Linear layer, in shapes "
                         "numpy's GEMM sums in PEFT's order on this machine); use engine 'auto' or 'torch'")
    ctx = atomic_path(out, overwrite=overwrite) if plan.single_file else atomic_dir(out, overwrite=overwrite)
    with ctx as tmp:
        root = tmp
        if not plan.single_file:
            _write_other_files(plan, root)
        if numpy_path:
            folder = root.parent if plan.single_file else root
            direct = direct_io is not False and _direct_supported(folder)
            if direct_io and not direct:
                raise OutputError(f"{out}: the filesystem of {folder} refuses O_DIRECT writes (direct_io=True); "
                                  "pass direct_io=None to write through the page cache where it does")
            written = _stream_direct(plan, root, progress, fail_after, block_bytes, direct)
            if before_commit is not None:
                before_commit(root, plan)
            return written, "cpu"
        prefill = _Prefill(plan, root, progress).start()
        try:
            dev = resolve_device(device)  # imports torch: a second or so, which the prefill uses
            written = _stream(plan, root, dev, progress, fail_after, block_bytes, prefill)
            written += prefill.finish()
        except BaseException:
            prefill.abort()  # before atomic_dir removes the directory it writes into
            raise
        if before_commit is not None:
            before_commit(root, plan)
    return written, dev


def _numpy_plan(plan: MergePlan, device: str, block_bytes: int | None = None, engine: str = "auto") -> bool:
    """Whether every computed tensor of ``plan`` goes through ``numpy_engine`` (then torch is
    never imported), rather than torch."""
    if device != "cpu" or engine == "torch":
        return False
    for t in plan.tensors():
        if t.action is Action.CAST or (t.action is Action.MERGE and not numpy_engine.eligible(t, tensor_spans(t, device, block_bytes))):
            return False
        if t.action is Action.REPLACE and not isinstance(_replacement_bytes(t, probe=True), _Copy):
            return False
    return True


def _replacement_bytes(t: TensorPlan, probe: bool = False):
    """A modules_to_save tensor's bytes: a raw copy, or (``probe``: None) a conversion in torch."""
    src = t.replacement
    if isinstance(src, TensorRef) and src.dtype == t.dtype:
        return _Copy(src.file.path, src.info.start, src.nbytes)
    if probe:
        return None
    import torch

    return load_tensor(src).to(torch_dtype(t.dtype)).reshape(t.shape).reshape(-1).view(torch.uint8).numpy()


def _write_other_files(plan: MergePlan, root: Path) -> None:
    """Config, tokenizer and the other files of the model directory, and the indexes."""
    for src, rel in plan.copies:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel in plan.json_updates:
            data = boundary.read_json(src)
            data.update(plan.json_updates[rel])
            dest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            boundary.copy_regular(src, dest)  # a regular file, whatever the source was
    for rel, content in plan.indexes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)


# -- torch's path: prefill, reader, one math thread, writer -------------------------------------

def _stream(plan: MergePlan, root: Path, device: str, progress, fail_after: int | None,
            block_bytes: int | None, prefill: _Prefill) -> int:
    """Reads, computes (in torch) and writes the tensors that are not raw copies."""
    import torch

    jobs = [(t, tensor_spans(t, device, block_bytes)) for t in plan.tensors()
            if t.action in (Action.MERGE, Action.CAST)]
    spans = {id(t): s for t, s in jobs}
    writer = _Writer(progress, prefill).start()
    reader = _Reader(jobs).start()
    done = 0
    threads = torch.get_num_threads()
    # One math thread: the reader and the writer need the other cores, and torch's OpenMP workers
    # spin between the many small calls and take the cores the I/O threads need.
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for shard in plan.shards:
                writer.put(_Open(prefill.path(shard)))
                writer.put(_Skip(len(shard.header())))  # the prefill wrote it
                for t in shard.tensors:
                    if fail_after is not None and done >= fail_after:
                        raise OutputError(f"simulated failure after {done} tensors (fail_after_tensors)")
                    if t.action is Action.COPY:
                        writer.put(_Skip(t.nbytes))  # the prefill copies it
                    elif t.action is Action.REPLACE:
                        writer.put(_replacement_bytes(t))
                    else:
                        engine = None
                        if t.action is Action.MERGE:
                            engine = (_CudaMath if device == "cuda" else TensorMath)(
                                t, _cpu_dtype(t, device), device, reuse=True)
                        for _ in spans[id(t)]:
                            bt, i, j, buf, n = reader.get()
                            assert bt is t, "reader and executor disagree on the order of blocks"
                            block = _compute_block(t, engine, buf, n, i, j)
                            reader.release(buf)
                            writer.put(block)
                    done += 1
                writer.put(_Close())
        writer.close()
        reader.thread.join()
    except BaseException:
        reader.abort()
        writer.abort()
        raise
    finally:
        torch.set_num_threads(threads)
    return writer.written


# -- plain merges on the CPU: numpy math, O_DIRECT output ---------------------------------------

def _numpy_block(t: TensorPlan, engine, reader: "_Reader", buf, n: int, i: int, j: int, outs: list):
    """Rows [i, j) of ``t`` through ``numpy_engine`` (in a worker thread); the read buffer is
    handed back to the reader when done. ``outs``: output arrays to reuse (handed back by the
    caller)."""
    dtype = t.src.dtype
    try:
        w = numpy_engine.raw_array(buf, dtype, n // numpy_engine.RAW[dtype].itemsize).reshape(j - i, -1)
        try:
            out = outs.pop()
        except IndexError:
            out = None
        size = w.size * numpy_engine.RAW[engine.dtype].itemsize
        if out is None or out.nbytes < size:
            out = np.empty(-(-max(size, BLOCK_BYTES) // 8) * 8, np.uint8)  # any itemsize views it
        return engine.rows(w, i, j, out.view(numpy_engine.RAW[engine.dtype]))
    except numpy_engine.NonFiniteBlock as e:
        raise _nonfinite_error(t, e.count, e.row, e.col, e.value, e.base) from None
    finally:
        reader.release(buf)


def _stream_direct(plan: MergePlan, root: Path, progress, fail_after: int | None,
                   block_bytes: int | None, direct: bool) -> int:
    """The whole output of a plain merge on the CPU (``_numpy_plan``): ``numpy_engine`` math
    in worker threads on blocks of mapped base rows, and each file written front to back, with
    O_DIRECT where the filesystem takes it (``direct``); untouched tensors are read into the same
    buffers (no torch import; with O_DIRECT, nothing for the page cache to write back)."""
    from loratool._threads import default_workers

    jobs = [(t, tensor_spans(t, "cpu", block_bytes)) for t in plan.tensors() if t.action is Action.MERGE]
    spans = {id(t): s for t, s in jobs}
    reader = _Reader(jobs, mapped=True).start()
    io = _DirectIO(progress).start()
    pool = ThreadPoolExecutor(default_workers(), thread_name_prefix="loratool-math")
    sources: dict[Path, int] = {}
    files: list[_DirectFile] = []
    pending: list[Future] = []
    done = 0

    def src(path: Path) -> int:
        if path not in sources:
            sources[path] = boundary.open_regular(path)  # inputs are opened read-only
        return sources[path]

    outs: list = []  # output arrays, reused (list.pop and append are atomic)

    def drain(out: _DirectFile, keep: int = 0) -> None:
        while len(pending) > keep:
            block = pending.pop(0).result()
            out.put(block)
            outs.append(block.base if block.base is not None else block)

    try:
        with numpy_engine.single_threaded_blas():
            for shard in plan.shards:
                path = root if plan.single_file else root / shard.rel
                path.parent.mkdir(parents=True, exist_ok=True)
                out = _DirectFile(path, shard.nbytes, io, direct)
                files.append(out)
                out.put(shard.header())
                for t in shard.tensors:
                    if fail_after is not None and done >= fail_after:
                        raise OutputError(f"simulated failure after {done} tensors (fail_after_tensors)")
                    if t.action is Action.MERGE:
                        engine = numpy_engine.PlainMath(t)
                        for _ in spans[id(t)]:
                            bt, i, j, buf, n = reader.get()
                            assert bt is t, "reader and executor disagree on the order of blocks"
                            pending.append(pool.submit(_numpy_block, t, engine, reader, buf, n, i, j, outs))
                            drain(out, keep=2 * QUEUE_DEPTH)
                    else:
                        drain(out)
                        ref = t.src if t.action is Action.COPY else t.replacement
                        out.copy_from(src(ref.file.path), ref.info.start, ref.nbytes, ref.file.path, t.key)
                    done += 1
                drain(out)
                out.close()
        io.close()
        reader.thread.join()
    except BaseException:
        for f in pending:
            f.cancel()
        pending.clear()
        reader.abort()
        io.abort()
        # the error travels on; a copy kept here would tie it to this frame (its views, mappings
        # and descriptors) in a cycle that only the garbage collector breaks
        io.error = None
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in sources.values():
            os.close(fd)
        for f in files:
            for fd in (f.fd, f.buffered):
                if fd >= 0:
                    os.close(fd)
    return io.written
