"""GPTQ and AWQ weights of a checkpoint, read as the 16-bit tensors they dequantize to (numpy).

A GPTQ linear layer (transformers/optimum, AutoGPTQ, GPTQModel) is saved as ``<m>.qweight``
(int32 [in·bits/32, out]: the codes of the input rows, packed along the input dimension),
``<m>.qzeros`` (int32 [groups, out·bits/32]: the zero points, packed along the output dimension),
``<m>.scales`` ([groups, out]), ``<m>.g_idx`` (int32 [in]: the group of each input row; with
``desc_act`` it is not ``i // group_size``) and, optionally, ``<m>.bias``. The words of a packed
axis are a little-endian bit stream, value j at bits [j·bits, (j+1)·bits): for 2, 4 and 8 bits a
word holds 32/bits values, low bits first; 3-bit values straddle words (32 values in 3 words).

An AWQ GEMM layer (AutoAWQ ``WQLinear_GEMM``) is ``qweight`` int32 [in, out/8] and ``qzeros``
int32 [in/group, out/8], both packed along the output dimension with the 8 columns of a word in
AWQ's interleaved order (slot k, bits [4k, 4k+4), holds column ``AWQ_ORDER[k]`` of its 8), and
``scales`` [in/group, out]. GPTQModel's AWQ at other widths (2, 3, 5-8 bits) packs the output
dimension as a plain bit stream, [in, out·bits/32].

Both dequantize to W[i, o] = (q[i, o] − z[g(i), o]) · s[g(i), o], transposed to the Linear's
[out, in] layout. The product of a code difference (at most 9 bits) and a 16-bit scale is exact in
float32, so it is rounded once, to the output dtype: bit for bit what GPTQModel's TorchLinear and
AutoAWQ's ``dequantize_gemm`` compute in float16 (torch multiplies half values in float32 and
rounds), and what GPTQModel's safetensors dequantizer writes in float16 or bfloat16 (the output
dtype is config.json's ``torch_dtype``, else the scales'). A runtime that first casts float16
scales to a bfloat16 model's dtype rounds twice and can differ from that in the last bit; float32
scales are multiplied in float32, then rounded to the output dtype, as that dequantizer does.
bench/check_gptq_reference.py checks all of this against the references' own code.

GPTQ's v1 zero points (``checkpoint_format``/``format`` ``gptq``, the default; not ``gptq_v2``)
are stored minus one. They are read as GPTQModel's TorchLinear reads them (what transformers 5
loads a GPTQ model with): for 2, 4 and 8 bits one is added to every field of each word at once
(0x11111111 for 4 bits, modulo 2**32), the exact inverse of GPTQModel's v1 writer; for 3 bits
each field becomes (stored + 1) mod 8. Readers disagree only where a stored field is all ones (a
zero point of 0, which v1 cannot hold): AutoGPTQ 0.7.1's ``qlinear_cuda`` reads 2**bits there,
its ``qlinear_cuda_old`` and GPTQModel's safetensors dequantizer 0 without the carry into the
next field; ``v1_saturated`` counts such fields.

``group`` finds the packed layers among a checkpoint's tensors and returns one ``PackedRef`` per
weight, a ``TensorRef`` whose dtype and shape are the dequantized weight's (the same contract as
``loratool.quant.stored.group``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from loratool.errors import FormatError
from loratool.quant.bnb import from_dtype_bits
from loratool.quant.stored import DequantizedRef
from loratool.safetensors_io import STORAGE, TensorInfo, TensorRef, bf16_bits

GPTQ_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # slot k of an AWQ word holds column AWQ_ORDER[k] of its 8
AWQ_SLOT = tuple(AWQ_ORDER.index(c) for c in range(8))  # column c of 8 -> its slot
V2_FORMATS = ("gptq_v2",)
V1_FORMATS = ("gptq", "")
OUT_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "F16": "F16", "BF16": "BF16", "F32": "F32"}
SCALE_DTYPES = ("F16", "BF16", "F32")
V1_ADD = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}  # one in every field of a word


@dataclass(frozen=True)
class PackSpec:
    """How a checkpoint packs its weights: the quantization_config's fields that matter here."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group over the whole input
    desc_act: bool = False
    sym: bool = True
    v1: bool = True  # gptq: zero points stored minus one
    version: str = "gemm"  # awq

    def __str__(self) -> str:
        g = "none" if self.group_size < 0 else str(self.group_size)
        if self.method == "awq":
            return f"awq,bits={self.bits},group_size={g},{self.version}"
        return (f"gptq,bits={self.bits},group_size={g}" + (",desc_act" if self.desc_act else "")
                + (",sym" if self.sym else "") + (",v1" if self.v1 else ",v2"))


def model_packing(config: dict) -> tuple[dict | None, str | None]:
    """From a model's config.json: its quantization_config (None when it has none; AutoGPTQ and
    AutoAWQ may keep theirs in a file beside it) and the dtype it gives the model
    (``torch_dtype``, or transformers 5's ``dtype``)."""
    qc = config.get("quantization_config")
    return (qc if isinstance(qc, dict) else None), (config.get("torch_dtype") or config.get("dtype"))


def parse_config(qc: dict | None, where: str, side_file: bool = False) -> PackSpec | None:
    """The ``PackSpec`` of a quantization_config (config.json's, or, ``side_file``, AutoGPTQ's
    quantize_config.json or AutoAWQ's quant_config.json, which say the method by their keys
    alone), or None for another method; a FormatError naming ``where`` for a GPTQ/AWQ config this
    module cannot read. config.json's must name its ``quant_method``: MLX writes a
    ``{"group_size", "bits"}`` one of its own."""
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method") or "").lower()
    if not method and side_file:
        method = "awq" if "w_bit" in qc or "q_group_size" in qc else "gptq" if "bits" in qc else ""
    if method not in ("gptq", "awq"):
        return None
    bits = _int(qc.get("bits", qc.get("w_bit", 4)), where, "bits")
    group = _int(qc.get("group_size", qc.get("q_group_size", 128)), where, "group_size")
    if group == 0 or group < -1:
        raise FormatError(f"{where}: quantization_config group_size {group}; expected a positive size or -1")
    if method == "awq":
        version = str(qc.get("version") or "gemm").lower()
        if version != "gemm":
            raise FormatError(f"{where}: AWQ version {version!r}; only the GEMM layout (version 'gemm') is read")
        if not 2 <= bits <= 8:
            raise FormatError(f"{where}: AWQ with {bits} bits; the GEMM layout is read for 2 to 8 bits")
        if qc.get("zero_point", True) is False:
            raise FormatError(f"{where}: AWQ without zero points (zero_point: false) is not read")
        return PackSpec("awq", bits, group, version=version)
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "").lower()
    if fmt not in V1_FORMATS + V2_FORMATS:
        raise FormatError(f"{where}: GPTQ checkpoint format {fmt!r}; only 'gptq' (v1 zero points) and 'gptq_v2' "
                          "are read (a marlin/bitblas/exllama repacking is not)")
    if bits not in GPTQ_BITS:
        raise FormatError(f"{where}: GPTQ with {bits} bits; the packed layout is read for {GPTQ_BITS} bits")
    return PackSpec("gptq", bits, group, desc_act=bool(qc.get("desc_act", False)), sym=bool(qc.get("sym", True)),
                    v1=fmt not in V2_FORMATS)


def _int(value, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{where}: quantization_config {key} is {value!r}; expected an integer")
    return value


# -- unpacking -------------------------------------------------------------------------------------

def fields(words: np.ndarray, index: np.ndarray, bits: int, axis: int, slot: np.ndarray | None = None) -> np.ndarray:
    """Values ``index`` of the bit streams that the int32 ``words`` make along ``axis`` (value j at
    bits [j·bits, (j+1)·bits), low bits first, across words); with ``slot``, value j is field
    ``slot[j]`` of word j // (32/bits) instead (AWQ's order). int16 values."""
    w = np.moveaxis(np.asarray(words).view(np.uint32), axis, 0)
    index = np.asarray(index, np.int64)
    if slot is None:
        bit = index * bits
    else:
        per = 32 // bits
        bit = (index // per) * 32 + np.asarray(slot, np.int64) * bits
    word, shift = bit // 32, (bit % 32).astype(np.uint64)
    shape = (-1,) + (1,) * (w.ndim - 1)
    v = w[word].astype(np.uint64)
    if 32 % bits:  # a value may straddle two words: add the next word's bits above
        nxt = np.minimum(word + 1, w.shape[0] - 1)
        spill = (word + 1 < w.shape[0]).reshape(shape)
        v |= np.where(spill, w[nxt].astype(np.uint64), 0) << np.uint64(32)
    v = (v >> shift.reshape(shape)) & np.uint64((1 << bits) - 1)
    return np.moveaxis(v.astype(np.int16), 0, axis)


def _unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """The 32/bits fields of each int32 word along the last axis, low bits first (2, 4 or 8 bits):
    shape (..., words·32/bits), uint8."""
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    w = np.asarray(words).view(np.uint32)
    return ((w[..., None] >> shifts) & np.uint32((1 << bits) - 1)).astype(np.uint8).reshape(*w.shape[:-1], -1)


class Packed(NamedTuple):
    """A layer's packed tensors in memory (``PackedRef.arrays``): what ``dequantized`` reads from."""

    qweight: np.ndarray  # int32
    qzeros: np.ndarray  # int32
    scales: np.ndarray  # float32, exact
    g_idx: np.ndarray  # int64, a group per input row


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as raw elements of ``dtype``, rounded to nearest even (torch's casts)."""
    if dtype == "BF16":
        return bf16_bits(x)
    with np.errstate(over="ignore"):
        return x.astype(np.float16 if dtype == "F16" else np.float32)


# -- the reference -------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PackedRef(DequantizedRef):
    """A GPTQ or AWQ weight, presented as its dequantized [out, in] tensor (``info``: its name in
    the file, ``<layer>.weight``, its dtype and shape; its bytes the qweight's, which is what
    ``nbytes`` counts and what a reader of row blocks would read)."""

    qweight: TensorRef | None = None
    qzeros: TensorRef | None = None
    scales: TensorRef | None = None
    g_idx: TensorRef | None = None
    spec: PackSpec | None = None

    @property
    def packed_refs(self) -> list[TensorRef]:
        """The tensors hidden behind this weight."""
        return [r for r in (self.qweight, self.qzeros, self.scales, self.g_idx) if r is not None]

    @property
    def packed_nbytes(self) -> int:
        return sum(r.nbytes for r in self.packed_refs)

    def arrays(self) -> Packed:
        """The packed tensors, read once (a few percent of the 16-bit weight's bytes)."""
        out_f, in_f = self.shape
        qweight = _read(self.qweight, "I32")
        qzeros = _read(self.qzeros, "I32")
        scales = from_dtype_bits(_read(self.scales, self.scales.dtype), self.scales.dtype)
        scales = scales.reshape(self.scales.shape)
        if self.g_idx is not None:
            g_idx = _read(self.g_idx, self.g_idx.dtype).astype(np.int64).reshape(-1)
            bad = np.flatnonzero((g_idx < 0) | (g_idx >= scales.shape[0]))
            if bad.size:
                raise FormatError(f"{self.g_idx.file.path}: tensor {self.g_idx.info.name!r} puts input row "
                                  f"{int(bad[0])} in group {int(g_idx[bad[0]])}; scales has {scales.shape[0]}")
        else:
            g_idx = np.arange(in_f, dtype=np.int64) // (in_f if self.spec.group_size < 0 else self.spec.group_size)
        return Packed(qweight, qzeros, scales, g_idx)

    def rows(self, i: int, j: int) -> np.ndarray:
        return self.dequantized(i, j - i)

    def dequantized(self, first: int = 0, count: int | None = None, packed: Packed | None = None) -> np.ndarray:
        """Rows [first, first + count) (output channels; all by default) of the [out, in] weight, as
        raw elements of ``self.dtype`` (bfloat16 as its bits), shape (count, in); from ``packed``
        (``arrays()``, read from the file when not given)."""
        out_f, in_f = self.shape
        count = out_f - first if count is None else count
        if first < 0 or count < 0 or first + count > out_f:
            raise ValueError(f"rows [{first}, {first + count}) of {out_f}")
        p = self.arrays() if packed is None else packed
        bits, cols = self.spec.bits, np.arange(first, first + count)
        if self.spec.method == "awq":
            if bits == 4:  # whole words of 8 columns, unpacked and put back in column order
                w0, w1 = first // 8, -(-(first + count) // 8)
                q = _unpack(p.qweight[:, w0:w1], 4)
                q = q.reshape(q.shape[0], -1, 8)[:, :, list(AWQ_SLOT)]
                q = q.reshape(q.shape[0], -1)[:, first - 8 * w0: first - 8 * w0 + count].T  # [count, in]
                z = fields(p.qzeros, cols, bits, axis=1, slot=np.asarray(AWQ_SLOT)[cols % 8])  # [groups, count]
            else:  # GPTQModel's other widths: a plain stream along the output dimension
                q = fields(p.qweight, cols, bits, axis=1).T
                z = fields(p.qzeros, cols, bits, axis=1)
        else:
            words = np.ascontiguousarray(p.qweight[:, first:first + count].T)  # [count, in words]
            q = _unpack(words, bits)[:, :in_f] if 32 % bits == 0 else fields(words, np.arange(in_f), bits, axis=1)
            c0 = first // 32 * 32  # 32 values fill ``bits`` words: start at such a block
            w0, w1 = c0 * bits // 32, -(-(first + count) * bits // 32)
            zw = p.qzeros[:, w0:w1]
            if self.spec.v1 and bits != 3:  # + 0x11111111 (4 bits) to each word, carries and all
                zw = zw.view(np.uint32) + np.uint32(V1_ADD[bits])
            z = fields(zw, cols - c0, bits, axis=1)
            if self.spec.v1 and bits == 3:
                z = (z + 1) & 7
        g = p.g_idx
        zt = np.take(np.ascontiguousarray(z.T, np.float32), g, axis=1)  # [count, in], C order (not [:, g]'s)
        st = np.take(np.ascontiguousarray(p.scales[:, first:first + count].T), g, axis=1)
        w = np.subtract(q, zt, dtype=np.float32)
        w *= st  # exact (a code difference of at most 9 bits times a 16-bit scale): rounded once, below
        return np.ascontiguousarray(_round(w, self.dtype))

    def v1_saturated(self, packed: Packed | None = None) -> int:
        """GPTQ v1 zero-point fields that are all ones (zero point 0, which v1 cannot store, so
        readers disagree on it); 0 for v2 and AWQ."""
        if self.spec.method != "gptq" or not self.spec.v1:
            return 0
        p = self.arrays() if packed is None else packed
        z = fields(p.qzeros, np.arange(self.shape[0]), self.spec.bits, axis=1)
        return int(np.count_nonzero(z == (1 << self.spec.bits) - 1))

    def warning(self, name: str) -> str | None:
        """One line for the merge's warnings where this weight's reading is not settled (GPTQ v1
        zero points of 0), else None."""
        n = self.v1_saturated()
        if not n:
            return None
        return (f"{name}: {n} GPTQ v1 zero point(s) stored as all ones (a zero point of 0, which the v1 format "
                "cannot hold); read as GPTQModel/transformers read them, while AutoGPTQ's kernels read them "
                "differently: the checkpoint was probably written by a v1 writer that overflowed")



def _read(ref: TensorRef, dtype: str) -> np.ndarray:
    if ref.dtype != dtype:
        raise FormatError(f"{ref.file.path}: tensor {ref.info.name!r} is {ref.dtype}; expected {dtype}")
    return np.frombuffer(ref.raw(), STORAGE[dtype]).reshape(ref.shape)


# -- grouping a checkpoint's tensors --------------------------------------------------------------

def group(tensors: dict[str, TensorRef], qconfig: dict | None, dtype: str | None = None,
          where: str = "config.json", side_file: bool = False) -> tuple[dict[str, TensorRef], list[str]]:
    """``tensors`` with every GPTQ/AWQ layer's packed tensors replaced by a ``PackedRef`` named
    ``<layer>.weight``, and the names of the weights so made. ``qconfig`` is the checkpoint's
    quantization_config (nothing changes without a GPTQ/AWQ one); ``dtype`` the dequantized
    weights' (config.json's ``torch_dtype``/``dtype``: float16, bfloat16 or float32), else the
    scales' own; ``where`` names the config in errors."""
    layers = [n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")]
    if not layers:  # no packed layer: whatever the config says is not this module's to read
        return tensors, []
    spec = parse_config(qconfig, where, side_file)
    if spec is None:
        return tensors, []
    out_dtype = OUT_DTYPES.get(str(dtype).replace("torch.", "")) if dtype is not None else None
    out = dict(tensors)
    found = []
    for layer in layers:
        parts = {s: tensors.get(f"{layer}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
        qweight = parts["qweight"]
        at = f"{qweight.file.path}: {spec.method.upper()} layer {layer!r}"
        for s in ("qzeros", "scales"):
            if parts[s] is None:
                raise FormatError(f"{at}: {layer}.{s} is missing; the checkpoint is incomplete")
        if spec.method == "awq":
            parts["g_idx"] = None  # AWQ groups are contiguous (AutoAWQ saves no g_idx)
        name = f"{layer}.weight"
        if name in tensors:
            raise FormatError(f"{at}: holds both {name} and the packed {layer}.qweight")
        shape = _shape(spec, parts, at)
        sdtype = parts["scales"].dtype
        if sdtype not in SCALE_DTYPES:
            raise FormatError(f"{at}: scales are {sdtype}; expected one of {', '.join(SCALE_DTYPES)}")
        key = qweight.info.name[: -len("qweight")] + "weight"  # its name in the file (the merge writes it so)
        info = TensorInfo(key, out_dtype or sdtype, shape, qweight.info.start, qweight.info.end)
        out[name] = PackedRef(qweight.file, info, spec=spec, **parts)
        for s, r in parts.items():
            if r is not None:
                del out[f"{layer}.{s}"]
        found.append(name)
    return out, found


def _shape(spec: PackSpec, parts: dict[str, TensorRef | None], at: str) -> tuple[int, int]:
    """(out, in) of a layer, with every packed tensor's dtype and shape checked against it."""
    qw, qz, sc, gi = parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"]
    for r in (qw, qz):
        if r.dtype != "I32" or len(r.shape) != 2:
            raise FormatError(f"{at}: {r.info.name} is {r.dtype} {list(r.shape)}; expected a 2-D int32 tensor")
    if len(sc.shape) != 2:
        raise FormatError(f"{at}: {sc.info.name} is {list(sc.shape)}; expected [groups, out]")
    bits = spec.bits
    if spec.method == "awq":
        in_f, out_f = qw.shape[0], sc.shape[1]
        groups = 1 if spec.group_size < 0 else -(-in_f // spec.group_size)
        expect = [(qw, [(in_f, _words(out_f, bits))]), (qz, [(groups, _words(out_f, bits))]), (sc, [(groups, out_f)])]
    else:
        if gi is not None:
            if gi.dtype not in ("I32", "I64") or len(gi.shape) != 1:
                raise FormatError(f"{at}: {gi.info.name} is {gi.dtype} {list(gi.shape)}; expected 1-D int32")
            in_f = gi.shape[0]
        else:
            in_f = qw.shape[0] * 32 // bits
        out_f = qw.shape[1]
        groups = sc.shape[0] if gi is not None else 1 if spec.group_size < 0 else -(-in_f // spec.group_size)
        # GPTQModel packs just the words the values fill; AutoGPTQ whole blocks of 32 values (``bits`` words)
        expect = [(qw, [(_words(in_f, bits), out_f), (-(-in_f // 32) * bits, out_f)]),
                  (qz, [(groups, _words(out_f, bits)), (groups, -(-out_f // 32) * bits)]), (sc, [(groups, out_f)])]
    for r, shapes in expect:
        if tuple(r.shape) not in shapes:
            raise FormatError(f"{at}: {r.info.name} is {list(r.shape)}; {bits}-bit {spec.method.upper()} of a "
                              f"[{out_f}, {in_f}] weight in {groups} group(s) needs {list(shapes[0])}")
    return out_f, in_f


def _words(n: int, bits: int) -> int:
    """32-bit words that ``n`` values of ``bits`` bits fill."""
    return -(-n * bits // 32)
