"""Fused LoRA merge: one pass over the base weight for N adapters (Triton), and its dispatcher.

    W' = round(W + Σᵢ cᵢ · Bᵢ @ Aᵢ)                      (``merge``)
    W' = round(m[:, None] · V / ‖V‖_row),  V as above     (``dora_merge``)

The torch references and the exact formulas (with PEFT's DoRA dtype handling) are in
``reference.py``; ``merge``/``dora_merge`` take the Triton path for CUDA tensors when triton imports,
and the torch reference otherwise (CPU, or no triton).

How the kernel works. Before the launch, torch concatenates the factors on W's device, in float32,
with the coefficients folded into B::

    Bcat = [c₁B₁ | … | cₙBₙ]   (out × R)      Acat = [A₁; …; Aₙ]   (R × in)

so Σᵢ cᵢ Bᵢ Aᵢ = Bcat @ Acat. R = Σ rᵢ is padded with zero columns/rows up to a multiple of
BLOCK_R (≥ 16: ``tl.dot`` needs K ≥ 16). Each program owns one BLOCK_M × BLOCK_N tile of W: it loads
the W tile once, upcasts it to float32, adds ``tl.dot`` of the matching Bcat rows and Acat columns
(a loop over R in BLOCK_R chunks), and stores once in the output dtype: float32 accumulation, one
rounding. The factors are tiny next to W (R ≪ out, in), so the traffic is W read once plus W'
written once. Strided W/out (e.g. the transpose of a Conv1D weight) and in-place (out=W) work: each
program reads its own tile before writing it and tiles do not overlap.

The DoRA merge runs the same kernel twice, with a different epilogue (``EPILOGUE``):
  1. ROW_SUMSQ: each program writes Σ V² over its tile's columns for each of its rows into a
     partials buffer (out × number of column tiles); no output is written.
  2. torch, between the launches: scale = m / sqrt(Σ partials) per row (float32, a few kilobytes;
     a fixed summation order, so deterministic, unlike atomics in the kernel).
  3. ROW_SCALED: the merge again, multiplied by scale[:, None] before the one rounding.
This reads W twice and writes it once, but keeps the 2-D grid of the plain merge: a row-block kernel
(one program owning whole rows) has only out/BLOCK_M programs, 16 for a 256-row k/v projection,
which leaves most of an H100's 132 SMs idle.

Importing this module does not import triton (the CPU path, the CLI and platforms without triton
never need it). The kernel below is a plain function with unevaluated annotations
(``from __future__ import annotations``); ``_kernels()`` imports triton on first use, binds ``tl``
in this module's globals (the kernel resolves it there when compiled) and applies ``triton.jit``
and ``triton.autotune`` with configs built by ``_autotune_configs()`` then. Under
``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors (the tests do that).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Sequence

from loratool.errors import UsageError

from .reference import check_factors, dora_merge_reference, merge_reference, requant_merge_reference, requant_tables

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["merge", "dora_merge", "requant_merge", "merge_triton", "dora_merge_triton", "requant_merge_triton",
           "triton_available"]

# Bound to triton.language by _kernels() on first use; the kernel source resolves `tl` here.
tl = None

# EPILOGUE values of _merge_kernel (the kernel compares against the literals: a Triton kernel may
# only read globals that are tl.constexpr, and tl is not bound at import).
STORE, ROW_SUMSQ, ROW_SCALED = 0, 1, 2

# The smallest BLOCK_N of any config: the DoRA partials buffer has cdiv(in, this) columns, enough
# for whichever config the autotuner picks (unused columns stay zero).
_MIN_BLOCK_N = 16


def _merge_kernel(
    W, B, A, OUT, ROW_SCALE, QSCALE, QRECIP, QBOUNDS, QCODES,
    M, N, R,
    stride_wm, stride_wn, stride_bm, stride_br, stride_ar, stride_an, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, EPILOGUE: tl.constexpr, QUANT: tl.constexpr, QBS: tl.constexpr,
):
    pid_n = tl.program_id(0)  # column tiles vary fastest: neighbouring programs read adjacent memory
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    # int64 offsets: out × in can exceed 2³¹ elements (a 256k-vocab embedding at 8192 wide)
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]

    # The W tile, loaded once. Masked-out elements are 0 (and so are the masked B rows / A columns
    # below), so they add nothing to the DoRA row sums.
    acc = tl.load(W + rows * stride_wm + cols * stride_wn, mask=mask, other=0.0).to(tl.float32)
    if QUANT == 1:
        # the tile as the adapter saw it: bitsandbytes' dequant(quant(W)) (``requant_merge_triton``).
        # W is contiguous and its rows whole blocks of QBS, so element (m, n) is in block (m·N + n) // QBS.
        blk = (rows * N + cols) // QBS
        s = acc * tl.load(QRECIP + blk, mask=mask, other=0.0)  # W · (1 / absmax), as quantize_4bit
        idx = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k in tl.static_range(15):  # the code: midpoints below s (one on a midpoint takes the lower)
            idx += (s > tl.load(QBOUNDS + k)).to(tl.int32)
        idx = tl.where(s != s, 15, idx)  # NaN (an inf or NaN in the block): the last code, as searchsorted
        deq = tl.load(QCODES + idx) * tl.load(QSCALE + blk, mask=mask, other=0.0)
        # dequantize_4bit's output, rounded to W's dtype. bf16 by its bits, to nearest even, as
        # loratool.quant.bnb rounds (the interpreter's float32 -> bf16 cast truncates; the GPU's
        # rounds the same way as this)
        if W.dtype.element_ty == tl.bfloat16:
            u = deq.to(tl.uint32, bitcast=True)
            u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
            # a NaN stays NaN (the GPU's 0x7FFFFFFF would carry into the sign: -0)
            acc = tl.where(deq != deq, deq, u.to(tl.float32, bitcast=True))
        else:
            acc = deq.to(W.dtype.element_ty).to(tl.float32)
    # Bcat/Acat are float32 with R padded to a multiple of BLOCK_R: no mask along R. Keeping the
    # factors in float32 keeps the folded coefficients unrounded, and it is also what makes the
    # interpreter usable: triton 3.9's interpreter stores bf16 as uint16 and its tl.dot is a plain
    # np.matmul of that storage, so a bf16 tl.dot there would multiply bit patterns.
    for r0 in range(0, R, BLOCK_R):
        b = tl.load(B + rows * stride_bm + (r0 + offs_r)[None, :] * stride_br, mask=mask_m[:, None], other=0.0)
        a = tl.load(A + (r0 + offs_r)[:, None] * stride_ar + cols * stride_an, mask=mask_n[None, :], other=0.0)
        acc = tl.dot(b, a, acc, input_precision=INPUT_PRECISION)

    if EPILOGUE == 1:  # ROW_SUMSQ: OUT is the (M, column tiles) partials buffer
        tl.store(OUT + offs_m.to(tl.int64) * stride_om + pid_n * stride_on, tl.sum(acc * acc, axis=1),
                 mask=mask_m)
    else:
        if EPILOGUE == 2:  # ROW_SCALED: the DoRA factor m / ‖V‖ of each row
            acc = acc * tl.load(ROW_SCALE + offs_m, mask=mask_m, other=0.0)[:, None]
        tl.store(OUT + rows * stride_om + cols * stride_on, acc.to(OUT.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _autotune_configs():
    """Tile shapes for the autotuner, built on first use (this needs triton).

    The kernel is bandwidth-bound (R ≪ in), so the configs vary the tile shape and warps only: the
    one loop is over R, a single iteration up to R = 64, so there is nothing to pipeline. Few
    configs also keep the first merge's compile-and-time step short (each is compiled once per
    EPILOGUE and dtype). Under the interpreter there is no timing to tune on and each program is a
    few numpy calls, so one small tile is used.
    """
    import triton

    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    shapes = [(64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 64, 4), (32, 128, 4), (32, 256, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=2) for m, n, w in shapes]


@functools.cache
def _kernels():
    """Import triton, bind ``tl`` and build (plain jit kernel, autotuned kernel) once."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    jitted = triton.jit(_merge_kernel)
    # restore_value: the autotuner runs every config on the real arguments; with out=W (in place)
    # each run would add the delta again, so OUT is restored after each timing run.
    tuned = triton.autotune(configs=_autotune_configs(), key=["M", "N", "R", "EPILOGUE", "QUANT", "QBS"],
                            restore_value=["OUT"])(jitted)
    return jitted, tuned


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it does not say whether a GPU is present)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _block_r(R: int) -> int:
    """BLOCK_R: R rounded up to 16 (tl.dot's minimum K), capped at 64 (register pressure)."""
    return min(max(16, -(-R // 16) * 16), 64)


def _concat_factors(W, Bs, As, coeffs, block_r: int):
    """Bcat = [c₁B₁ | … | cₙBₙ] (out × R_pad) and Acat = [A₁; …; Aₙ] (R_pad × in), float32 on W's
    device, zero-padded so that R_pad is a multiple of block_r. Returns (Bcat, Acat, R_pad)."""
    import torch

    out_features, in_features = W.shape
    R = sum(B.shape[1] for B in Bs)
    R_pad = max(block_r, -(-R // block_r) * block_r)
    Bcat = torch.zeros(out_features, R_pad, dtype=torch.float32, device=W.device)
    Acat = torch.zeros(R_pad, in_features, dtype=torch.float32, device=W.device)
    r0 = 0
    for B, A, c in zip(Bs, As, coeffs):
        r = B.shape[1]
        # the coefficient is folded in float32: Bcat holds cᵢBᵢ rounded once, like the reference's
        # float32 alpha·(B@A) up to the order of the products
        torch.mul(B.to(device=W.device, dtype=torch.float32), float(c), out=Bcat[:, r0:r0 + r])
        Acat[r0:r0 + r].copy_(A)
        r0 += r
    return Bcat, Acat, R_pad


def _input_precision(W) -> str:
    """tl.dot precision for the float32 factors.

    Triton's default for float32 dots is TF32 (10-bit mantissa), which would round every factor
    product to about 3 decimal digits. "tf32x3" splits each operand into two TF32 halves and sums
    three tensor-core products: float32-level accuracy at tensor-core speed (sm80+). Older GPUs have
    no TF32 and use the plain float32 FMA path ("ieee"), as does the interpreter (it ignores this).
    """
    import torch

    if _interpreting() or not W.is_cuda:
        return "ieee"
    return "tf32x3" if torch.cuda.get_device_capability(W.device)[0] >= 8 else "ieee"


def _launch(W, Bcat, Acat, R_pad, out, epilogue, row_scale, config, block_r, quant=None):
    """Run _merge_kernel over the tiles of W. ``config`` (BLOCK_M, BLOCK_N and optionally num_warps)
    bypasses the autotuner; tests use it to pick small tiles and BLOCK_R, e.g. to exercise the R loop."""
    import triton

    jitted, tuned = _kernels()
    M, N = W.shape
    # with ROW_SUMSQ, out is the (M, column tiles) partials buffer; ROW_SCALE is only read with
    # ROW_SCALED, any tensor stands in for it otherwise
    q = quant or (Bcat, Bcat, Bcat, Bcat, 1)  # any tensor stands in for the quantization's without it
    args = (W, Bcat, Acat, out, row_scale if row_scale is not None else Bcat, *q[:4],
            M, N, R_pad,
            W.stride(0), W.stride(1), Bcat.stride(0), Bcat.stride(1), Acat.stride(0), Acat.stride(1),
            out.stride(0), out.stride(1))
    common = dict(BLOCK_R=block_r, INPUT_PRECISION=_input_precision(W), EPILOGUE=epilogue,
                  QUANT=1 if quant else 0, QBS=q[4])
    if config is not None:
        meta = {k: config[k] for k in ("BLOCK_M", "BLOCK_N")}
        grid = (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))
        jitted[grid](*args, **meta, **common, num_warps=config.get("num_warps", 4),
                     num_stages=config.get("num_stages", 1))
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
        tuned[grid](*args, **common)


def _prepare(W, Bs, As, coeffs, out, magnitude, config):
    import torch

    check_factors(W, Bs, As, coeffs, magnitude)
    if not (W.is_cuda or _interpreting()):
        raise UsageError(f"merge_triton: the base weight is on {W.device}; the Triton kernel needs a CUDA "
                         f"tensor (or TRITON_INTERPRET=1). Call loratool.kernels.merge.merge (or dora_merge), "
                         f"which falls back to the torch reference on the CPU")
    if out is None:
        out = torch.empty_like(W)
    elif tuple(out.shape) != tuple(W.shape) or out.device != W.device \
            or str(out.dtype).removeprefix("torch.") not in ("bfloat16", "float16", "float32"):
        raise UsageError(f"merge_triton: out has shape {tuple(out.shape)}, dtype {out.dtype} on "
                         f"{out.device}; expected shape {tuple(W.shape)} on {W.device} and a "
                         f"bf16/fp16/fp32 dtype (or out=None for a new tensor)")
    elif W.numel() and _overlaps(out, W) and not (out.data_ptr() == W.data_ptr() and out.stride() == W.stride()):
        raise UsageError(f"merge_triton: out (strides {out.stride()}) overlaps W (strides {W.stride()}) "
                         f"without being W; pass out=W to merge in place, or a separate tensor")
    R = sum(B.shape[1] for B in Bs)
    block_r = (config or {}).get("BLOCK_R") or _block_r(R)
    Bcat, Acat, R_pad = _concat_factors(W, Bs, As, coeffs, block_r)
    return out, Bcat, Acat, R_pad, block_r


def _overlaps(a, b) -> bool:
    """Whether the memory spans of two (non-empty) tensors intersect."""
    def span(t):
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a.device == b.device and a0 < b1 and b0 < a1


def merge_triton(W: "torch.Tensor", Bs: Sequence["torch.Tensor"], As: Sequence["torch.Tensor"],
                 coeffs: Sequence[float], out: "torch.Tensor | None" = None,
                 config: dict | None = None) -> "torch.Tensor":
    """W + Σ cᵢ Bᵢ @ Aᵢ with the Triton kernel; float32 accumulation, one rounding to out's dtype.

    W: (out, in) bf16/fp16/fp32, any strides. Bᵢ: (out, rᵢ), Aᵢ: (rᵢ, in), any float dtype.
    coeffs: cᵢ = weightᵢ · scaleᵢ. out: None (a new tensor like W), W itself (in place) or a
    separate (out, in) tensor of any of the three dtypes. config: {"BLOCK_M", "BLOCK_N"[, "BLOCK_R",
    "num_warps"]} to bypass the autotuner. Returns out.
    """
    out, Bcat, Acat, R_pad, block_r = _prepare(W, Bs, As, coeffs, out, None, config)
    if W.numel() == 0:
        return out
    _launch(W, Bcat, Acat, R_pad, out, STORE, None, config, block_r)
    return out


def dora_merge_triton(W: "torch.Tensor", Bs: Sequence["torch.Tensor"], As: Sequence["torch.Tensor"],
                      coeffs: Sequence[float], magnitude: "torch.Tensor",
                      out: "torch.Tensor | None" = None, config: dict | None = None) -> "torch.Tensor":
    """DoRA merge m[:, None] · V / ‖V‖_row, V = W + Σ cᵢ Bᵢ Aᵢ, with the Triton kernel (two passes
    over W, see the module docstring); magnitude: (out,). Other arguments as ``merge_triton``."""
    import torch

    out, Bcat, Acat, R_pad, block_r = _prepare(W, Bs, As, coeffs, out, magnitude, config)
    if W.numel() == 0:
        return out
    M, N = W.shape
    min_block_n = config["BLOCK_N"] if config is not None else _MIN_BLOCK_N
    partials = torch.zeros(M, -(-N // min_block_n), dtype=torch.float32, device=W.device)
    _launch(W, Bcat, Acat, R_pad, partials, ROW_SUMSQ, None, config, block_r)
    # summed by torch in a fixed order: deterministic, unlike atomic adds in the kernel
    scale = magnitude.to(device=W.device, dtype=torch.float32) / partials.sum(dim=1).sqrt()
    _launch(W, Bcat, Acat, R_pad, out, ROW_SCALED, scale, config, block_r)
    return out


def requant_merge_triton(W: "torch.Tensor", Bs: Sequence["torch.Tensor"], As: Sequence["torch.Tensor"],
                         coeffs: Sequence[float], spec, scale: "torch.Tensor | None" = None,
                         out: "torch.Tensor | None" = None, config: dict | None = None) -> "torch.Tensor":
    """round(dequant(quant(W)) + Σ cᵢ Bᵢ @ Aᵢ) with the Triton kernel: ``merge_triton`` whose tile
    is first replaced by bitsandbytes' round trip of it (``spec``: ``loratool.quant.bnb.QuantSpec``),
    in registers, bit for bit as ``requant_reference``; one read of W, one write of out.

    W: contiguous (out, in), in a multiple of the blocksize (``reference.check_requant``); a row
    block of a larger tensor takes ``scale`` for its blocks when double quantized
    (``reference.requant_tables``). Other arguments as ``merge_triton``."""
    out, Bcat, Acat, R_pad, block_r = _prepare(W, Bs, As, coeffs, out, None, config)
    tables = requant_tables(W, spec, scale)
    if W.numel() == 0:
        return out
    _launch(W, Bcat, Acat, R_pad, out, STORE, None, config, block_r, quant=(*tables, spec.blocksize))
    return out


def requant_merge(W: "torch.Tensor", Bs: Sequence["torch.Tensor"], As: Sequence["torch.Tensor"],
                  coeffs: Sequence[float], spec, scale: "torch.Tensor | None" = None,
                  out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """round(dequant(quant(W)) + Σ cᵢ Bᵢ @ Aᵢ), dispatched like ``merge``: the Triton kernel on
    CUDA, ``reference.requant_merge_reference`` (torch) elsewhere."""
    if _use_triton(W):
        return requant_merge_triton(W, Bs, As, coeffs, spec, scale, out=out)
    result = requant_merge_reference(W, Bs, As, coeffs, spec, scale,
                                     out_dtype=out.dtype if out is not None else None)
    return result if out is None else out.copy_(result)


def _use_triton(W) -> bool:
    return W.is_cuda and triton_available()


def merge(W: "torch.Tensor", Bs: Sequence["torch.Tensor"], As: Sequence["torch.Tensor"],
          coeffs: Sequence[float], out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """W + Σ cᵢ Bᵢ @ Aᵢ, rounded once to out's dtype (W's when out is None): the Triton kernel for
    CUDA tensors when triton imports, the torch reference otherwise. out=W merges in place."""
    if _use_triton(W):
        return merge_triton(W, Bs, As, coeffs, out=out)
    result = merge_reference(W, Bs, As, coeffs, out_dtype=out.dtype if out is not None else None)
    return result if out is None else out.copy_(result)


def dora_merge(W: "torch.Tensor", Bs: Sequence["torch.Tensor"], As: Sequence["torch.Tensor"],
               coeffs: Sequence[float], magnitude: "torch.Tensor",
               out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The DoRA merge (see reference.py for the formula and PEFT's dtype handling), dispatched like
    ``merge``."""
    if _use_triton(W):
        return dora_merge_triton(W, Bs, As, coeffs, magnitude, out=out)
    result = dora_merge_reference(W, Bs, As, coeffs, magnitude,
                                  out_dtype=out.dtype if out is not None else None)
    return result if out is None else out.copy_(result)
