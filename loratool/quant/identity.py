"""Base identity for quantized derivatives: is a 4-bit base bitsandbytes' quantization of a 16-bit
base, bit for bit? (issue 16, item 4)

``verify_derived(source, quantized)`` takes two ``BaseCheckpoint``\\ s: a 16-bit base and one whose
weights transformers saved in 4 bits (``loratool.quant.stored``). It checks the structure first
(headers and quant states only: the same tensor names; each 4-bit weight's quant state says the
16-bit tensor's shape and dtype; every other tensor has the same dtype and shape), then the
content, tensor by tensor, in the order they lie in the files:

* a tensor kept in 16 bits must hold the same bytes;
* a 4-bit weight must hold exactly what ``bitsandbytes.functional.quantize_4bit`` makes of the
  16-bit tensor with the quant type and blocksize its quant state records (``loratool.quant.bnb``):
  the absmax of each block (float32), or with double quantization the 8-bit absmax, its nested
  absmax and code and the offset; and the packed 4-bit codes.

Memory stays flat: the 16-bit tensor and the packed codes are read a few MB at a time (whole
blocks), and only a float32 per block (the absmax) is kept. It stops at the first difference and
names it (``Derivation.mismatch``: one line, with the tensor, the element and both values).

The offset of double quantization is torch's float32 mean of the absmax vector, whose last bit
depends on the machine that summed it (``bnb`` module docstring): it is accepted when it equals the
sum in the order of an AVX2 or AVX-512 machine, or, past the size where torch sums in threads,
when it is within a float32 step of the exact mean; the nested 8-bit values are then checked
against the stored offset.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from loratool import boundary
from loratool.errors import InputError
from loratool.quant import bnb
from loratool.quant.stored import QuantizedRef
from loratool.safetensors_io import TensorRef

if TYPE_CHECKING:  # pragma: no cover
    from loratool.checkpoint import BaseCheckpoint

CHUNK_BYTES = 4 << 20  # bytes of a 16-bit tensor read at a time
RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
THREADED_SUM = 32768  # absmax values past which torch sums the offset in threads (order unknown)
_LIST = 3


@dataclass
class Derivation:
    """What ``verify_derived`` found. ``derived``: every tensor matched. ``specs``: the quant
    config (``QuantSpec`` as text, e.g. ``nf4,blocksize=64,double-quant``) -> the 4-bit weights
    stored with it. ``quantized``/``copied``: the 4-bit weights and the 16-bit tensors that
    matched (in the order checked); ``mismatch``: the first difference (one line), in ``tensor``."""

    derived: bool = False
    specs: dict[str, list[str]] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    mismatch: str | None = None
    tensor: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def spec(self) -> str | None:
        """The one quant config of every 4-bit weight, or None when they differ (or there is none)."""
        return next(iter(self.specs)) if len(self.specs) == 1 else None


class _Differs(Exception):
    def __init__(self, tensor: str, what: str):
        super().__init__(what)
        self.tensor, self.what = tensor, what


def verify_derived(source: "BaseCheckpoint", quantized: "BaseCheckpoint") -> Derivation:
    """Whether ``quantized`` (a checkpoint with bitsandbytes 4-bit weights) is bit for bit the
    quantization of the 16-bit ``source`` (see the module docstring)."""
    result = Derivation()
    if not quantized.quantized:
        result.mismatch = f"{quantized.path} holds no bitsandbytes 4-bit weights"
        return result
    try:
        order = _structure(source, quantized, result)
        for name in order:
            ref4, ref16 = quantized.ref(name), source.ref(name)
            if isinstance(ref4, QuantizedRef):
                _check_quantized(name, ref16, ref4, result)
                result.quantized.append(name)
            else:
                _check_copied(name, ref16, ref4)
                result.copied.append(name)
    except _Differs as d:
        result.tensor = d.tensor
        result.mismatch = f"tensor {d.tensor!r}: {d.what}"
        return result
    result.derived = True
    return result


def _structure(source: "BaseCheckpoint", quantized: "BaseCheckpoint", result: Derivation) -> list[str]:
    """The names to compare, in the order the 4-bit base's files hold them; ``_Differs`` on the
    first difference of names, shapes or dtypes. Fills ``result.specs``."""
    names4, names16 = set(quantized.names()), set(source.names())
    if names4 != names16:
        only4, only16 = sorted(names4 - names16), sorted(names16 - names4)
        first = (only4 or only16)[0]
        parts = ([f"{len(only4)} tensors only in {quantized.path} ({_listed(only4)})"] if only4 else []) + \
                ([f"{len(only16)} only in {source.path} ({_listed(only16)})"] if only16 else [])
        raise _Differs(first, "different tensor names: " + "; ".join(parts))
    for name in quantized.names():
        ref4, ref16 = quantized.ref(name), source.ref(name)
        if tuple(ref4.shape) != tuple(ref16.shape) or ref4.dtype != ref16.dtype:
            held = "its quant state records" if isinstance(ref4, QuantizedRef) else "is"
            raise _Differs(name, f"{held} {ref4.dtype} {list(ref4.shape)} in {quantized.path}, "
                                 f"{ref16.dtype} {list(ref16.shape)} in {source.path}")
        if isinstance(ref4, QuantizedRef):
            if ref16.dtype not in RAW:
                raise _Differs(name, f"{ref16.dtype} in {source.path}; bitsandbytes quantizes BF16, F16 or F32")
            result.specs.setdefault(str(ref4.spec), []).append(name)
    return sorted(quantized.names(), key=lambda n: (str(quantized.ref(n).file.path), quantized.ref(n).info.start))


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_LIST]) + (f", ... ({len(names) - _LIST} more)" if len(names) > _LIST else "")


# -- reading a range of a tensor --------------------------------------------------------------------

class _Reader:
    """Byte ranges of tensors in files (``os.pread`` into one reused buffer per reader)."""

    def __init__(self):
        self.fds: dict[str, int] = {}

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def read(self, ref: TensorRef, first: int, count: int) -> bytes:
        """Bytes [first, first + count) of ``ref``'s data."""
        path = ref.file.path
        key = str(path)
        try:
            if key not in self.fds:
                self.fds[key] = boundary.open_regular(path)
            fd, parts, got = self.fds[key], [], 0
            while got < count:
                chunk = os.pread(fd, count - got, ref.info.start + first + got)
                if not chunk:
                    raise InputError(f"{path}: truncated while reading tensor {ref.info.name!r}")
                parts.append(chunk)
                got += len(chunk)
        except OSError as e:
            raise InputError(f"{path}: cannot read tensor {ref.info.name!r}: {e.strerror or e}") from None
        return b"".join(parts)


def _chunks(numel: int, itemsize: int, quantum: int):
    """[e0, e1) runs of whole ``quantum``-element pieces, about CHUNK_BYTES each."""
    step = max(1, CHUNK_BYTES // (quantum * itemsize)) * quantum
    for e0 in range(0, numel, step):
        yield e0, min(numel, e0 + step)


def _check_copied(name: str, ref16: TensorRef, ref4: TensorRef) -> None:
    item = max(1, ref16.nbytes // max(1, ref16.info.numel))
    with _Reader() as r:
        for e0, e1 in _chunks(ref16.info.numel, item, 1):
            a, b = r.read(ref16, e0 * item, (e1 - e0) * item), r.read(ref4, e0 * item, (e1 - e0) * item)
            if a != b:
                k = e0 + _first(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)) // item
                raise _Differs(name, f"kept in {ref16.dtype} but element {k}{_where(k, ref16.shape)} differs "
                                     f"from the 16-bit base's")


def _where(k: int, shape: tuple[int, ...]) -> str:
    return f" (at {[int(i) for i in np.unravel_index(k, shape)]})" if len(shape) > 1 else ""


# -- a 4-bit weight ---------------------------------------------------------------------------------

def _floats(ref: TensorRef, dtype: str) -> np.ndarray:
    return np.frombuffer(ref.raw(), {"F32": "<f4", "U8": "u1"}[dtype])


def _first(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.flatnonzero(a != b)[0])


def _bits(v) -> str:
    v = np.float32(v)
    return f"{float(v)!r} (0x{int(np.array(v).view(np.uint32)):08x})"


def _check_scale(name: str, ref4: QuantizedRef, absmax: np.ndarray, result: Derivation) -> None:
    """The stored absmax (or its double quantization) against the 16-bit tensor's ``absmax``."""
    if not ref4.spec.double_quant:
        stored = _floats(ref4.absmax, "F32")
        if ref4.absmax.dtype != "F32" or stored.size != absmax.size or not np.array_equal(
                stored.view(np.uint32), absmax.view(np.uint32)):
            if ref4.absmax.dtype != "F32" or stored.size != absmax.size:
                raise _Differs(name, f"absmax is {ref4.absmax.dtype} {list(ref4.absmax.shape)}; quantizing the "
                                     f"16-bit tensor gives {absmax.size} float32 values")
            b = _first(stored.view(np.uint32), absmax.view(np.uint32))
            raise _Differs(name, f"absmax of block {b} (blocksize {ref4.spec.blocksize}) is {_bits(stored[b])}; "
                                 f"the 16-bit tensor's is {_bits(absmax[b])}")
        return
    state = ref4.state
    offset = np.float32(state["nested_offset"])
    sums = {np.float32(bnb.torch_sum_f32(absmax, lanes) / np.float32(absmax.size)) for lanes in (8, 16)}
    if offset not in sums:
        exact = np.float32(np.mean(absmax, dtype=np.float64))
        near = abs(float(offset) - float(exact)) <= 2 * float(np.spacing(exact))
        if not (absmax.size > THREADED_SUM and near):
            raise _Differs(name, f"double quantization's offset is {_bits(offset)}; the mean of the 16-bit "
                                 f"tensor's absmax is {_bits(min(sums))}")
        result.notes.append(f"{name}: the offset is within a float32 step of the absmax mean (torch summed "
                            f"{absmax.size} values in threads, in an order not reproduced)")
    code = bnb.dynamic_map()
    blocksize = int(state.get("nested_blocksize", bnb.NESTED_BLOCKSIZE))
    q, nested = bnb.quantize_blockwise_8bit(absmax - offset, code, blocksize)
    stored_code = _floats(ref4.nested_code, "F32")
    if stored_code.size != code.size or not np.array_equal(stored_code.view(np.uint32), code.view(np.uint32)):
        raise _Differs(name, "nested_quant_map is not bitsandbytes' dynamic 8-bit code")
    for what, stored, want, dtype in (("8-bit absmax", ref4.absmax, q, "U8"),
                                      ("nested_absmax", ref4.nested_absmax, nested, "F32")):
        got = _floats(stored, dtype)
        if stored.dtype != dtype or got.size != want.size:
            raise _Differs(name, f"{what} is {stored.dtype} {list(stored.shape)}; double quantization of the "
                                 f"16-bit tensor's absmax gives {want.size} {dtype} values")
        a, b = (got, want) if dtype == "U8" else (got.view(np.uint32), want.view(np.uint32))
        if not np.array_equal(a, b):
            k = _first(a, b)
            shown = (lambda v: str(int(v))) if dtype == "U8" else _bits
            raise _Differs(name, f"{what} [{k}] is {shown(got[k])}; double quantization of the 16-bit tensor's "
                                 f"absmax gives {shown(want[k])}")


def _check_quantized(name: str, ref16: TensorRef, ref4: QuantizedRef, result: Derivation) -> None:
    spec, dtype = ref4.spec, ref16.dtype
    bs, item, n = spec.blocksize, RAW[dtype].itemsize, ref16.info.numel
    quantum = bs * 2 // math.gcd(bs, 2)  # whole blocks and whole bytes
    with _Reader() as r:
        # first pass: the absmax of every block (double quantization needs the whole vector)
        absmax = np.empty(-(-n // bs), np.float32)
        for e0, e1 in _chunks(n, item, quantum):
            raw = np.frombuffer(r.read(ref16, e0 * item, (e1 - e0) * item), RAW[dtype])
            absmax[e0 // bs: -(-e1 // bs)] = bnb.absmax_bits(raw, dtype, bs)
        _check_scale(name, ref4, absmax, result)
        for e0, e1 in _chunks(n, item, quantum):
            raw = np.frombuffer(r.read(ref16, e0 * item, (e1 - e0) * item), RAW[dtype])
            x = bnb.from_dtype_bits(raw, dtype)
            want, _ = bnb.quantize_4bit(x, bs, spec.quant_type, absmax=absmax[e0 // bs: -(-e1 // bs)])
            got = np.frombuffer(r.read(ref4.packed, e0 // 2, (e1 - e0 + 1) // 2), np.uint8)
            if not np.array_equal(got, want):
                byte = _first(got, want)
                hi = (got[byte] >> 4) != (want[byte] >> 4)
                k = e0 + 2 * byte + (0 if hi else 1)
                shift = 4 if hi else 0
                g, w = (int(got[byte]) >> shift) & 15, (int(want[byte]) >> shift) & 15
                raise _Differs(name, f"the 4-bit code of element {k}{_where(k, ref16.shape)} is {g}; "
                                     f"{spec.quant_type} of the 16-bit value {float(x[k - e0])!r} gives {w}")
