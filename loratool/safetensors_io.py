"""Safetensors reading and writing without trusting the file.

* ``SafetensorsFile`` parses and checks the header (length, JSON, dtypes, shapes, offsets that
  fit the file and match the byte size of each tensor) before anything else, so a truncated file
  or a header that lies gives one clear error naming the file and the tensor. Tensors are read one
  at a time with plain ``pread``-style reads (no mmap, so memory stays what we ask for).
* ``write_safetensors`` streams tensors into a file whose header is planned up front; together
  with ``atomic_path``/``atomic_dir`` the output appears at its destination only when complete.
* ``HostTensor`` is a tensor in memory as its safetensors dtype and little-endian bytes (a numpy
  array; bfloat16 as its bits), and ``host_tensor`` rounds float values to a dtype exactly as
  torch's ``.to(dtype)`` does: what resize and compose build, written without torch (issue 14).

Pickle-based checkpoints (``.bin``, ``.pt``, ``.ckpt``) are recognised by their magic bytes and
refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from loratool import boundary
from loratool.boundary import fsync_dir  # noqa: F401  (re-exported)
from loratool.errors import FormatError, InputError, OutputError, UnsafeFormatError

if TYPE_CHECKING:  # pragma: no cover
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces

# safetensors dtype -> (itemsize in bytes, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "U16": (2, "uint16"),
    "U32": (4, "uint32"),
    "U64": (8, "uint64"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def torch_dtype(st_dtype: str) -> "torch.dtype":
    import torch

    return getattr(torch, DTYPES[st_dtype][1])


def st_dtype(dtype: "torch.dtype | Any") -> str:
    """The safetensors name of a torch or numpy dtype."""
    name = str(dtype).replace("torch.", "")
    for key, (_, tname) in DTYPES.items():
        if tname == name:
            return key
    raise FormatError(f"dtype {dtype} cannot be stored in safetensors")


def sniff_pickle(path: Path) -> str | None:
    """Return a reason if ``path`` looks like a pickle or a torch zip checkpoint."""
    try:
        if not Path(path).is_file():
            return None
        fd = boundary.open_regular(path)
    except (OSError, InputError):
        return None
    try:
        head = os.pread(fd, 9, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _pickle_reason(head)


def _pickle_reason(head: bytes) -> str | None:
    # A safetensors file starts with its header length (u64, little-endian) and then "{": a
    # header of 640, 896, 1152 or 1408 bytes begins with the same two bytes as a pickle.
    if len(head) == 9 and head[8:9] == b"{":
        return None
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return "it is a Python pickle"
    if head[:4] == b"PK\x03\x04":
        return "it is a PyTorch zip checkpoint (torch.save), which holds a pickle"
    return None


def refuse_pickle(path: Path, reason: str | None = None) -> UnsafeFormatError:
    reason = reason or "it is a pickle-based PyTorch checkpoint"
    return UnsafeFormatError(
        f"{path}: refused: {reason}; loading it would run arbitrary code, so loratool never "
        "unpickles files. Convert it to safetensors with a tool you trust "
        "(e.g. safetensors.torch.save_file) and pass that file instead."
    )


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsFile:
    """A checked, header-only view of a safetensors file; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not os.path.lexists(self.path):
            raise InputError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, expected a .safetensors file")
        fd = boundary.open_regular(self.path)  # a FIFO or a device is refused without reading it
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                self.size = os.fstat(fd).st_size
                raw_len = f.read(8)
                reason = _pickle_reason(raw_len + f.read(1))
                if reason:
                    raise refuse_pickle(self.path, reason)
                f.seek(8)
                if len(raw_len) < 8:
                    raise FormatError(
                        f"{self.path}: truncated or not safetensors: {self.size} bytes, "
                        "shorter than the 8-byte header length"
                    )
                (hlen,) = struct.unpack("<Q", raw_len)
                if hlen > MAX_HEADER_BYTES:
                    raise FormatError(
                        f"{self.path}: corrupt safetensors header: header length field says "
                        f"{hlen} bytes (limit {MAX_HEADER_BYTES}); not a safetensors file?"
                    )
                if 8 + hlen > self.size:
                    raise FormatError(
                        f"{self.path}: truncated: header length field says {hlen} bytes but the "
                        f"file has only {self.size - 8} after it"
                    )
                raw = f.read(hlen)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {e.strerror or e}") from None
        finally:
            os.close(fd)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                                parse_int=boundary._bounded_int)
            boundary._check_tree(header)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{self.path}: corrupt safetensors header: not valid JSON ({e})") from None
        except _DuplicateKey as e:
            raise FormatError(f"{self.path}: corrupt safetensors header: key {e.args[0]!r} appears twice") from None
        except RecursionError:
            raise FormatError(f"{self.path}: corrupt safetensors header: nested too deeply") from None
        except ValueError as e:  # an integer too long, a lone surrogate
            raise FormatError(f"{self.path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: corrupt safetensors header: expected a JSON object")
        self.header_size = hlen
        self.data_start = 8 + hlen
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{self.path}: corrupt safetensors header: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = dict(meta)
        self.tensors: dict[str, TensorInfo] = {}
        data_len = self.size - self.data_start
        for name, entry in header.items():
            self.tensors[name] = self._check_entry(name, entry, data_len)
        # As safetensors itself requires: the tensors tile the data section exactly, with no
        # overlap, no hole and nothing after the last one.
        end = 0
        for info in sorted(self.tensors.values(), key=lambda i: (i.start, i.end)):
            if info.start - self.data_start != end:
                what = "overlaps the tensor before it" if info.start - self.data_start < end else "leaves a gap before it"
                raise FormatError(f"{self.path}: corrupt safetensors header: tensor {info.name!r} {what} "
                                  f"(data_offsets start at {info.start - self.data_start}, expected {end})")
            end = info.end - self.data_start
        if end != data_len:
            raise FormatError(f"{self.path}: corrupt safetensors file: {data_len - end} bytes after the last tensor's "
                              "data (the header does not describe the whole file)")

    def _check_entry(self, name: str, entry: Any, data_len: int) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: corrupt header entry (expected an object)")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(f"{where}: unknown dtype {dtype!r}")
        # type(d) is int: a JSON true is not a dimension
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise FormatError(f"{where}: corrupt shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise FormatError(f"{where}: corrupt data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * DTYPES[dtype][0]
        begin, end = offsets
        if end - begin != expected:
            raise FormatError(
                f"{where}: header lies about its size: shape {shape} of {dtype} needs {expected} "
                f"bytes, data_offsets give {end - begin}"
            )
        if end > data_len:
            raise FormatError(
                f"{where}: truncated: data ends at byte {end} of the data section but the file "
                f"has only {data_len} bytes of data"
            )
        return TensorInfo(name, dtype, tuple(shape), self.data_start + begin, self.data_start + end)

    # -- access -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def ref(self, name: str) -> "TensorRef":
        return TensorRef(self, self.tensors[name])

    def read_bytes(self, name: str) -> bytes:
        info = self.tensors[name]
        try:
            fd = boundary.open_regular(self.path)
            try:
                data = _pread_all(fd, info.nbytes, info.start)
            finally:
                os.close(fd)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read tensor {name!r}: {e.strerror or e}") from None
        if len(data) != info.nbytes:
            raise FormatError(f"{self.path}: truncated while reading tensor {name!r}")
        return data

    def read(self, name: str) -> "torch.Tensor":
        import torch

        info = self.tensors[name]
        data = self.read_bytes(name)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(bytearray(data), dtype=torch_dtype(info.dtype)).reshape(info.shape)


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, min(n - got, 1 << 30), offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


@dataclass(frozen=True)
class TensorRef:
    """A tensor in a file: shape and dtype known from the header, data read by ``load()``."""

    file: SafetensorsFile
    info: TensorInfo

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def load(self) -> "torch.Tensor":
        return self.file.read(self.info.name)

    def raw(self) -> bytes:
        return self.file.read_bytes(self.info.name)


# -- tensors in memory, without torch ------------------------------------------------------------

# safetensors dtype -> the numpy dtype that holds its bytes (bfloat16 and float8: their bits)
STORAGE = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?",
           "F8_E4M3": "u1", "F8_E5M2": "u1"}


@dataclass(frozen=True, eq=False)
class HostTensor:
    """A tensor in memory: its safetensors ``dtype`` and ``array``, a numpy array of the dtype's
    ``STORAGE`` (bfloat16 and float8 as their bits). Like a ``TensorRef``, ``dtype`` is a string
    and ``raw()`` its bytes, so writers copy it and numpy readers decode it without torch."""

    dtype: str
    array: Any  # numpy.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def raw(self) -> bytes:
        return self.array.tobytes()

    def reshape(self, *shape) -> "HostTensor":
        return HostTensor(self.dtype, self.array.reshape(*shape))

    def load(self) -> "torch.Tensor":
        import torch

        if self.array.size == 0:
            return torch.empty(self.shape, dtype=torch_dtype(self.dtype))
        return torch.frombuffer(bytearray(self.raw()), dtype=torch_dtype(self.dtype)).reshape(self.shape)


def bf16_bits(x) -> Any:
    """The bfloat16 bits (uint16) of float32 values, rounded to nearest even as torch's
    ``.to(torch.bfloat16)`` rounds them: overflow goes to ±Inf, every NaN becomes 0xFFFF (its
    vectorised conversion's NaN, whatever the sign or payload)."""
    import numpy as np

    u = np.asarray(x, dtype=np.float32, order="C").view(np.uint32)
    with np.errstate(over="ignore"):
        bits = np.asarray((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    return np.where(np.isnan(u.view(np.float32)), np.uint16(0xFFFF), bits)


def host_tensor(values: Any, dtype: str) -> HostTensor:
    """Float ``values`` (a numpy array) as a ``HostTensor`` of the float ``dtype``, with torch's
    rounding: float64 goes through float32 before float16 or bfloat16 (torch's casts do; one
    rounding straight to half precision can differ at the ties of the intermediate float32)."""
    import numpy as np

    x = np.asarray(values)
    if dtype == "F64":
        return HostTensor(dtype, np.asarray(x, dtype="<f8", order="C"))
    if dtype in ("F32", "F16", "BF16"):
        with np.errstate(over="ignore"):
            f32 = np.asarray(x, dtype="<f4", order="C")
            if dtype == "F32":
                return HostTensor(dtype, f32)
            if dtype == "F16":
                return HostTensor(dtype, f32.astype("<f2"))
        return HostTensor(dtype, bf16_bits(f32))
    if dtype not in FLOAT_DTYPES:
        raise FormatError(f"cannot store float values as {dtype}")
    import torch  # float8: no numpy dtype, and rare enough to leave to torch

    t = torch.from_numpy(np.asarray(x, dtype=np.float32, order="C")).to(torch_dtype(dtype))
    return HostTensor(dtype, np.frombuffer(_tensor_bytes(t), "u1").reshape(x.shape))


# -- writing ------------------------------------------------------------------------------------

def _tensor_bytes(t: "torch.Tensor | HostTensor | Any") -> bytes:
    """The little-endian bytes of a torch tensor, a ``HostTensor`` or a numpy array."""
    if isinstance(t, HostTensor):
        return t.raw()
    if not hasattr(t, "detach"):  # numpy
        import numpy as np

        a = np.ascontiguousarray(t)
        return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    # view as bytes without going through numpy (bfloat16 has no numpy dtype)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def encode_header(
    entries: Iterable[tuple[str, str, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
    where: str = "safetensors header",
) -> bytes:
    """The 8-byte length plus the JSON header of a safetensors file whose tensors, given as
    ``(name, dtype, shape)`` with safetensors dtype strings, follow in that order.

    Planning the header from shapes and dtypes alone lets a writer stream the data afterwards
    (``write_safetensors``, and the merge executor, which writes row blocks as they are computed).
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPES:
            raise FormatError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
        if name in header:
            raise FormatError(f"{where}: duplicate tensor name {name!r}")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPES[dtype][0]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, "torch.Tensor | HostTensor | TensorRef"] | Iterable[tuple[str, Any]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file, streaming one tensor at a time.

    Values are torch tensors, numpy arrays, ``HostTensor``s or ``TensorRef``s; a ``TensorRef`` is
    copied as raw bytes, never decoded, so it is bit-exact whatever its dtype. The header is planned from shapes and dtypes
    first. The file is written in place: wrap the call in ``atomic_path`` for an atomic output.
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    entries = []
    for name, value in items:
        if isinstance(value, (TensorRef, HostTensor)):
            entries.append((name, value.dtype, value.shape))
        else:
            entries.append((name, st_dtype(value.dtype), tuple(value.shape)))
    head = encode_header(entries, metadata, where=str(path))
    with open(path, "wb") as f:
        f.write(head)
        for name, value in items:
            data = value.raw() if isinstance(value, TensorRef) else _tensor_bytes(value)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


# -- atomic outputs -----------------------------------------------------------------------------

def read_back(out: Path, suffix: str | None = None) -> None:
    """The output check before publishing: every ``.safetensors`` file under ``out`` (a file or a
    folder; a file is taken as of type ``suffix``) parses with the full header checks of
    ``SafetensorsFile`` and every ``.json`` file parses, so that a file loratool could not read
    back is never renamed into place."""
    files = [(out, suffix)] if out.is_file() else [(p, p.suffix) for p in sorted(boundary.regular_files(out))]
    for p, kind in files:
        try:
            if kind == ".safetensors":
                SafetensorsFile(p)
            elif kind == ".json":
                boundary.read_json(p)
        except InputError as e:
            raise OutputError(f"the output failed its read-back check, nothing was published: {e}") from None


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, overwrite: bool = False, inputs: Iterable = (),
                verify: bool = True, sidecar: bool = False) -> Iterator[Path]:
    """A temporary safetensors file beside ``dest``, read back and renamed onto it on success only
    (``boundary.atomic_path``; ``inputs`` are protected even with ``overwrite``)."""
    suffix = Path(dest).suffix
    check = (lambda tmp: read_back(tmp, suffix)) if verify else None
    with boundary.atomic_path(dest, overwrite, inputs, check, sidecar=sidecar) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False, inputs: Iterable = (),
               verify: bool = True) -> Iterator[Path]:
    """A temporary folder beside ``dest`` that becomes ``dest`` once its safetensors and JSON files
    read back (``boundary.atomic_dir``)."""
    with boundary.atomic_dir(dest, overwrite, inputs, read_back if verify else None) as tmp:
        yield tmp
