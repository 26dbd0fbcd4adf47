"""The streaming executor: runs a ``MergePlan`` into OUT, atomically.

``check_overflow`` runs before any byte is written; the other files of the model directory
(config, tokenizer, indexes) are written, then the safetensors files by one stream (``_stream``);
the output appears at OUT only when complete (``atomic_dir``, ``atomic_path``).

The stream goes over the shards, their tensors and the row blocks of the tensors to compute, in
file order: a reader thread (``reader._Reader``) reads the base rows ahead; an engine computes
each block; a writer takes every byte of each file in order (the header, computed blocks, raw
copies of untouched tensors). ``_execute`` chooses the two once:

* a plain merge on the CPU (every computed tensor one adapter at weight ±1 on a Linear,
  ``_numpy_plan``) never imports torch, which takes a second or more of one core:
  ``numpy_engine.NumpyEngine`` repeats PEFT's float32 sequence in numpy, in a few worker threads,
  on read-only mappings of the base rows (populated by the reader, released tensor by tensor);
  ``writers.SequentialWriter`` writes each file front to back from a few page-aligned 8 MB
  buffers, with O_DIRECT where the filesystem takes it (no bytes copied into the page cache,
  nothing for the final fsync to wait for, while the device writes as the math goes on), else
  through the page cache;
* everything else runs in torch (``engines.TorchEngine``: PEFT's arithmetic on the CPU, Triton on
  CUDA) on one math thread, on base rows read with ``pread`` in blocks of about 1 MB into reused
  buffers. ``writers.PrefillWriter`` writes the headers and the raw copies in a thread while torch
  is imported, then the computed blocks at their offsets, starting write-back every 256 MB
  (``sync_file_range``) so that the final fsync has little left.

A base tensor that modules add into blocks of rows of (q, k and v fused in a single-file SDXL
checkpoint's OpenCLIP ``in_proj_weight``: ``plan.Term.rows``) goes through the stream as its pieces
(``TensorPlan.pieces``): each block of rows a tensor of its own, computed as the unfused tensor
would be (the same engines, spans and bits), and the rows between them copied raw.

Reads, math and writes overlap, and the peak stays flat however large the model
(bench/bench_merge.py).
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from loratool import boundary
from loratool.adapter import load_tensor
from loratool.errors import OutputError, UsageError
from loratool.merge import numpy_engine
from loratool.merge.basequant import transformed
from loratool.merge.engines import BlockEngine, TorchEngine, check_engine, resolve_device, tensor_spans
from loratool.merge.overflow import check_overflow
from loratool.merge.plan import Action, MergePlan, TensorPlan
from loratool.merge.reader import _Reader
from loratool.merge.workers import QUEUE_DEPTH
from loratool.merge.writers import OutputWriter, PrefillWriter, SequentialWriter, _Copy, _direct_supported
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
        if not plan.single_file:
            _write_other_files(plan, tmp)
        # the writer first: the prefill writes while the engine starts (torch's import)
        if numpy_path:
            folder = tmp.parent if plan.single_file else tmp
            direct = direct_io is not False and _direct_supported(folder)
            if direct_io and not direct:
                raise OutputError(f"{out}: the filesystem of {folder} refuses O_DIRECT writes (direct_io=True); "
                                  "pass direct_io=None to write through the page cache where it does")
            writer = SequentialWriter(plan, tmp, progress, direct)
        else:
            writer = PrefillWriter(plan, tmp, progress)
        try:
            # resolve_device imports torch: a second or so, which the prefill uses
            math_engine = numpy_engine.NumpyEngine() if numpy_path else TorchEngine(resolve_device(device))
            written = _stream(plan, math_engine, writer, fail_after, block_bytes)
        except BaseException:
            writer.abort()  # before atomic_dir removes the directory it writes into
            raise
        if plan.output_quant is not None:  # one tensor in, several out: a 4-bit output (issue 16)
            plan.output_quant.rewrite(tmp, plan)
        if before_commit is not None:
            before_commit(tmp, plan)
    return written, math_engine.device


def _numpy_plan(plan: MergePlan, device: str, block_bytes: int | None = None, engine: str = "auto") -> bool:
    """Whether every computed tensor of ``plan`` goes through ``numpy_engine`` (then torch is
    never imported), rather than torch."""
    if device != "cpu" or engine == "torch":
        return False
    for t in (p for t in plan.tensors() for p in t.pieces()):
        if t.action is Action.CAST or (t.action is Action.MERGE and not numpy_engine.eligible(t, tensor_spans(t, device, block_bytes))):
            return False
        if t.action is Action.REPLACE and _raw_source(t) is None:
            return False
    return True


def _raw_source(t: TensorPlan) -> _Copy | None:
    """Where the bytes of a tensor written unchanged are: an untouched base tensor, or a
    modules_to_save tensor already in the output dtype; None for a replacement to convert."""
    ref = t.src if t.action is Action.COPY else t.replacement
    if t.action is Action.COPY or (isinstance(ref, TensorRef) and ref.dtype == t.dtype):
        return _Copy(ref.file.path, ref.info.start, ref.nbytes)
    return None


def _converted(t: TensorPlan):
    """A modules_to_save tensor converted to the output dtype (in torch), as bytes."""
    import torch

    return load_tensor(t.replacement).to(torch_dtype(t.dtype)).reshape(t.shape).reshape(-1).view(torch.uint8).numpy()


def _write_other_files(plan: MergePlan, root: Path) -> None:
    """Config, tokenizer and the other files of the model directory, and the indexes."""
    for src, rel in plan.copies:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel in plan.json_updates:
            data = boundary.read_json(src)
            for key, value in plan.json_updates[rel].items():
                if value is None:
                    data.pop(key, None)  # e.g. a 4-bit base's quantization_config
                else:
                    data[key] = value
            dest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            boundary.copy_regular(src, dest)  # a regular file, whatever the source was
    for rel, content in plan.indexes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)


# -- the stream ---------------------------------------------------------------------------------

def _stream(plan: MergePlan, engine: BlockEngine, writer: OutputWriter, fail_after: int | None,
            block_bytes: int | None) -> int:
    """Every safetensors file of ``plan``, in file order, through ``writer``; the tensors to
    compute (merges, dtype conversions) in row blocks through ``engine``. With ``engine.workers``,
    blocks are computed in a pool, a few ahead, and handed to the writer in order; else on this
    thread, one by one. Returns the bytes written; the caller aborts ``writer`` on an error."""
    # a tensor whose terms add into blocks of its rows (q, k, v fused) goes as its pieces
    jobs = [(p, tensor_spans(p, engine.device, block_bytes)) for t in plan.tensors() for p in t.pieces()
            if p.action in (Action.MERGE, Action.CAST)]
    spans = {id(t): s for t, s in jobs}
    reader = _Reader(jobs, mapped=engine.mapped).start()
    pool = ThreadPoolExecutor(engine.workers, thread_name_prefix="loratool-math") if engine.workers else None
    ahead = 2 * QUEUE_DEPTH  # blocks computed or being computed before the writer takes them
    pending: deque[Future] = deque()
    done = 0
    prepare = _Preparer([t for t, _ in jobs if t.transform is not None and not engine.takes_transform(t)])

    def hand(block) -> None:
        writer.put(block)
        if writer.copies:
            engine.recycle(block)

    def drain(keep: int = 0) -> None:
        while len(pending) > keep:
            hand(pending.popleft().result())

    def one(t) -> None:
        """One tensor (or piece of one) into the writer: computed block by block, or its bytes."""
        if t.action in (Action.MERGE, Action.CAST):
            rows = engine.tensor(t)
            if t.transform is not None and not engine.takes_transform(t):  # the base rows as the
                rows = transformed(rows, prepare(t))  # adapter saw them (issue 16)
            for _ in spans[id(t)]:
                bt, i, j, buf, n = reader.get()
                assert bt is t, "reader and executor disagree on the order of blocks"
                if pool is None:
                    hand(_block(rows, reader, buf, n, i, j))
                else:
                    pending.append(pool.submit(_block, rows, reader, buf, n, i, j))
                    drain(keep=ahead)
        else:
            drain()
            src = _raw_source(t)
            if src is None:
                writer.put(_converted(t))
            else:
                writer.copy(t, src)

    try:
        with engine.running():
            for shard in plan.shards:
                writer.begin(shard)
                for whole in shard.tensors:
                    if fail_after is not None and done >= fail_after:
                        raise OutputError(f"simulated failure after {done} tensors (fail_after_tensors)")
                    for t in whole.pieces():
                        one(t)
                    done += 1
                drain()
                writer.end()
        written = writer.close()
        reader.thread.join()
    except BaseException:
        for f in pending:
            f.cancel()
        pending.clear()
        reader.abort()
        raise
    finally:
        prepare.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return written


class _Preparer:
    """Each tensor's ``transform.prepare``, the next one's started in the background as the
    executor takes one: double quantization's pass over a tensor (its absmax vector, nested
    quantized) then runs while the tensor before it is computed, not between the two (about 1 s
    of the 1.1B base's ``--base-precision nf4,double-quant`` merge). ``tensors``: those whose
    transform the executor applies, in the executor's order."""

    def __init__(self, tensors: list):
        self.following = {id(a): b for a, b in zip(tensors, tensors[1:])}
        self.started: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="loratool-prepare") if len(tensors) > 1 else None

    def __call__(self, t) -> Callable:
        fut = self.started.pop(id(t), None)
        apply = t.transform.prepare(t) if fut is None else fut.result()
        nxt = self.following.get(id(t))
        if nxt is not None and self.pool is not None:
            self.started[id(nxt)] = self.pool.submit(nxt.transform.prepare, nxt)
        return apply

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _block(rows: Callable, reader: _Reader, buf, n: int, i: int, j: int):
    """One row block through the engine (``rows``); the base rows' buffer then goes back to the
    reader."""
    try:
        return rows(buf, n, i, j)
    finally:
        reader.release(buf)
