"""bitsandbytes' ``dequantize_4bit`` of a weight stored in 4 bits, as a Triton kernel (issue 16).

    dequantize_4bit(packed, scale, numel, dtype, spec, first=0, zero_fix=False) -> tensor (numel,)

Each element is its code (NF4 or FP4, ``loratool.quant.bnb.CODES``; two per byte, the first in
the high nibble) times its block's scale (the absmax, or with double quantization the absmax
after its 8-bit round trip: ``loratool.quant.stored.QuantizedRef.scale``), in float32, rounded
once to the dtype: bit for bit ``loratool.quant.bnb.dequantize``, which is bitsandbytes' own
(tests/test_quant_bnb.py). bf16 is rounded by its bits, to nearest even, and stored as its 16
bits (the interpreter's float32 -> bf16 cast truncates; see ``merge.py``). ``zero_fix`` adds +0
(FP4's -0 code becomes +0, as bitsandbytes' CPU fallback for odd rows gives it, see
``loratool.quant.bnb``). ``first``: the flat index of the first element (a row block of a larger
tensor), at a block boundary, ``scale`` being the whole tensor's.

On CUDA tensors it runs on the GPU; with ``TRITON_INTERPRET=1`` on CPU tensors (the tests);
``dequantize_4bit_reference`` is the same in torch, for anything else.
"""

from __future__ import annotations

import functools

from loratool.errors import UsageError

tl = None  # bound to triton.language on first use (see merge.py)

BLOCK = 1024  # elements a program


def _dequant4_kernel(P, SCALE, CODES, OUT, n, first,
                     BLOCK: tl.constexpr, QBS: tl.constexpr, ROUND: tl.constexpr, ZERO_FIX: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(P + offs // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
    v = tl.load(CODES + nib) * tl.load(SCALE + (first + offs) // QBS, mask=mask, other=0.0)
    if ZERO_FIX:
        v = v + 0.0
    if ROUND == 0:  # bf16: its 16 bits, rounded to nearest even
        u = v.to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        u = tl.where(v != v, 0x7FC0, u)  # NaN stays NaN (the GPU's 0x7FFFFFFF would carry into -0)
        tl.store(OUT + offs, u.to(tl.int32).to(tl.int16), mask=mask)
    elif ROUND == 1:  # fp16
        tl.store(OUT + offs, v.to(tl.float16), mask=mask)
    else:
        tl.store(OUT + offs, v, mask=mask)


@functools.cache
def _kernel():
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_dequant4_kernel)


def _tables(scale, spec, device):
    import numpy as np
    import torch

    from loratool.quant import bnb

    codes = torch.from_numpy(np.ascontiguousarray(bnb.CODES[spec.quant_type], np.float32)).to(device)
    return torch.as_tensor(scale, dtype=torch.float32).to(device).contiguous(), codes


def dequantize_4bit_triton(packed, scale, numel: int, dtype, spec, first: int = 0, zero_fix: bool = False):
    """The kernel (see the module docstring); ``packed``: uint8 holding elements [first, first +
    numel) (``first`` a multiple of the blocksize, so of 2); returns a (numel,) tensor of ``dtype``."""
    import torch
    import triton

    if first % spec.blocksize or packed.dtype != torch.uint8 or packed.numel() < (numel + 1) // 2:
        raise UsageError(f"dequantize_4bit: {packed.numel()} packed bytes ({packed.dtype}) from element {first} "
                         f"for {numel} elements; expected uint8, (numel + 1) // 2 of them, from a block boundary")
    scale, codes = _tables(scale, spec, packed.device)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    rounding = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[dtype]
    store = out.view(torch.int16) if rounding == 0 else out
    grid = (triton.cdiv(numel, BLOCK),)
    _kernel()[grid](packed.contiguous(), scale, codes, store, numel, first, BLOCK=BLOCK, QBS=spec.blocksize,
                    ROUND=rounding, ZERO_FIX=zero_fix)
    return out


def dequantize_4bit_reference(packed, scale, numel: int, dtype, spec, first: int = 0, zero_fix: bool = False):
    """``dequantize_4bit_triton`` in torch ops (any device)."""
    import torch

    scale, codes = _tables(scale, spec, packed.device)
    p = packed.reshape(-1)[: (numel + 1) // 2].to(torch.int64)
    nib = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:numel]
    idx = torch.arange(first, first + numel, device=packed.device) // spec.blocksize
    v = codes[nib] * scale[idx]
    if zero_fix:
        v = v + 0.0
    return v.to(dtype)


def dequantize_4bit(packed, scale, numel: int, dtype, spec, first: int = 0, zero_fix: bool = False):
    """The kernel for CUDA tensors when triton imports, the torch reference otherwise."""
    from .merge import triton_available

    fn = dequantize_4bit_triton if packed.is_cuda and triton_available() else dequantize_4bit_reference
    return fn(packed, scale, numel, dtype, spec, first, zero_fix)
