"""4-bit weights of a checkpoint that transformers saved with bitsandbytes (``*-bnb-4bit``), read
as the 16-bit tensors they dequantize to.

transformers writes a ``Linear4bit`` weight as the packed bytes (``<name>`` itself, uint8, shape
(n/2, 1)) and its quant state beside it: ``<name>.absmax`` (float32, or uint8 with double
quantization), ``<name>.quant_map`` (the 16-entry code), ``<name>.nested_absmax`` and
``<name>.nested_quant_map`` (double quantization), and ``<name>.quant_state.bitsandbytes__nf4``
(or ``__fp4``): JSON bytes with the quant type, blocksize, dtype, shape and nested offset
(``QuantState.as_dict(packed=True)``). ``group`` finds these and returns one ``QuantizedRef`` per
weight, a ``TensorRef`` whose dtype and shape are the original's and whose bytes are the packed
ones (``nbytes``: what the merge reads; ``numel``: what it writes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loratool.errors import FormatError
from loratool.quant import bnb
from loratool.safetensors_io import TensorInfo, TensorRef


class DequantizedRef(TensorRef):
    """A stored-quantized weight presented as the tensor it dequantizes to: its bytes and its torch
    tensor are those of ``dequantized()`` (which a subclass defines), in ``self.dtype``."""

    def raw(self) -> bytes:
        return self.dequantized().tobytes()

    def rows(self, i: int, j: int) -> np.ndarray:
        """Raw elements (``self.dtype``) of rows [i, j), shaped (j − i, *shape[1:]); a subclass
        may dequantize only those."""
        return self.dequantized().reshape(self.shape)[i:j]

    def load(self):
        import torch

        from loratool.safetensors_io import torch_dtype

        data = bytearray(self.raw())
        return torch.frombuffer(data, dtype=torch_dtype(self.dtype)).reshape(self.shape) if data else \
            torch.empty(self.shape, dtype=torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class QuantizedRef(DequantizedRef):
    """A bitsandbytes 4-bit weight, presented as its dequantized tensor."""

    packed: TensorRef | None = None
    absmax: TensorRef | None = None
    nested_absmax: TensorRef | None = None
    nested_code: TensorRef | None = None
    state: dict | None = None

    @property
    def spec(self) -> bnb.QuantSpec:
        return bnb.QuantSpec(self.state["quant_type"], int(self.state["blocksize"]), self.nested_absmax is not None)

    def scale(self) -> np.ndarray:
        """The float32 factor of each block (absmax, after its 8-bit round trip when nested)."""
        if self.nested_absmax is None:
            return _array(self.absmax, "F32")
        nested = bnb.NestedAbsmax(qabsmax=_array(self.absmax, "U8"), nested_absmax=_array(self.nested_absmax, "F32"),
                                  nested_code=_array(self.nested_code, "F32"),
                                  offset=np.float32(self.state["nested_offset"]),
                                  blocksize=int(self.state.get("nested_blocksize", bnb.NESTED_BLOCKSIZE)))
        return nested.dequantize()

    def rows(self, i: int, j: int) -> np.ndarray:
        shape = tuple(self.shape)
        cols = self.info.numel // max(1, shape[0] if shape else 1)
        e0 = i * cols // self.spec.blocksize * self.spec.blocksize  # from the block holding row i
        out = self.dequantized(first=e0, count=j * cols - e0)
        return out[i * cols - e0:].reshape((j - i,) + shape[1:])

    def dequantized(self, packed: bytes | np.ndarray | None = None, first: int = 0, count: int | None = None,
                    scale: np.ndarray | None = None) -> np.ndarray:
        """Raw elements (``self.dtype``) of elements [first, first + count) (all by default), from
        the packed bytes of those elements (read from the file when not given); ``first`` is at a
        block boundary."""
        n = self.info.numel - first if count is None else count
        bs = self.spec.blocksize
        if packed is None:
            packed = self.packed.raw()[first // 2: (first + n + 1) // 2]
        scale = self.scale() if scale is None else scale
        b0 = first // bs
        return bnb.dequantize(np.frombuffer(packed, np.uint8, count=(n + 1) // 2), scale[b0: b0 + -(-n // bs)],
                              self.shape, self.dtype, bs, self.spec.quant_type, count=n)



def _array(ref: TensorRef, dtype: str) -> np.ndarray:
    if ref.dtype != dtype:
        raise FormatError(f"{ref.file.path}: tensor {ref.info.name!r} is {ref.dtype}; a bitsandbytes quant state "
                          f"holds it as {dtype}")
    return np.frombuffer(ref.raw(), bnb.np.dtype({"F32": "<f4", "U8": "u1"}[dtype])).copy()


def group(tensors: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], list[str]]:
    """``tensors`` with every bitsandbytes 4-bit weight replaced by a ``QuantizedRef`` and its
    quant-state tensors left out; and the names of the weights replaced."""
    states = [n for n in tensors if any(n.endswith(".quant_state.bitsandbytes__" + q) for q in bnb.QUANT_TYPES)]
    if not states:
        return tensors, []
    out = dict(tensors)
    found = []
    for key in states:
        name = key[: key.rindex(".quant_state.")]
        ref = tensors[key]
        where = f"{ref.file.path}: tensor {key!r}"
        if name not in tensors:
            raise FormatError(f"{where}: a bitsandbytes quant state without its weight {name!r}")
        try:
            state = bnb.parse_state(ref.raw())
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"{where}: not a bitsandbytes quant state ({e})") from None
        packed = tensors[name]
        aux = {s: tensors.get(f"{name}.{s}") for s in bnb.AUX_SUFFIXES}
        if aux["absmax"] is None:
            raise FormatError(f"{where}: {name}.absmax is missing; the checkpoint is incomplete")
        nested = aux["nested_absmax"] is not None
        if nested and ("nested_offset" not in state or aux["nested_quant_map"] is None):
            raise FormatError(f"{where}: double quantization without nested_offset or nested_quant_map")
        shape = tuple(state["shape"])
        n = int(np.prod(shape)) if shape else 1
        if packed.dtype != "U8" or packed.info.numel != (n + 1) // 2:
            raise FormatError(f"{ref.file.path}: tensor {name!r} is {packed.dtype} {list(packed.shape)}; its quant "
                              f"state says {n} 4-bit values, which pack into {(n + 1) // 2} uint8")
        blocks = -(-n // int(state["blocksize"]))
        if aux["absmax"].info.numel != blocks:
            raise FormatError(f"{ref.file.path}: tensor {name}.absmax holds {aux['absmax'].info.numel} values; "
                              f"{n} values in blocks of {state['blocksize']} need {blocks}")
        qmap = aux["quant_map"]
        if qmap is not None and not np.array_equal(_array(qmap, "F32"), bnb.CODES[state["quant_type"]]):
            raise FormatError(f"{ref.file.path}: tensor {name}.quant_map is not bitsandbytes' "
                              f"{state['quant_type']} code")
        dtype = bnb.TORCH_TO_ST[state["dtype"]]
        info = TensorInfo(packed.info.name, dtype, shape, packed.info.start, packed.info.end)
        out[name] = QuantizedRef(packed.file, info, packed=packed, absmax=aux["absmax"],
                                 nested_absmax=aux["nested_absmax"], nested_code=aux["nested_quant_map"],
                                 state=state)
        for s, r in aux.items():
            if r is not None:
                del out[f"{name}.{s}"]
        del out[key]
        found.append(name)
    return out, found
