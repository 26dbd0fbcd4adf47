"""Threads for many small linear-algebra calls.

The per-module work of inspect, resize and compose (QR of a d×r factor, an r×r SVD) takes well
under a millisecond to a few milliseconds on one thread; with torch's intra-op pool it is 10–50×
slower on a busy 2-core machine (its threads spin and wait on each other). So such loops run each
torch call on one thread, and spread the modules over a few Python threads instead (torch
releases the GIL inside its kernels). Every module is computed exactly as it would be alone, so
results do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def single_threaded():
    """Run torch on one intra-op thread inside the block (restored after). Nothing to do when
    torch is not loaded: the LoRA paths compute with numpy, whose BLAS the CLI keeps on one thread
    (loratool.cli.main), and importing torch for this would cost more than their work (issue 14)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_workers() -> int:
    env = os.environ.get("LORATOOL_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(4, os.cpu_count() or 1))


def map_modules(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` over a few threads, each torch call single-threaded; in order."""
    items = list(items)
    workers = workers or default_workers()
    with single_threaded():
        if workers == 1 or len(items) < 2:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))
