"""bitsandbytes' own dequantization, as the reference the quantized-base tests compare with.

bitsandbytes' 4-bit format cuts a tensor into blocks of ``blocksize`` consecutive elements, flat,
whatever its shape: ``quantize_4bit`` writes them so on every backend and its CUDA kernel reads
them so. Its compiled CPU ``dequantize_4bit`` (0.50.2, taken for an even last dimension)
does not always: its AVX-512 branch (the scalar one indexes blocks over the flat tensor,
bitsandbytes PR #2072 says) gives a (64, 96) weight at blocksize 64, on an AMD EPYC Zen 4 here,
with 5,400 of its 6,144 elements scaled by another block's absmax when a row is not whole blocks
(seen for rows of 32, 96 and 160 elements at 64, of 64 at 128); the earlier machines gave
the flat blocks. ``dequantize_4bit`` here asks bitsandbytes for its dequantization
in pieces of whole blocks, shaped (blocks, blocksize), which every branch reads alike,
then the last partial block alone, and so gives the flat-block values on every CPU.

Zeros: FP4's code 0b1000 is -0. bitsandbytes' CPU kernels give it as -0 or +0 depending on the
path and the shape (the fallback for odd rows and one-block rows: +0; longer rows: -0). The values
are the same; ``canonical`` folds -0 into +0 where a test compares FP4 bits with bitsandbytes'.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from bitsandbytes import functional as F


def dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """``F.dequantize_4bit(packed, state)`` with the flat blocks the format defines (above)."""
    s = copy.copy(state)
    if s.nested:  # the absmax first, as dequantize_4bit does it
        s.absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        s.nested, s.state2, s.offset = False, None, None
    shape, bs = state.shape, state.blocksize
    n = shape.numel()
    if n == 0 or shape[-1] % 2:  # bitsandbytes' torch fallback: flat blocks already
        return F.dequantize_4bit(packed, s)
    flat = packed.reshape(-1)
    full = n - n % bs
    parts = []
    if full:
        a = copy.copy(s)
        a.shape, a.absmax = torch.Size([full // bs, bs]), s.absmax[: full // bs]
        parts.append(F.dequantize_4bit(flat[: full // 2].reshape(-1, 1), a).reshape(-1))
    if n % bs:
        b = copy.copy(s)
        b.shape, b.absmax = torch.Size([n % bs]), s.absmax[full // bs:]
        parts.append(F.dequantize_4bit(flat[full // 2:].reshape(-1, 1), b).reshape(-1))
    return torch.cat(parts).reshape(shape)


def canonical(bits, quant_type: str):
    """The raw bits (numpy unsigned or torch int16/int32 view) with FP4's -0 as +0; NF4's as given."""
    if quant_type != "fp4":
        return bits
    if isinstance(bits, torch.Tensor):
        mask = 0x7FFF if bits.element_size() == 2 else 0x7FFFFFFF
        return torch.where((bits & mask) == 0, torch.zeros_like(bits), bits)
    mask = bits.dtype.type(0x7FFF if bits.dtype.itemsize == 2 else 0x7FFFFFFF)
    return np.where((bits & mask) == 0, bits.dtype.type(0), bits)
