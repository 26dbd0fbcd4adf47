"""The torch engines: the merged value of a tensor, one row block at a time, on the CPU (PEFT's
arithmetic) or CUDA (Triton); the row blocks themselves; and which device runs them.

    W' = round(W + Σᵢ wᵢ · sᵢ · ΔWᵢ)     ΔWᵢ = Bᵢ @ Aᵢ in the base weight's layout, sᵢ = PEFT's scale

accumulated in float32 and rounded once to the output dtype.

Bit-exactness with PEFT (one adapter, weight 1.0, on the CPU). PEFT 0.21's ``Linear.merge``
(peft/tuners/lora/layer.py, ``safe_merge=False``, which ``merge_and_unload`` uses) computes
``get_delta_weight`` = ``(B @ A) * scaling`` in float32 (``PeftModel.from_pretrained`` upcasts
bf16/fp16 factors to float32, ``autocast_adapter_dtype=True``; with half-precision factors on the
CPU it upcasts for the matmul too) and adds it in place to the bf16 weight: the add runs in float32
and rounds once. We do the same arithmetic in row blocks that stay in cache: ``mm`` of a block of
B's rows with A, ``mul_`` by the scale, ``add_`` into a float32 copy of the same rows of W, one
rounding. Two details keep the bits equal to PEFT's whole-matrix product:

* ``addmm_(B, A, alpha=s)`` (one pass instead of three) only when s is a power of two: MKL fuses
  alpha·(BA) + W into one FMA rounding, which equals PEFT's ``(B@A) * s`` then ``+ W`` when the
  product by s is exact, and differs otherwise. Merges that have no PEFT bits to match (several
  adapters, a weight ≠ 1, unmerge) always take ``addmm_``: it rounds less;
* row spans are multiples of 64 rows with the remainder folded into the last span (a separate
  block of a few tail rows takes another MKL kernel whose summation order differs from the tail
  of the whole product).

Conv1D (GPT-2, ``fan_in_fan_out``) and Embedding deltas are ``(B @ A).T``: row blocks of W are
``(B @ A[:, rows]).T``, the same bits by the same argument. Conv2d is computed whole, as PEFT does
(``conv2d(A.transpose(0, 1), B)`` for k×k kernels). PEFT's ``Embedding.merge`` rounds the delta to
the weight's dtype before adding it (a second rounding); we round once, so embeddings are within
1 ulp of PEFT and closer to the exact value. DoRA (peft/tuners/lora/variants.py,
``DoraLinearVariant.merge_unsafe``): W' = m / ‖W + ΔW‖ · (W + ΔW) with the norm per output row
(per column for Conv1D and Embedding, over the (in, kh, kw) dims for Conv2d), all in float32.

On CUDA the Triton kernel of ``loratool.kernels.merge`` does the linear cases (float32
accumulation, one rounding; not bit-equal to PEFT's CPU merge, which is a CPU promise).

A plain merge on the CPU (one adapter at weight ±1 on Linear weights) does not come here:
``loratool.merge.numpy_engine`` repeats the same float32 sequence in numpy, without importing
torch (``executor._numpy_plan`` decides).

The executor sees every engine through one row-block interface, ``BlockEngine``: ``TorchEngine``
here (CPU and CUDA), ``numpy_engine.NumpyEngine`` there.
"""

from __future__ import annotations

import math
import re
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Protocol

from loratool.adapter import LayerKind, load_tensor
from loratool.kinds import dora, layout
from loratool.errors import UsageError
from loratool.merge.overflow import _check_block
from loratool.merge.plan import Action, TensorPlan, Term
from loratool.safetensors_io import DTYPES, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

ROW_ALIGN = 64  # row spans are multiples of this (see the module docstring)
BLOCK_BYTES = 2 << 20  # float32 bytes of one row block: stays in L2 with its delta
GPU_BLOCK_BYTES = 256 << 20  # a block for the Triton kernel: large enough to fill the GPU
CAST_BLOCK_BYTES = 8 << 20  # source bytes of one block of a dtype conversion


# -- row blocks ---------------------------------------------------------------------------------

def row_spans(rows: int, block: int) -> list[tuple[int, int]]:
    """[0, rows) in spans of ``block`` rows, the remainder folded into the last span."""
    if rows <= block:
        return [(0, rows)]
    spans = []
    i = 0
    while i < rows:
        j = i + block
        if rows - j < block:
            j = rows
        spans.append((i, j))
        i = j
    return spans


def block_rows(cols: int, itemsize: int = 4, target: int = BLOCK_BYTES) -> int:
    """Rows per block: about ``target`` bytes, a multiple of ROW_ALIGN, at least ROW_ALIGN."""
    rows = target // max(1, cols * itemsize)
    return max(ROW_ALIGN, rows // ROW_ALIGN * ROW_ALIGN)


def tensor_spans(t: TensorPlan, device: str = "cpu", block_bytes: int | None = None) -> list[tuple[int, int]]:
    """Row spans in which ``t`` is read, computed and written (``block_bytes``: the float32 size
    of a block, BLOCK_BYTES by default; tests make it small to get many blocks from tiny models)."""
    shape = t.shape
    rows = shape[0] if shape else 1
    cols = t.numel // max(1, rows)
    if t.action is Action.CAST:
        return row_spans(rows, _quantized(t, cols, max(1, CAST_BLOCK_BYTES // max(1, cols * DTYPES[t.src.dtype][0]))))
    if t.action is not Action.MERGE or len(shape) < 2:
        return [(0, rows)]
    if not layout.row_blocked(t.kind, t.dora):
        return [(0, rows)]  # computed whole, as PEFT does (DoRA's norm spans the columns here)
    target = block_bytes or (BLOCK_BYTES if device == "cpu" else GPU_BLOCK_BYTES)
    block = _quantized(t, cols, block_rows(cols, target=target))
    for term in t.terms:  # a kind whose rows mix (OFT's blocks of R): spans start at its multiples
        q = term.module.row_quantum() if term.module.needs_base else 1
        if q > 1 and block % q:
            unit = block * q // math.gcd(block, q)
            block = unit if unit < rows else rows
    return row_spans(rows, block)


def _quantized(t: TensorPlan, cols: int, block: int) -> int:
    """``block`` rows, made a multiple of the rows that hold whole quantization blocks when the
    base rows are transformed (``basequant``: bitsandbytes' blocks run over the flattened tensor)."""
    if t.transform is None:
        return block
    q = t.transform.rows_quantum(cols)
    unit = q if block % ROW_ALIGN else q * ROW_ALIGN // math.gcd(q, ROW_ALIGN)
    return max(unit, block // unit * unit)


# -- the arithmetic -----------------------------------------------------------------------------

class TensorMath:
    """The merged value of one base tensor, one row span at a time.

    ``dtype`` float32 gives the executor's arithmetic (PEFT's, see the module docstring); float64
    gives parity's reference (same formula, exact products and sums up to float64 rounding). A
    term with ``rows`` (q, k or v of a fused base tensor) adds into those rows only; the executor
    gives this class such a tensor's pieces instead (``TensorPlan.pieces``), parity the whole.
    """

    def __init__(self, t: TensorPlan, dtype: "torch.dtype", device: str = "cpu", reuse: bool = False):
        self.t = t
        self.dtype = dtype
        self.device = device
        # reuse: ``rows`` returns the same buffer every time (the caller copies it out before the
        # next call): no fresh pages to fault in for every block
        self.reuse = reuse
        self._acc: "torch.Tensor | None" = None
        self.factors: list[tuple[Term, Any, Any]] = []
        for term in t.terms:
            m = term.module
            if term.part == "bias":
                self.factors.append((term, load_tensor(m.lora_B_bias).to(device, dtype), None))
                continue
            lr = m.low_rank(dtype)  # the kind's low-rank form (None: its delta is computed whole)
            if lr is None:
                self.factors.append((term, None, None))
            elif not layout.row_blocked(m.kind):  # Conv2d: PEFT's conv of the 4-D factors
                self.factors.append((term, m.B().to(device, dtype), m.A().to(device, dtype)))
            else:
                self.factors.append((term, lr.B2.to(device), lr.A2.to(device)))
        # One adapter at weight ±1 (a plain merge, or PEFT's unmerge: W - (B@A)·s): PEFT's bits are
        # the promise, see ``_fused``
        self.peft_exact = len(t.terms) == 1 and abs(t.terms[0].coef) == t.terms[0].module.scale
        self.magnitude = None
        if t.dora:
            self.magnitude = load_tensor(t.terms[0].module.magnitude).to(device, dtype).reshape(-1)
        self._tmp: "torch.Tensor | None" = None

    @staticmethod
    def _overlap(term: Term, i: int, j: int) -> tuple[int, int, int, int] | None:
        """Where rows [i, j) of the base tensor meet the rows ``term`` adds into (``Term.rows``):
        (start, end) in the block and (start, end) in the term's own rows; None if nowhere."""
        if term.rows is None:
            return 0, j - i, i, j
        lo, hi = term.rows
        a, b = max(i, lo), min(j, hi)
        return (a - i, b - i, a - lo, b - lo) if a < b else None

    def _padded(self, term: Term, i: int, j: int, rows: Callable) -> "torch.Tensor":
        """``rows(mi, mj)`` (the term's own rows [mi, mj), in its layout) placed into rows [i, j) of
        the base tensor: zeros where the term adds nothing."""
        import torch

        where = self._overlap(term, i, j)
        if where == (0, j - i, i, j):
            return rows(i, j)
        out = torch.zeros((j - i,) + tuple(self.t.shape[1:]), dtype=self.dtype, device=self.device)
        if where is not None:
            out[where[0]:where[1]] = rows(where[2], where[3])
        return out

    def delta(self, term: Term, b, a, i: int, j: int) -> "torch.Tensor":
        """coef · ΔW for rows [i, j) of the base tensor, in its layout."""
        return self._padded(term, i, j, lambda mi, mj: self._delta(term, b, a, mi, mj))

    def _delta(self, term: Term, b, a, i: int, j: int) -> "torch.Tensor":
        """coef · ΔW for rows [i, j) of the term's own delta."""
        import torch
        import torch.nn.functional as F

        kind = term.module.kind
        if term.part == "bias":
            return (b * term.coef)[i:j]
        if b is None:  # a kind without a low-rank form: its own delta (scaled), rows [i, j), times ±weight
            return term.module.delta_rows(i, j, self.dtype).to(self.device).mul_(
                math.copysign(abs(term.weight), term.coef))
        if layout.row_blocked(kind):
            out = None
            if kind is LayerKind.LINEAR:  # a reused buffer: no fresh pages for every block
                n = j - i
                if self._tmp is None or self._tmp.numel() < n * a.shape[1]:
                    self._tmp = torch.empty(n * a.shape[1], dtype=self.dtype, device=self.device)
                out = self._tmp[: n * a.shape[1]].view(n, a.shape[1])
            return layout.block_delta(kind, b, a, i, j, out=out).mul_(term.coef)
        # Conv2d, whole, as PEFT's Conv2d.get_delta_weight computes it
        shape = self.t.shape
        if tuple(shape[2:4]) == (1, 1):
            d = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            d = F.conv2d(a.transpose(0, 1), b).transpose(0, 1)
        return (d * term.coef)[i:j]

    def values(self, w: "torch.Tensor", i: int, j: int) -> "torch.Tensor":
        """V = W + Σ coef·ΔW for rows [i, j), from the base rows ``w``; not rounded."""
        import torch

        if self.reuse:
            n = w.numel()
            if self._acc is None or self._acc.numel() < n:
                self._acc = torch.empty(n, dtype=self.dtype, device=self.device)
            acc = self._acc[:n].view(w.shape)
            acc.copy_(w)
        else:
            acc = w.to(self.device, self.dtype, copy=True)
        for term, b, a in self.factors:
            where = self._overlap(term, i, j)  # a term that adds into some rows of the tensor only
            if where is None:
                continue
            r0, r1, mi, mj = where
            into, wr = (acc, w) if (r0, r1) == (0, j - i) else (acc[r0:r1], w[r0:r1])
            if term.part == "weight" and term.module.needs_base:  # ΔW from the base rows (OFT, IA3, GLoRA)
                into.add_(self._base_delta(term, wr, mi, mj))
            elif not self._fused(term, b):
                into.add_(self._delta(term, b, a, mi, mj))
            else:  # one addmm: rows [i, j) of the delta are left @ right
                into.addmm_(*layout.block_factors(term.module.kind, b, a, mi, mj), alpha=term.coef)
        return acc

    def base_delta(self, term: Term, w: "torch.Tensor", i: int, j: int) -> "torch.Tensor":
        """±weight · ΔW for rows [i, j) of a kind whose delta depends on the base (``needs_base``),
        from the base rows ``w`` (as the block holds them: the original base, or its transform)."""
        where = self._overlap(term, i, j)
        return self._padded(term, i, j, lambda mi, mj: self._base_delta(
            term, w if where is None or where[:2] == (0, j - i) else w[where[0]:where[1]], mi, mj))

    def _base_delta(self, term: Term, w: "torch.Tensor", i: int, j: int) -> "torch.Tensor":
        import torch

        w64 = w.detach().to("cpu", torch.float64).numpy()
        d = torch.from_numpy(term.module.delta_from_base(w64, i, j))
        return d.to(self.device, self.dtype).mul_(math.copysign(abs(term.weight), term.coef))

    def _fused(self, term: Term, b) -> bool:
        """Whether ``addmm_(…, alpha=coef)`` may replace mm, mul_ and add_ (one pass, one FMA
        rounding per product instead of two roundings: at least as accurate).

        For PEFT's bits (``peft_exact``) only when coef = 2^k, a Linear, and r ≤ 128: then
        coef·(B@A) is exact and MKL's fused alpha·(B@A) + V rounds like PEFT's (B@A)·s, + W."""
        import torch

        if self.dtype != torch.float32 or self.device != "cpu" or term.part != "weight" or b is None:
            return False
        if not layout.row_blocked(term.module.kind):
            return False
        if not self.peft_exact:
            return True
        return (term.module.kind is LayerKind.LINEAR and b.shape[1] <= 128 and term.coef != 0
                and abs(math.frexp(term.coef)[0]) == 0.5)

    def dora_factor(self, v: "torch.Tensor", i: int, j: int) -> "torch.Tensor":
        """m / ‖V‖, shaped to broadcast over V's rows [i, j) (the DoRA kind's rescaling)."""
        return dora.rescale(self.t.kind, self.magnitude, v, i, j)

    def rows(self, w: "torch.Tensor", i: int, j: int) -> "torch.Tensor":
        """The merged rows [i, j) (in ``self.dtype``, not rounded) from the base rows ``w``."""
        acc = self.values(w, i, j)
        if self.magnitude is not None:
            acc.mul_(self.dora_factor(acc, i, j))
        return acc


class _CudaMath(TensorMath):
    """The linear kinds through the Triton kernel (whole tensors on the GPU); the rest in torch.
    With ``requant`` (``_GpuRequant``) the kernel's QUANT prologue computes the base rows as a
    QLoRA adapter saw them (``merge --base-precision``), which the executor then leaves to it."""

    requant: "_GpuRequant | None" = None

    def kernel_path(self) -> bool:
        """Whether ``rows`` takes the Triton kernel (else torch's ``TensorMath``)."""
        return layout.row_blocked(self.t.kind, self.t.dora) and not any(
            term.part == "bias" or b is None or term.rows is not None for term, b, _ in self.factors)

    def rows(self, w, i, j):
        import torch

        from loratool.kernels import merge as kernels

        if not self.kernel_path():
            return super().rows(w, i, j)
        kind = self.t.kind
        w = w.to(self.device)
        pairs = [layout.block_factors(kind, b, a, i, j) for _, b, a in self.factors]  # rows = left @ right
        bs, as_ = [left for left, _ in pairs], [right for _, right in pairs]
        coeffs = [term.coef for term, _, _ in self.factors]
        # rounded once, by the kernel, to the output dtype (the executor's cast is then a no-op)
        out = torch.empty(w.shape, dtype=torch_dtype(self.t.dtype), device=self.device)
        if self.requant is not None:
            return self.requant.merge(w, bs, as_, coeffs, i, j, out)
        if self.magnitude is not None:
            return kernels.dora_merge(w, bs, as_, coeffs, self.magnitude[i:j], out=out)
        return kernels.merge(w, bs, as_, coeffs, out=out)


class _GpuRequant:
    """``basequant.Requantize`` of one tensor on the GPU: the merge kernel's QUANT prologue, and
    the report's ‖W‖², ‖W − dequant(quant(W))‖² of each row block (float64 sums, added into the
    transform's ``QuantTerm`` of the tensor). With double quantization the blocks' scale comes from
    the whole tensor's absmax (``basequant.streamed_absmax``, read from the base file first, as
    the CPU path does)."""

    def __init__(self, transform, t: TensorPlan, device: str):
        import torch

        from loratool.merge import basequant
        from loratool.quant import bnb

        self.transform, self.name, self.spec = transform, t.name, transform.spec
        transform.add_term(t.name, 0.0, 0.0)  # listed in the report even with no rows
        self.per_row = t.numel // t.shape[0] // self.spec.blocksize  # blocks per row
        self.scale = None
        if self.spec.double_quant:
            absmax = basequant.streamed_absmax(t.src, self.spec.blocksize)
            self.scale = torch.from_numpy(bnb.quantize_absmax(absmax).dequantize()).to(device)

    def merge(self, w, bs, as_, coeffs, i: int, j: int, out):
        import torch

        from loratool.kernels import merge as kernels

        scale = None if self.scale is None else self.scale[i * self.per_row: j * self.per_row]
        kernels.requant_merge(w, bs, as_, coeffs, self.spec, scale, out=out)
        # the round trip alone: the base the overflow guard compares the block with (as the CPU
        # path's), and the report's sums (float32 dot products, as the CPU path's chunks: q is
        # exact in float32)
        self.deq = kernels.requant_merge(w, [], [], [], self.spec, scale)
        w32 = w.reshape(-1).float()
        q = w32 - self.deq.reshape(-1).float()
        self.transform.add_term(self.name, float(torch.dot(w32, w32)), float(torch.dot(q, q)))
        return out


def gpu_dequant(t: TensorPlan) -> bool:
    """Whether ``t``'s base rows are a weight stored in 4 bits by bitsandbytes
    (``basequant.Dequantize``), which the dequantization kernel reads on CUDA."""
    from loratool.merge.basequant import Dequantize

    return isinstance(t.transform, Dequantize) and t.action in (Action.MERGE, Action.CAST)


def _gpu_dequantize(t: TensorPlan, device: str) -> Callable:
    """``basequant.Dequantize.prepare`` on the GPU: ``apply(buf, n, i, j)`` -> (rows [i, j) as a
    tensor on ``device``, their bytes), from the packed bytes of those rows (``buf``, which the
    executor's row blocks hold whole: ``Dequantize.rows_quantum``), by ``loratool.kernels.dequant4``
    (the Triton kernel; its torch reference where triton does not import)."""
    import numpy as np
    import torch

    from loratool.kernels import dequant4
    from loratool.kernels.merge import triton_available

    ref = t.transform.ref
    spec, shape = ref.spec, tuple(t.shape)
    cols = t.numel // max(1, shape[0] if shape else 1)
    scale = torch.from_numpy(np.ascontiguousarray(ref.scale(), np.float32)).to(device)
    zero_fix = bool(shape) and shape[-1] % 2 == 1 and spec.quant_type == "fp4"
    fn = dequant4.dequantize_4bit_triton if triton_available() else dequant4.dequantize_4bit_reference
    dtype = torch_dtype(ref.dtype)

    def apply(buf, n: int, i: int, j: int):
        first, count = i * cols, (j - i) * cols
        nbytes = (count + 1) // 2
        if n < nbytes:  # odd columns: the reader's bytes stop short, read them whole
            buf = ref.packed.raw()[first // 2: first // 2 + nbytes]
        packed = torch.frombuffer(bytearray(buf[:nbytes]) if isinstance(buf, bytes) else buf, dtype=torch.uint8,
                                  count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
        out = fn(packed.to(device), scale, count, dtype, spec, first=first, zero_fix=zero_fix)
        return out.reshape((j - i,) + shape[1:]), out.numel() * out.element_size()

    return apply


def gpu_requant(t: TensorPlan) -> bool:
    """Whether the merge kernel's QUANT prologue can take ``t``'s ``--base-precision`` round trip:
    a ``basequant.Requantize`` transform of a merged 2-D bf16/fp16/fp32 base weight whose rows are
    whole quantization blocks. ``TorchEngine.tensor`` asks this and whether the kernel merges the
    tensor at all (``_CudaMath.kernel_path``)."""
    from loratool.merge.basequant import Requantize

    return (isinstance(t.transform, Requantize) and t.action is Action.MERGE and len(t.shape) == 2
            and t.shape[1] % t.transform.spec.blocksize == 0 and t.src.dtype in ("BF16", "F16", "F32"))


# -- where the math runs ------------------------------------------------------------------------

def _cpu_only_torch() -> bool:
    """Whether torch can only run on the CPU here: a CPU-only build (read from its ``version.py``)
    or no GPU device on the machine, found without importing torch (a second or more; see
    ``loratool.merge.numpy_engine``)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return False
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text(encoding="utf-8")
    except (OSError, ValueError, ImportError):
        return False
    none = {m.group(1) for m in re.finditer(r"^(cuda|hip)\b[^=\n]*=\s*None\s*$", text, re.M)}
    if none == {"cuda", "hip"}:
        return True
    # a GPU build on a machine without a GPU device node (Linux): torch would find no device
    dev = Path("/dev")
    return sys.platform.startswith("linux") and dev.is_dir() and not (
        any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists() or (dev / "dxg").exists())


ENGINES = ("auto", "numpy", "torch")


def check_engine(engine: str) -> None:
    """``engine`` is one of ``ENGINES``: ``auto`` (numpy for plain merges on the CPU, torch
    elsewhere), ``numpy`` or ``torch``."""
    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r}: unknown merge engine; choose {', '.join(ENGINES)}")


def resolve_device(device: str | None, probe: bool = False) -> str | None:
    """"cpu" or "cuda" for --device auto|cpu|cuda. ``probe``: None where knowing would take
    importing torch (a CUDA build with --device auto)."""
    device = (device or "auto").lower()
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device: unknown device {device!r}; choose auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and _cpu_only_torch()):
        return "cpu"
    if probe:
        return None
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    return device


# -- the row-block interface of the torch engines -----------------------------------------------

def _cpu_dtype(t: TensorPlan, device: str):
    """The accumulation dtype of one merged tensor. One adapter at weight 1 on the CPU: float32,
    PEFT's arithmetic, for PEFT's bits. Anything else (weights, several adapters, unmerge) has no
    PEFT result to match, and float32 is exact only to the size of the terms where W and ΔW
    cancel: float64 then, so that every element is the exact value rounded once (to within the
    one-ulp slack of torch's float64 → float32 → bf16 conversion). Unmerging one adapter at weight
    1 repeats the merge's float32 arithmetic, which lands back on the base's bits most often."""
    import torch

    if device != "cpu" or t.dora:
        return torch.float32
    # ±1 · scale: a plain merge, or the unmerge of one (which must repeat the merge's float32
    # arithmetic to land back on the base's bits)
    plain = len(t.terms) == 1 and abs(t.terms[0].coef) == t.terms[0].module.scale
    return torch.float32 if plain else torch.float64


def _compute_block(t: TensorPlan, math_: TensorMath | None, buf, n: int, i: int, j: int):
    """Rows [i, j) of ``t`` from the first ``n`` bytes of ``buf`` (its base rows), in torch; the
    output's bytes, as a numpy array."""
    import torch

    dt = torch_dtype(t.src.dtype)
    if isinstance(buf, torch.Tensor):  # rows a transform computed on the GPU (``_gpu_dequantize``)
        w = buf
    else:
        w = torch.frombuffer(buf, dtype=dt, count=n // dt.itemsize) if n else torch.empty(0, dtype=dt)
    w = w.reshape((j - i,) + t.shape[1:] if t.shape else ())
    out = torch_dtype(t.dtype)
    if t.action is Action.CAST:
        block = torch.empty(w.shape, dtype=out).copy_(w)  # on the CPU, for the writer
    else:
        acc = math_.rows(w, i, j)
        # a fresh tensor for the writer (on the CPU): acc is reused for the next block
        block = torch.empty(acc.shape, dtype=out).copy_(acc)
        if getattr(math_, "requant", None) is not None:  # the base the deltas were added to
            w = math_.requant.deq
    _check_block(t, w, block, i)
    return block.reshape(-1).view(torch.uint8).numpy()


class BlockEngine(Protocol):
    """What the executor asks of an engine: the output's bytes of one row block at a time."""

    device: str  # where the math runs: "cpu" or "cuda"
    mapped: bool  # takes read-only mapped base rows (else they are read into writable buffers)
    workers: int  # threads computing blocks at once; 0: the executor's own thread, one by one

    def running(self) -> ContextManager[None]:
        """A context around the whole stream (the math's thread settings)."""

    def tensor(self, t: TensorPlan) -> Callable[[Any, int, int, int], Any]:
        """The function ``(buf, n, i, j) -> block`` of ``t``'s row blocks: the output's bytes of
        rows [i, j) (a numpy array) from the first ``n`` bytes of ``buf``, the base rows."""

    def recycle(self, block) -> None:
        """The writer copied ``block`` out: its array may be reused."""

    def takes_transform(self, t: TensorPlan) -> bool:
        """Whether the engine applies ``t.transform`` to the base rows itself (else the executor
        does, before the engine sees them)."""


class TorchEngine:
    """torch's engines behind the executor's row-block interface (``BlockEngine``): ``TensorMath``
    on the CPU, ``_CudaMath`` (Triton) on CUDA, and dtype conversions. Base rows are read into
    writable buffers (``torch.frombuffer`` wants them); the blocks run on the executor's thread,
    with torch on one thread: the reader and the writer need the other cores, and torch's OpenMP
    workers spin between the many small calls and take the cores the I/O threads need."""

    mapped = False
    workers = 0

    def __init__(self, device: str, math_device: str | None = None):
        self.device = device
        # where the tensors go: the device, but for tests, which run the CUDA path's Triton kernel
        # in its interpreter on CPU tensors
        self.math_device = math_device or device
        self._took: set[int] = set()  # the tensors whose transform ``tensor`` took on itself

    @contextmanager
    def running(self) -> Iterator[None]:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                yield
        finally:
            torch.set_num_threads(threads)

    def takes_transform(self, t: TensorPlan) -> bool:
        """Whether ``tensor(t)``, asked first, took ``t.transform`` on itself, on CUDA:
        ``--base-precision`` in the merge kernel (``gpu_requant``, where the kernel merges the
        tensor), a weight stored in 4 bits by the dequantization kernel (``gpu_dequant``); else the
        executor applies it to the base rows before the engine sees them."""
        return id(t) in self._took

    def tensor(self, t: TensorPlan) -> Callable:
        math_ = None
        self._took.discard(id(t))
        if t.action is Action.MERGE:
            math_ = (_CudaMath if self.device == "cuda" else TensorMath)(
                t, _cpu_dtype(t, self.device), self.math_device, reuse=True)
            if self.device == "cuda" and gpu_requant(t) and math_.kernel_path():
                math_.requant = _GpuRequant(t.transform, t, self.math_device)
                self._took.add(id(t))
        rows = partial(_compute_block, t, math_)
        if self.device == "cuda" and gpu_dequant(t):
            from loratool.merge.basequant import transformed

            rows = transformed(rows, _gpu_dequantize(t, self.math_device))
            self._took.add(id(t))
        return rows

    def recycle(self, block) -> None:
        """Nothing to reuse: ``_compute_block`` returns a fresh array (a writer may queue it)."""
