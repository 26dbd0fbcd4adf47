"""The two checkpoints of ``loratool extract``: the header checks that refuse a TUNED that is not a
fine-tune of BASE before any work, the plan of which tensors are factored, and the reading of
one delta, TUNED − BASE, a block of rows at a time (``pread`` through ``loratool.boundary``;
different shard layouts are fine: each tensor is found by name)."""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from loratool import boundary
from loratool.errors import BaseMismatchError, InputError, UsageError
from loratool.kinds.layout import LayerKind
from loratool.text import listed, natural_key

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from loratool.checkpoint import BaseCheckpoint
    from loratool.safetensors_io import TensorRef

# last name component of an embedding layer (PEFT's lora_embedding_A/B layout)
EMBEDDINGS = {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
              "embed_positions", "shared", "tok_embeddings", "embed_in", "embedding"}
# transformers' Conv1D (weight stored (in, out)): GPT-2 style models
CONV1D_MODELS = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_NAMES = {"c_attn", "c_proj", "c_fc", "q_attn"}
BLOCK_BYTES = 4 << 20  # bytes of one tensor read at a time
_DECODE = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
_REGEX = re.compile(r"[\\^$*+?{}\[\]|()]")  # regex syntax other than "." (PEFT: a string is a regex)


# -- the pair of checkpoints ----------------------------------------------------------------------

def _vocab_names(names) -> set[str]:
    """Tensors with one row per token: embeddings and the output head."""
    return {n for n in names if len(n.split(".")) >= 2 and n.split(".")[-2] in EMBEDDINGS | {"lm_head"}}


def pair_problems(base: "BaseCheckpoint", tuned: "BaseCheckpoint", allow_dtype_mismatch: bool = False) -> list[str]:
    """Every way TUNED's headers say it is not a fine-tune of BASE (names, shapes, dtypes,
    vocabulary, tied embeddings, model type), one clause each; nothing is read but headers and
    configs."""
    problems: list[str] = []
    cb, ct = base.config, tuned.config
    for key in ("model_type", "vocab_size", "tie_word_embeddings"):
        if key in cb and key in ct and cb[key] != ct[key]:
            what = {"vocab_size": "vocabulary size", "tie_word_embeddings": "tied embeddings"}.get(key, key)
            problems.append(f"{what} differs: config.json says {cb[key]!r} in BASE, {ct[key]!r} in TUNED")
    nb, nt = set(base.names()), set(tuned.names())
    for name in sorted(nb ^ nt, key=natural_key):
        where, other = ("BASE", "TUNED") if name in nb else ("TUNED", "BASE")
        if name.endswith("lm_head.weight"):
            problems.append(f"{name} is in {where} only: one of the two ties the output embedding to the input one "
                            "(tie_word_embeddings) and the other does not; an adapter cannot untie them")
        else:
            problems.append(f"tensor {name} is in {where} but not in {other}")
    vocab = _vocab_names(nb & nt)
    for name in sorted(nb & nt, key=natural_key):
        sb, st = tuple(base.shape(name)), tuple(tuned.shape(name))
        if sb != st:
            if name in vocab and len(sb) == len(st) == 2 and sb[1] == st[1]:
                problems.append(f"vocabulary differs: {name} has {sb[0]} rows in BASE, {st[0]} in TUNED (tokens added "
                                "or removed in the fine-tune); an adapter cannot change the vocabulary: resize BASE's "
                                "embeddings to TUNED's tokenizer first")
            else:
                problems.append(f"{name} has shape {list(sb)} in BASE, {list(st)} in TUNED")
        elif base.dtype(name) != tuned.dtype(name) and not allow_dtype_mismatch:
            problems.append(f"{name} is {base.dtype(name)} in BASE, {tuned.dtype(name)} in TUNED (pass "
                            "--allow-dtype-mismatch to take the difference anyway)")
    return problems


def check_pair(base: "BaseCheckpoint", tuned: "BaseCheckpoint", allow_dtype_mismatch: bool = False) -> None:
    """Refuse (one line, exit 3) a TUNED that is not a fine-tune of BASE, before any work."""
    problems = pair_problems(base, tuned, allow_dtype_mismatch)
    if problems:
        raise BaseMismatchError(f"{tuned.path} is not a fine-tune of {base.path} ({len(problems)} "
                                f"difference{'s' if len(problems) > 1 else ''}): {listed(problems, 3)}; nothing was "
                                "computed")


@dataclass(frozen=True)
class Pair:
    """One tensor of both checkpoints and what extract does with it."""

    name: str
    shape: tuple[int, ...]
    base: "TensorRef"
    tuned: "TensorRef"
    layer: LayerKind | None  # None: not factored (dropped if it changed)
    reason: str = ""  # why it is not factored

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.tuned.nbytes


def _layer(name: str, shape: tuple[int, ...], config: dict) -> LayerKind | None:
    last = name[: -len(".weight")].rsplit(".", 1)[-1]
    if len(shape) == 4:
        return LayerKind.CONV2D
    if len(shape) != 2:
        return None
    if last in EMBEDDINGS:
        return LayerKind.EMBEDDING
    if config.get("model_type") in CONV1D_MODELS and last in CONV1D_NAMES:
        return LayerKind.CONV1D
    return LayerKind.LINEAR


def _selector(targets: str | None) -> Callable[[str], bool]:
    """PEFT's target_modules rule for ``targets``: a string with regex syntax must match a whole
    module name; otherwise a comma-separated list whose entries are names or dot-suffixes."""
    if targets is None:
        return lambda name: True
    from loratool.formats.loraconfig import selects

    spec: str | list[str] = targets if _REGEX.search(targets) else [t.strip() for t in targets.split(",") if t.strip()]
    if not spec:
        raise UsageError("--targets is empty; give module names (q_proj,v_proj) or a regular expression")
    return lambda name: selects(spec, name)


def plan_pairs(base: "BaseCheckpoint", tuned: "BaseCheckpoint", targets: str | None = None) -> list[Pair]:
    """The tensors to compare, in BASE's order: float weights of a layer PEFT targets (2-D, or
    4-D conv) are factored when ``targets`` selects their module; other float tensors are
    compared and reported if they changed (``reason``). A tied lm_head is left to the embedding."""
    from loratool.safetensors_io import FLOAT_DTYPES

    select = _selector(targets)
    tied = bool(base.config.get("tie_word_embeddings"))
    pairs, selected = [], 0
    for name, ref in base.items():
        if ref.dtype not in FLOAT_DTYPES or ref.dtype.startswith("F8"):
            continue  # buffers (position ids), float8: not weights an adapter changes
        shape = tuple(ref.shape)
        layer = _layer(name, shape, base.config) if name.endswith(".weight") else None
        pair = Pair(name, shape, ref, tuned.ref(name), layer)
        if layer is not None and tied and name.endswith("lm_head.weight"):
            pair = Pair(name, shape, ref, tuned.ref(name), None, "tied to the input embedding (tie_word_embeddings)")
        elif layer is not None:
            if not select(pair.module):
                continue
            selected += 1
        elif len(shape) <= 1:
            pair = Pair(name, shape, ref, tuned.ref(name), None, "1-D (a norm or a bias): no low-rank form")
        else:
            pair = Pair(name, shape, ref, tuned.ref(name), None, f"{len(shape)}-D: no layer PEFT targets")
        pairs.append(pair)
    if targets is not None and not selected:
        raise UsageError(f"--targets {targets!r} selects no 2-D (or conv) weight of {base.path}; module names look "
                         f"like {next((p.module for p in pairs), 'model.layers.0.self_attn.q_proj')!r}")
    return pairs


# -- reading a delta --------------------------------------------------------------------------------

class _Files:
    """Read-only descriptors of the checkpoints' files (through ``loratool.boundary``), shared by
    the worker threads (``pread`` takes its own offset)."""

    def __init__(self):
        self.fds: dict[Path, int] = {}
        self.lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self.lock:
            fd = self.fds.get(path)
            if fd is None:
                fd = self.fds[path] = boundary.open_regular(path)
            return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _decode(raw: memoryview, dtype: str, out: "np.ndarray") -> None:
    """Values of ``raw`` (safetensors ``dtype`` bytes) into ``out`` (float32 or float64)."""
    import numpy as np

    if dtype == "BF16":  # the top half of a float32
        bits = np.frombuffer(raw, "<u2")
        if out.dtype == np.float32:
            np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            out[...] = np.left_shift(bits.astype(np.uint32), 16).view(np.float32)
        return
    out[...] = np.frombuffer(raw, _DECODE[dtype])


def _read_rows(files: _Files, ref: "TensorRef", i: int, j: int, row_bytes: int, buf: bytearray) -> memoryview:
    from loratool.quant.stored import DequantizedRef

    if isinstance(ref, DequantizedRef):  # a checkpoint stored quantized: the rows it dequantizes to
        return memoryview(bytearray(ref.rows(i, j).tobytes()))
    n = (j - i) * row_bytes
    view = memoryview(buf)[:n]
    fd, off, got = files.fd(ref.file.path), ref.info.start + i * row_bytes, 0
    while got < n:
        k = os.preadv(fd, [view[got:]], off + got)
        if k == 0:
            raise InputError(f"{ref.file.path}: truncated while reading tensor {ref.info.name!r}")
        got += k
    return view


def read_delta(files: _Files, pair: Pair, dtype) -> "np.ndarray":
    """TUNED − BASE of ``pair`` as a (rows, cols) array of ``dtype``, read a block of rows at a
    time; one line naming the tensor when it holds NaN or Inf."""
    import numpy as np

    rows = pair.shape[0] if pair.shape else 1
    cols = math.prod(pair.shape[1:]) if pair.shape else 1
    out = np.empty((rows, cols), dtype=dtype)
    if out.size == 0:
        return out
    rb, rt = pair.base.nbytes // rows, pair.tuned.nbytes // rows
    step = max(1, BLOCK_BYTES // max(rb, rt, 1))
    buf_b, buf_t = bytearray(step * rb), bytearray(step * rt)
    tmp = np.empty((step, cols), dtype=dtype)
    for i in range(0, rows, step):
        j = min(rows, i + step)
        block, t = out[i:j], tmp[: j - i]
        _decode(_read_rows(files, pair.tuned, i, j, rt, buf_t), pair.tuned.dtype, block.reshape(-1))
        _decode(_read_rows(files, pair.base, i, j, rb, buf_b), pair.base.dtype, t.reshape(-1))
        np.subtract(block, t, out=block)
    return out


def read_delta_torch(files: _Files, pair: Pair, dtype, device: str) -> "torch.Tensor":
    """``read_delta`` on ``device``: the raw rows of both tensors are copied there a block at a
    time and TUNED − BASE is formed there in ``dtype`` (a torch dtype)."""
    import torch

    from loratool.safetensors_io import torch_dtype

    rows = pair.shape[0] if pair.shape else 1
    cols = math.prod(pair.shape[1:]) if pair.shape else 1
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    rb, rt = pair.base.nbytes // rows, pair.tuned.nbytes // rows
    step = max(1, BLOCK_BYTES // max(rb, rt, 1))
    buf_b, buf_t = bytearray(step * rb), bytearray(step * rt)
    src_t, src_b = torch_dtype(pair.tuned.dtype), torch_dtype(pair.base.dtype)
    for i in range(0, rows, step):
        j = min(rows, i + step)
        # each block is copied into ``out`` before its buffer is read into again
        raw = torch.frombuffer(_read_rows(files, pair.tuned, i, j, rt, buf_t), dtype=src_t)
        out[i:j].copy_(raw.reshape(j - i, cols))
        raw = torch.frombuffer(_read_rows(files, pair.base, i, j, rb, buf_b), dtype=src_b)
        out[i:j].sub_(raw.reshape(j - i, cols).to(device=device, dtype=dtype))
    return out
