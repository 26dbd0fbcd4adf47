"""GPTQ/AWQ base weights in the merge: the base transform that dequantizes a packed layer's rows.

A ``loratool.quant.gptq.PackedRef`` presents a GPTQ or AWQ layer (``qweight``, ``qzeros``,
``scales``, ``g_idx``) as the 16-bit weight it dequantizes to. Its packed tensors are read once per
tensor (a few percent of its 16-bit bytes) and each row block the engine asks for is dequantized
from them; the bytes the reader hands over for the block are not used. Beside ``basequant``'s
``Dequantize`` (bitsandbytes), the other transform of a base stored quantized.
"""

from __future__ import annotations

from typing import Callable

from loratool.merge.basequant import BaseTransform


class DequantizePacked(BaseTransform):
    """The 16-bit rows of a GPTQ/AWQ weight, any row block (``blocksize`` 1: one output channel
    is one column of the packed tensors)."""

    name = "stored"

    def __init__(self, ref):
        self.ref = ref

    def prepare(self, t) -> Callable:
        ref, packed = self.ref, self.ref.arrays()

        def apply(buf, n: int, i: int, j: int):
            out = ref.dequantized(i, j - i, packed)
            return out, out.nbytes

        return apply
