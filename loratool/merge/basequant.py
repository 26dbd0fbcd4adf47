"""The base as the adapter saw it: a transform of each row block of a base tensor before the
deltas are added (issue 16).

* ``Requantize`` (``merge --base-precision nf4|fp4[,blocksize=N][,double-quant]`` over a 16-bit
  base): the rows become bitsandbytes' dequant(quant(W)) (``loratool.quant.bnb``), bit for bit,
  so that the merge writes round(dequant(quant(W)) + ΔW), the weight a QLoRA adapter was trained
  against plus the adapter. Row blocks hold whole quantization blocks (``rows_quantum``); with
  double quantization the nested absmax needs the whole tensor's absmax vector, computed first
  (``prepare``: one read of the tensor, a float32 per block kept). It also measures, per tensor,
  ‖W‖ and ‖W − dequant(quant(W))‖ (the report: ``QuantTerm``).
* ``Dequantize`` (a base whose weights are stored in 4 bits, ``loratool.quant.stored``): the
  packed rows become the 16-bit rows bitsandbytes' ``dequantize_4bit`` gives.

The executor applies ``prepare(t)`` to each block's bytes before the engine sees them; numpy's
and torch's engines are unchanged.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from loratool.quant import bnb
from loratool.quant.stored import QuantizedRef
from loratool.safetensors_io import TensorRef

RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass
class QuantTerm:
    """‖W‖² and ‖W − dequant(quant(W))‖² of one tensor, summed over its blocks (float64)."""

    w_sq: float = 0.0
    q_sq: float = 0.0


class BaseTransform:
    """What the executor asks of a transform: row blocks whole in quantization blocks, and the
    function that maps a block's base bytes to the bytes the engine computes with."""

    name = "transform"
    blocksize = 1

    def rows_quantum(self, cols: int) -> int:
        """Row blocks are multiples of this many rows (cols · rows a multiple of the blocksize)."""
        return self.blocksize // math.gcd(max(1, cols), self.blocksize)

    def prepare(self, t) -> Callable:
        raise NotImplementedError


class Requantize(BaseTransform):
    """dequant(quant(W)) of a 16-bit base tensor, as bitsandbytes computes it."""

    def __init__(self, spec: bnb.QuantSpec):
        self.spec = spec
        self.blocksize = spec.blocksize
        self.name = str(spec)
        self.terms: dict[str, QuantTerm] = {}
        self._lock = threading.Lock()

    def prepare(self, t) -> Callable:
        dtype, shape = t.src.dtype, tuple(t.shape)
        rows = shape[0] if shape else 1
        cols = t.numel // max(1, rows)
        bs = self.blocksize
        scale = absmax = None
        if self.spec.double_quant:  # the nested absmax: the whole tensor's absmax vector first
            x = bnb.from_dtype_bits(np.frombuffer(t.src.raw(), RAW[dtype]), dtype)
            absmax = bnb.absmax_4bit(x, bs)
            scale = bnb.quantize_absmax(absmax).dequantize()
            del x
        term = self.terms.setdefault(t.name, QuantTerm())

        def apply(buf, n: int, i: int, j: int):
            raw = np.frombuffer(buf, RAW[dtype], count=n // RAW[dtype].itemsize)
            b0, b1 = i * cols // bs, -(-(j * cols) // bs)
            out = bnb.roundtrip(raw, dtype, self.spec, scale=None if scale is None else scale[b0:b1],
                                absmax=None if absmax is None else absmax[b0:b1], shape=shape)
            w = bnb.from_dtype_bits(raw, dtype).astype(np.float64)
            q = w - bnb.from_dtype_bits(out, dtype)
            w_sq, q_sq = float(np.dot(w, w)), float(np.dot(q, q))
            with self._lock:
                term.w_sq += w_sq
                term.q_sq += q_sq
            return out, out.nbytes

        return apply


class Dequantize(BaseTransform):
    """The 16-bit rows of a 4-bit weight stored by bitsandbytes (``QuantizedRef``)."""

    name = "stored"

    def __init__(self, ref: QuantizedRef):
        self.ref = ref
        self.blocksize = ref.spec.blocksize

    def rows_quantum(self, cols: int) -> int:
        return max(super().rows_quantum(cols), 2 // math.gcd(max(1, cols), 2))  # whole bytes too

    def prepare(self, t) -> Callable:
        ref = self.ref
        scale = ref.scale()
        rows = t.shape[0] if t.shape else 1
        cols = t.numel // max(1, rows)

        def apply(buf, n: int, i: int, j: int):
            count = (j - i) * cols
            packed = buf if n >= (count + 1) // 2 else None  # odd columns: read the bytes whole
            out = ref.dequantized(packed, first=i * cols, count=count, scale=scale)
            return out, out.nbytes

        return apply


def transformed(rows: Callable, apply: Callable) -> Callable:
    """An engine's block function ``rows(buf, n, i, j)`` on the transformed bytes."""

    def block(buf, n: int, i: int, j: int):
        out, m = apply(buf, n, i, j)
        return rows(out, m, i, j)

    return block


# -- the report -----------------------------------------------------------------------------------

def delta_norm(t) -> float:
    """‖Σ coef·ΔW‖_F of the terms of ``t``: from the low-rank factors (numpy) for LoRA modules,
    ‖B A‖² = Σ (BᵀB) ⊙ (A Aᵀ) over the stacked factors; from the dense delta for other kinds."""
    bs, as_ = [], []
    for term in t.terms:
        m = term.module
        if term.part != "weight" or m.module_kind != "lora":
            return _dense_norm(t)
        rows, cols = t.shape
        rank = m.lora_A.shape[0]
        b, a = _factor(m.lora_B, (rows, rank)), _factor(m.lora_A, (rank, cols))
        if b is None or a is None:
            return _dense_norm(t)
        bs.append(b.astype(np.float64) * term.coef)
        as_.append(a.astype(np.float64))
    b, a = np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)
    return math.sqrt(max(0.0, float(np.sum((b.T @ b) * (a @ a.T)))))


def _factor(src, shape: tuple[int, ...]) -> np.ndarray | None:
    """A LoRA factor in a file as float32 (exact), or None (not a float tensor in a file)."""
    if not isinstance(src, TensorRef) or src.dtype not in RAW:
        return None
    return bnb.from_dtype_bits(np.frombuffer(src.raw(), RAW[src.dtype]), src.dtype).reshape(shape)


def _dense_norm(t) -> float:
    import torch

    total = None
    for term in t.terms:
        d = term.module.delta(torch.float64) * math.copysign(abs(term.weight), term.coef)
        total = d if total is None else total + d
    return float(torch.linalg.vector_norm(total)) if total is not None else 0.0


def report(plan) -> list[dict]:
    """Per merged tensor the base precision changed: ‖W‖, ‖q‖ = ‖W − dequant(quant(W))‖, ‖ΔW‖,
    ‖q‖/‖ΔW‖ and the relative change of the merged weight ‖q‖/‖W‖ (the choice moves every merged
    value by −q, up to the output's rounding); ``warn`` where q outweighs the adapter's delta."""
    rq = plan.requantize
    if rq is None:
        return []
    rows = []
    for t in plan.tensors():
        term = rq.terms.get(t.name)
        if t.transform is not rq or term is None:
            continue
        w, q, d = math.sqrt(term.w_sq), math.sqrt(term.q_sq), delta_norm(t)
        rows.append({"name": t.name, "numel": t.numel, "base_norm": w, "quant_norm": q, "delta_norm": d,
                     "quant_over_delta": q / d if d else None, "relative_change": q / w if w else 0.0,
                     "warn": q > d})
    return rows
