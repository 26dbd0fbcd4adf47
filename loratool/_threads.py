"""Thread settings for many small linear-algebra calls.

The per-module work of inspect/validate (QR of a d×r factor, an r×r SVD) takes well under a
millisecond on one thread; with torch's intra-op pool it is 10–30× slower on a busy 2-core machine
(threads spin and wait on each other). So such loops run single-threaded.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def single_threaded():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
