"""Merge LoRA adapters into a base checkpoint: the plan (what changes, what is copied raw) and a
streaming executor.

    W' = round(W + Σᵢ wᵢ · sᵢ · ΔWᵢ)     ΔWᵢ = Bᵢ @ Aᵢ in the base weight's layout, sᵢ = PEFT's scale

accumulated in float32 and rounded once to the output dtype. The plan is built from headers only
(``BaseCheckpoint`` and the lazy ``Adapter``): every base tensor gets one ``TensorPlan`` with an
``Action``; tensors no adapter touches are copied as raw bytes (``os.copy_file_range``: never
decoded, never in our memory). The output keeps the base's shard layout, index, safetensors
metadata and the other files of the model directory (config, tokenizer, generation config), and
appears at OUT only when complete (``atomic_dir``).

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

Overflow (issue 11). A finite but huge scale or factor would make the arithmetic above write Inf
or NaN. Before anything is written, ``check_overflow`` bounds each merged tensor's delta from the
factors alone (|coef| · Σ_k max|B[:,k]|·max|A[k,:]|, one pass over each factor) and refuses one
past the output dtype's largest value; then every engine checks every block it writes for Inf/NaN
where the base is finite (what the base's own values add): ``npmerge.PlainMath`` on the numpy
path, ``_check_block`` for torch's (CPU and CUDA blocks both reach it on the CPU). Either ends the
merge with one line, exit 2, and nothing at OUT.

Memory and time. A plain merge on the CPU (every computed tensor one adapter at weight ±1 on a
Linear, ``_numpy_plan``) never imports torch, which takes a second or more of one core:
``loratool.npmerge`` repeats PEFT's float32 sequence in numpy, in a few worker threads, on row
blocks of read-only mappings of the base (populated by a reader thread, released tensor by
tensor); each output file is written front to back with O_DIRECT from a few page-aligned 8 MB
buffers (``_stream_direct``), so that no bytes are copied into the page cache and the final fsync
has nothing to wait for, while the device writes as the math goes on. Where a filesystem refuses
O_DIRECT (tmpfs) the same stream writes through the page cache.

Everything else runs in torch. The output files, their headers and the raw copies of untouched
tensors are written first, in a thread, while torch is imported (``_Prefill``). Base tensors are
read with ``pread`` in blocks of about 1 MB into reused buffers; a reader thread prefetches blocks,
the math runs on one torch thread (the I/O threads need the other cores; OpenMP workers spinning
between small calls would take them), and a writer thread writes the blocks at their offsets,
starting write-back every 256 MB (``sync_file_range``) so that the final fsync has little left.
Reads, math and writes overlap and the peak stays flat however large the model
(bench/bench_merge.py).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import mmap
import os
import queue
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from pydantic import BaseModel

from loratool.adapter import (
    DTYPE_MAX,
    DTYPE_NAMES,
    F32_MAX,
    Adapter,
    LayerKind,
    LoraModule,
    Magnitudes,
    TensorSource,
    load_tensor,
    shape_of,
)
from loratool import boundary
from loratool.errors import BaseMismatchError, InputError, OutputError, UsageError
from loratool.safetensors_io import (
    DTYPES,
    PICKLE_SUFFIXES,
    SafetensorsFile,
    TensorRef,
    atomic_dir,
    atomic_path,
    encode_header,
    torch_dtype,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from loratool.checkpoint import BaseCheckpoint

DTYPE_CHOICES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32",
                 "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
CONVERTIBLE = {"F32", "F16", "BF16"}  # --dtype converts these; other dtypes are kept as they are
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

ROW_ALIGN = 64  # row spans are multiples of this (see the module docstring)
BLOCK_BYTES = 2 << 20  # float32 bytes of one row block: stays in L2 with its delta
GPU_BLOCK_BYTES = 256 << 20  # a block for the Triton kernel: large enough to fill the GPU
CAST_BLOCK_BYTES = 8 << 20  # source bytes of one block of a dtype conversion
COPY_CHUNK = 64 << 20  # bytes per copy_file_range call (progress and Ctrl-C granularity)
SYNC_EVERY = 256 << 20  # start write-back every this many bytes written
QUEUE_DEPTH = 6
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers are multiples of this
DIRECT_CHUNK = 8 << 20  # bytes per O_DIRECT write
DIRECT_BUFFERS = 8  # chunks being filled or written at once
POOL_MAX_BYTES = 16 << 20  # read buffers up to this size are reused


# -- adapters on the command line ---------------------------------------------------------------

@dataclass(frozen=True)
class AdapterSpec:
    """One ``PATH[:WEIGHT]`` of ``--adapters``."""

    path: Path
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.weight:g}"




def parse_adapter_specs(values: str | Iterable[str]) -> list[AdapterSpec]:
    """Parse ``a:0.7,b:0.3`` (or several such strings): the weight is the last ``:number``, 1.0
    when absent, so paths that hold colons still work."""
    if isinstance(values, str):
        values = [values]
    specs: list[AdapterSpec] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            # the registry's rule: an existing path is never split, `sha256:1234` is a digest
            from loratool.registry.refs import split_weight

            path, w = split_weight(part)
            weight = 1.0 if w is None else w
            if path.startswith(":"):
                path = ""
            if not path:
                raise UsageError(f"--adapters: {part!r} has a weight but no path; expected PATH[:WEIGHT]")
            if not math.isfinite(weight):
                raise UsageError(f"--adapters: weight of {path} is {weight}; expected a finite number")
            specs.append(AdapterSpec(Path(path), weight))
    if not specs:
        raise UsageError("--adapters: no adapter given; expected PATH[:WEIGHT][,PATH[:WEIGHT]...]")
    return specs


def parse_size(text: str | int | None) -> int | None:
    """``200KB``, ``5GB``, ``1GiB`` or a byte count (transformers' convention: KB = 1000 bytes)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d{1,20}(?:\.\d{1,20})?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-shard-size: cannot read {text!r}; expected e.g. 200KB, 500MB, 5GB or bytes")
    num, unit = float(m.group(1)), m.group(2).upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(num * mult)
    if size <= 0:
        raise UsageError(f"--max-shard-size: {text!r} is not a positive size")
    return size


def parse_dtype(dtype: str | None) -> str | None:
    """``keep``/None -> None, else the safetensors dtype (``bf16`` -> ``BF16``)."""
    if dtype is None:
        return None
    key = str(dtype).lower()
    if key not in DTYPE_CHOICES:
        raise UsageError(f"--dtype: unknown dtype {dtype!r}; choose keep, bf16, fp16 or fp32")
    return DTYPE_CHOICES[key]


# -- the plan -----------------------------------------------------------------------------------

class Action(str, Enum):
    COPY = "copy"  # raw bytes, never decoded
    CAST = "cast"  # dtype conversion only (--dtype)
    MERGE = "merge"  # W + Σ coef·ΔW (a LoRA weight) or b + Σ coef·bias (PEFT lora_bias)
    REPLACE = "replace"  # modules_to_save (or, in unmerge, the base's tensor restored)


@dataclass
class Term:
    """One adapter's contribution to one base tensor."""

    module: LoraModule
    coef: float  # sign · weight · scale
    weight: float
    adapter: str  # the adapter's path, for reports
    part: str = "weight"  # "weight": the LoRA delta; "bias": lora_B.bias (PEFT lora_bias=True)

    @property
    def dora(self) -> bool:
        return self.part == "weight" and self.module.use_dora


@dataclass
class TensorPlan:
    name: str  # the checkpoint's name (component-prefixed in pipelines)
    src: TensorRef
    dtype: str  # output safetensors dtype
    action: Action
    terms: list[Term] = field(default_factory=list)
    replacement: TensorSource | None = None

    @property
    def key(self) -> str:
        """The name inside its safetensors file."""
        return self.src.info.name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.src.shape)

    @property
    def numel(self) -> int:
        return self.src.info.numel

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]

    @property
    def kind(self) -> LayerKind | None:
        return self.terms[0].module.kind if self.terms and self.terms[0].part == "weight" else None

    @property
    def dora(self) -> bool:
        return any(t.dora for t in self.terms)


@dataclass
class ShardPlan:
    rel: str  # path of the output file relative to the output root ("" for a single-file base)
    tensors: list[TensorPlan]
    metadata: dict[str, str]

    def header(self) -> bytes:
        return encode_header([(t.key, t.dtype, t.shape) for t in self.tensors], self.metadata,
                             where=self.rel or "output")

    @property
    def nbytes(self) -> int:
        return len(self.header()) + sum(t.nbytes for t in self.tensors)


@dataclass
class LoadedAdapter:
    spec: AdapterSpec
    adapter: Adapter


@dataclass
class MergePlan:
    base: "BaseCheckpoint"
    adapters: list[LoadedAdapter]
    shards: list[ShardPlan]
    dtype: str | None  # --dtype (None: keep)
    sign: int = 1  # -1: unmerge
    single_file: bool = False  # the base is one .safetensors file: so is the output
    indexes: dict[str, bytes] = field(default_factory=dict)  # rel -> content
    copies: list[tuple[Path, str]] = field(default_factory=list)  # other files: source -> rel
    json_updates: dict[str, dict[str, Any]] = field(default_factory=dict)  # rel -> keys to set
    warnings: list[str] = field(default_factory=list)

    def tensors(self) -> Iterator[TensorPlan]:
        for shard in self.shards:
            yield from shard.tensors

    def count(self, action: Action) -> int:
        return sum(1 for t in self.tensors() if t.action is action)

    @property
    def nbytes(self) -> int:
        """Bytes of the safetensors files written (the progress total)."""
        return sum(s.nbytes for s in self.shards)


def _module_problems(module: LoraModule) -> str | None:
    a, b = shape_of(module.lora_A), shape_of(module.lora_B)
    if module.kind is LayerKind.CONV2D:
        if len(a) != 4 or len(b) != 4 or tuple(b[2:]) != (1, 1):
            return f"Conv2d factors A {list(a)} and B {list(b)}; expected A (r, in, kh, kw) and B (out, r, 1, 1)"
    elif len(a) != 2 or len(b) != 2:
        return f"{module.kind.value} factors A {list(a)} and B {list(b)}; expected 2-D factors"
    out = module.out_features
    mag = shape_of(module.magnitude) if module.magnitude is not None else None
    # one value per output row: (out,) for Linear, (1, out, 1, 1) for Conv2d
    if mag is not None and [d for d in mag if d != 1] not in ([out], [] if out == 1 else [None]):
        return f"DoRA magnitude has shape {list(shape_of(module.magnitude))}, expected [{out}] (one per output row)"
    if module.lora_B_bias is not None and shape_of(module.lora_B_bias) != (out,):
        return f"lora_B bias has shape {list(shape_of(module.lora_B_bias))}, expected [{out}]"
    return None


def _resolve(base: "BaseCheckpoint", name: str) -> str | None:
    """A tensor name of an adapter (modules_to_save) in the base, tolerating the ``model.``
    prefix difference that ``BaseCheckpoint.weight_name`` tolerates for modules."""
    if name in base:
        return name
    alt = name[len("model."):] if name.startswith("model.") else "model." + name
    return alt if alt in base else None


def _listed(problems: list[str], limit: int = 4) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def plan_merge(
    base: "BaseCheckpoint",
    adapters: Sequence[LoadedAdapter],
    dtype: str | None = None,
    max_shard_size: int | None = None,
    sign: int = 1,
    restore: "BaseCheckpoint | None" = None,
) -> MergePlan:
    """Decide, from headers only, what happens to every base tensor.

    ``sign=-1`` plans an unmerge (deltas subtracted); ``restore`` is then the original base, from
    which modules_to_save tensors are restored. Problems (a module without a base tensor, shapes
    that do not fit, a weighted DoRA merge) are collected and raised together.
    """
    out_dtype = parse_dtype(dtype)
    terms: dict[str, list[Term]] = {}
    replacements: dict[str, tuple[TensorSource, str]] = {}
    fit: list[str] = []  # adapter and base do not fit (exit 3)
    usage: list[str] = []  # the request cannot be done (exit 2)

    for la in adapters:
        a, w, label = la.adapter, la.spec.weight, str(la.spec.path)
        for module in a.modules.values():
            where = f"{label}: module {module.name!r}"
            target = base.weight_name(module.name)
            if target is None:
                fit.append(f"{where} has no base tensor ({module.name}.weight is not in {base.path})")
                continue
            bad = _module_problems(module)
            if bad:
                fit.append(f"{where}: {bad}")
                continue
            found, expected = tuple(base.shape(target)), tuple(module.base_weight_shape)
            if found != expected and module.kind in (LayerKind.LINEAR, LayerKind.CONV1D) \
                    and found == expected[::-1]:
                # PEFT decides Linear vs Conv1D per layer from the base module's type and flips
                # fan_in_fan_out itself (with a warning), so one saved config can cover both kinds
                # (peft/tuners/lora/layer.py, dispatch_default); the base's layout decides here.
                other = LayerKind.LINEAR if module.kind is LayerKind.CONV1D else LayerKind.CONV1D
                module = dataclasses.replace(module, kind=other)
                expected = found
            if found != expected:
                fit.append(f"{where}: base tensor {target!r} has shape {list(found)}, the adapter's "
                           f"{module.kind.value} delta has {list(expected)}")
                continue
            if base.dtype(target) not in CONVERTIBLE:
                fit.append(f"{where}: base tensor {target!r} is {base.dtype(target)}; merging needs "
                           "a bf16/fp16/fp32 base (dequantize it first)")
                continue
            if module.use_dora and sign < 0:
                usage.append(f"{where} is DoRA: its merge rescales each row by m / ‖W + ΔW‖, which "
                             "cannot be undone without the base; unmerge refuses DoRA adapters")
                continue
            if module.use_dora and w != 1.0:
                usage.append(f"{where} is DoRA and has weight {w:g}: the magnitude vector rescales "
                             "whole rows, so a weighted DoRA merge has no single meaning; give it "
                             "weight 1.0")
                continue
            terms.setdefault(target, []).append(Term(module, sign * w * module.scale, w, label))
            if module.lora_B_bias is not None:
                bias = target[: -len("weight")] + "bias"
                if bias not in base:
                    fit.append(f"{where} has lora_bias but the base layer has no bias ({bias!r} "
                               "is missing); PEFT refuses this merge too")
                elif tuple(base.shape(bias)) != tuple(shape_of(module.lora_B_bias)):
                    fit.append(f"{where}: lora_B.bias has shape {list(shape_of(module.lora_B_bias))}, "
                               f"base {bias!r} has {list(base.shape(bias))}")
                else:
                    terms.setdefault(bias, []).append(
                        Term(module, sign * w * module.scale, w, label, part="bias"))
        for name, src in a.modules_to_save.items():
            target = _resolve(base, name)
            where = f"{label}: modules_to_save tensor {name!r}"
            if target is None:
                fit.append(f"{where} has no counterpart in the base")
                continue
            if tuple(shape_of(src)) != tuple(base.shape(target)):
                fit.append(f"{where} has shape {list(shape_of(src))}, base {target!r} has "
                           f"{list(base.shape(target))}")
                continue
            if target in replacements:
                usage.append(f"{where}: {replacements[target][1]} also carries a replacement for "
                             f"{target!r}; two adapters cannot both replace one tensor (merge them "
                             "one at a time, or drop one)")
                continue
            replacements[target] = (src, label)

    for name, ts in terms.items():
        if any(t.dora for t in ts) and len(ts) > 1:
            usage.append(f"base tensor {name!r}: a DoRA module ({ts[0].adapter}) and another "
                         "adapter both change it; DoRA's per-row rescaling is defined for one "
                         "adapter, merge them one at a time")
        if name in replacements:
            usage.append(f"base tensor {name!r} is replaced by modules_to_save of "
                         f"{replacements[name][1]} and changed by a LoRA module of {ts[0].adapter}; "
                         "the two cannot be combined")
    if usage:
        raise UsageError(f"cannot merge: {_listed(usage)}")
    if fit:
        raise BaseMismatchError(f"adapter and base do not fit: {_listed(fit)}; is {base.path} the "
                                "base these adapters were trained on?")

    warnings: list[str] = []
    plans: dict[str, TensorPlan] = {}
    for name, ref in base.items():
        dt = out_dtype if (out_dtype and ref.dtype in CONVERTIBLE) else ref.dtype
        if name in replacements:
            src, label = replacements[name]
            if sign < 0:
                if restore is not None and name in restore:
                    plans[name] = TensorPlan(name, ref, dt, Action.REPLACE, replacement=restore.ref(name))
                else:
                    plans[name] = TensorPlan(name, ref, dt, Action.COPY if dt == ref.dtype else Action.CAST)
                    warnings.append(f"{name}: replaced by modules_to_save of {label}; the original is "
                                    "not in the merged checkpoint, so it stays as merged (pass --base "
                                    "to restore it)")
            else:
                plans[name] = TensorPlan(name, ref, dt, Action.REPLACE, replacement=src)
        elif name in terms:
            plans[name] = TensorPlan(name, ref, dt, Action.MERGE, terms=terms[name])
        else:
            plans[name] = TensorPlan(name, ref, dt, Action.COPY if dt == ref.dtype else Action.CAST)

    plan = MergePlan(base=base, adapters=list(adapters), shards=[], dtype=out_dtype, sign=sign,
                     warnings=warnings)
    _plan_layout(plan, plans, max_shard_size)
    return plan


def _data_order(refs: Iterable[TensorRef]) -> list[TensorRef]:
    return sorted(refs, key=lambda r: r.info.start)


def _plan_layout(plan: MergePlan, plans: dict[str, TensorPlan], max_shard_size: int | None) -> None:
    """Output files: the base's shards (or new ones of at most ``max_shard_size``), indexes, and
    the other files of the model directory."""
    base = plan.base
    root = base.path
    if base.path.is_file():
        plan.single_file = True
        st = SafetensorsFile(base.path)
        tensors = [plans[r.info.name] for r in _data_order(st.ref(n) for n in st.keys())]
        if max_shard_size:
            raise UsageError("--max-shard-size needs a model directory; the base is a single file")
        plan.shards.append(ShardPlan("", tensors, dict(st.metadata)))
        return

    by_file: dict[Path, list[TensorPlan]] = {}
    for t in plans.values():
        by_file.setdefault(t.src.file.path, []).append(t)
    index_of = {idx.parent: idx for idx in base.index_files}
    groups: dict[Path, list[Path]] = {}  # model directory (root or component) -> its files
    for f in base.files:
        groups.setdefault(f.parent, []).append(f)
    for d, files in groups.items():
        rel_dir = d.relative_to(root)
        idx = index_of.get(d)
        if max_shard_size:
            _reshard(plan, d, files, by_file, idx, max_shard_size)
            continue
        for f in files:
            tensors = sorted(by_file.get(f, []), key=lambda t: t.src.info.start)
            meta = dict(tensors[0].src.file.metadata) if tensors else dict(SafetensorsFile(f).metadata)
            plan.shards.append(ShardPlan(str(rel_dir / f.name), tensors, meta))
        if idx is not None:
            rel = str(idx.relative_to(root))
            if plan.dtype is None:
                plan.indexes[rel] = boundary.read_bytes(idx)  # unchanged: copied byte for byte
            else:
                data = boundary.read_json(idx)
                total = sum(t.nbytes for f in files for t in by_file.get(f, []))
                data.setdefault("metadata", {})["total_size"] = total
                plan.indexes[rel] = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    for src, rel in base.other_files():  # inside the base's folder, regular files (loratool.boundary)
        rel = Path(rel)
        stale = src.suffix in PICKLE_SUFFIXES or src.suffix == ".safetensors" \
            or src.name.endswith(".safetensors.index.json")
        if stale:
            plan.warnings.append(f"{rel}: not copied: weights that are not part of the checkpoint "
                                 "(they would not hold the merge)")
            continue
        plan.copies.append((src, str(rel)))
        if plan.dtype is not None and src.name == "config.json" and src.parent in groups:
            try:
                cfg = boundary.read_json(src)
            except InputError:
                continue
            keys = [k for k in ("torch_dtype", "dtype") if k in cfg] if isinstance(cfg, dict) else []
            if keys:
                plan.json_updates[str(rel)] = {k: TORCH_NAMES[plan.dtype] for k in keys}


def _reshard(plan: MergePlan, d: Path, files: list[Path], by_file: dict[Path, list[TensorPlan]],
             idx: Path | None, limit: int) -> None:
    """transformers' rule: tensors in the base's order, a new shard when the next tensor would go
    past the limit (a tensor larger than the limit gets a shard of its own)."""
    root = plan.base.path
    rel_dir = d.relative_to(root)
    order = [t for f in files for t in sorted(by_file.get(f, []), key=lambda t: t.src.info.start)]
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for t in order:
        if groups[-1] and size + t.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    stem = "diffusion_pytorch_model" if files[0].name.startswith("diffusion_pytorch_model") else "model"
    meta = dict(SafetensorsFile(files[0]).metadata) or {"format": "pt"}
    if len(groups) == 1:
        plan.shards.append(ShardPlan(str(rel_dir / f"{stem}.safetensors"), groups[0], meta))
        return
    weight_map: dict[str, str] = {}
    for i, g in enumerate(groups, 1):
        fname = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        plan.shards.append(ShardPlan(str(rel_dir / fname), g, meta))
        weight_map.update({t.key: fname for t in g})
    extra: dict[str, Any] = {}
    if idx is not None:
        old = boundary.read_json(idx)
        meta = old.get("metadata") if isinstance(old, dict) else None
        extra = {k: v for k, v in meta.items() if k != "total_size"} if isinstance(meta, dict) else {}
    index = {"metadata": {**extra, "total_size": sum(t.nbytes for t in order)},
             "weight_map": dict(sorted(weight_map.items()))}
    plan.indexes[str(rel_dir / f"{stem}.safetensors.index.json")] = (json.dumps(index, indent=2) + "\n").encode()


# -- the arithmetic -----------------------------------------------------------------------------

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
        return row_spans(rows, max(1, CAST_BLOCK_BYTES // max(1, cols * DTYPES[t.src.dtype][0])))
    if t.action is not Action.MERGE or len(shape) < 2:
        return [(0, rows)]
    if t.kind is LayerKind.CONV2D or (t.dora and t.kind is not LayerKind.LINEAR):
        return [(0, rows)]  # computed whole, as PEFT does (DoRA's norm spans the columns here)
    target = block_bytes or (BLOCK_BYTES if device == "cpu" else GPU_BLOCK_BYTES)
    return row_spans(rows, block_rows(cols, target=target))


class TensorMath:
    """The merged value of one base tensor, one row span at a time.

    ``dtype`` float32 gives the executor's arithmetic (PEFT's, see the module docstring); float64
    gives parity's reference (same formula, exact products and sums up to float64 rounding).
    """

    def __init__(self, t: TensorPlan, dtype: "torch.dtype", device: str = "cpu", reuse: bool = False):
        import torch

        self.t = t
        self.dtype = dtype
        self.device = device
        # reuse: ``rows`` returns the same buffer every time (the caller copies it out before the
        # next call): no fresh pages to fault in for every block
        self.reuse = reuse
        self._acc: "torch.Tensor | None" = None
        self.factors: list[tuple[Term, Any, Any]] = []
        for term in t.terms:
            if term.part == "bias":
                self.factors.append((term, load_tensor(term.module.lora_B_bias).to(device, dtype), None))
            elif term.module.kind is LayerKind.CONV2D:
                self.factors.append((term, term.module.B().to(device, dtype), term.module.A().to(device, dtype)))
            else:
                b2, a2 = term.module.factors_2d(dtype)
                self.factors.append((term, b2.to(device), a2.to(device)))
        # One adapter at weight ±1 (a plain merge, or PEFT's unmerge: W - (B@A)·s): PEFT's bits are
        # the promise, see ``_fused``
        self.peft_exact = len(t.terms) == 1 and abs(t.terms[0].coef) == t.terms[0].module.scale
        self.magnitude = None
        if t.dora:
            self.magnitude = load_tensor(t.terms[0].module.magnitude).to(device, dtype).reshape(-1)
        self._tmp: "torch.Tensor | None" = None

    def delta(self, term: Term, b, a, i: int, j: int) -> "torch.Tensor":
        """coef · ΔW for rows [i, j) of the base tensor, in its layout."""
        import torch
        import torch.nn.functional as F

        kind = term.module.kind
        if term.part == "bias":
            return (b * term.coef)[i:j]
        if kind is LayerKind.LINEAR:
            n = j - i
            if self._tmp is None or self._tmp.numel() < n * a.shape[1]:
                self._tmp = torch.empty(n * a.shape[1], dtype=self.dtype, device=self.device)
            d = torch.mm(b[i:j], a, out=self._tmp[: n * a.shape[1]].view(n, a.shape[1]))
            return d.mul_(term.coef)
        if kind in (LayerKind.CONV1D, LayerKind.EMBEDDING):
            return torch.mm(b, a[:, i:j]).mul_(term.coef).T
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
            if not self._fused(term, b):
                acc.add_(self.delta(term, b, a, i, j))
            elif term.module.kind is LayerKind.LINEAR:
                acc.addmm_(b[i:j], a, alpha=term.coef)
            else:  # rows of (B @ A).T
                acc.addmm_(a[:, i:j].T, b.T, alpha=term.coef)
        return acc

    def _fused(self, term: Term, b) -> bool:
        """Whether ``addmm_(…, alpha=coef)`` may replace mm, mul_ and add_ (one pass, one FMA
        rounding per product instead of two roundings: at least as accurate).

        For PEFT's bits (``peft_exact``) only when coef = 2^k, a Linear, and r ≤ 128: then
        coef·(B@A) is exact and MKL's fused alpha·(B@A) + V rounds like PEFT's (B@A)·s, + W."""
        import torch

        if self.dtype != torch.float32 or self.device != "cpu" or term.part != "weight":
            return False
        if term.module.kind is LayerKind.CONV2D:
            return False
        if not self.peft_exact:
            return True
        return (term.module.kind is LayerKind.LINEAR and b.shape[1] <= 128 and term.coef != 0
                and abs(math.frexp(term.coef)[0]) == 0.5)

    def dora_factor(self, v: "torch.Tensor", i: int, j: int) -> "torch.Tensor":
        """m / ‖V‖, shaped to broadcast over V's rows [i, j)."""
        import torch

        kind = self.t.kind
        if kind is LayerKind.LINEAR:
            return (self.magnitude[i:j] / torch.linalg.norm(v, dim=1)).view(-1, 1)
        if kind in (LayerKind.CONV1D, LayerKind.EMBEDDING):
            # PEFT: the norm of transpose(W) + delta.T along dim 1, i.e. per column of W
            return (self.magnitude / torch.linalg.norm(v.T, dim=1)).view(1, -1)
        # Conv2d: over (in, kh, kw) of each output channel
        norm = v.norm(p=2, dim=tuple(range(1, v.dim())), keepdim=True).transpose(1, 0)
        return (self.magnitude[i:j] / norm.reshape(-1)).view(-1, *([1] * (v.dim() - 1)))

    def rows(self, w: "torch.Tensor", i: int, j: int) -> "torch.Tensor":
        """The merged rows [i, j) (in ``self.dtype``, not rounded) from the base rows ``w``."""
        acc = self.values(w, i, j)
        if self.magnitude is not None:
            acc.mul_(self.dora_factor(acc, i, j))
        return acc


class _CudaMath(TensorMath):
    """The linear kinds through the Triton kernel (whole tensors on the GPU); the rest in torch."""

    def rows(self, w, i, j):
        import torch

        from loratool.kernels import merge as kernels

        kind = self.t.kind
        if kind not in (LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.EMBEDDING) or \
                any(term.part == "bias" for term, _, _ in self.factors) or \
                (self.t.dora and kind is not LayerKind.LINEAR):
            return super().rows(w, i, j)
        w = w.to(self.device)
        if kind is LayerKind.LINEAR:
            bs, as_ = [b[i:j] for _, b, _ in self.factors], [a for _, _, a in self.factors]
        else:  # rows of (B @ A).T = A[:, rows].T @ B.T
            bs, as_ = [a[:, i:j].T for _, _, a in self.factors], [b.T for _, b, _ in self.factors]
        coeffs = [term.coef for term, _, _ in self.factors]
        # rounded once, by the kernel, to the output dtype (the executor's cast is then a no-op)
        out = torch.empty(w.shape, dtype=torch_dtype(self.t.dtype), device=self.device)
        if self.magnitude is not None:
            return kernels.dora_merge(w, bs, as_, coeffs, self.magnitude[i:j], out=out)
        return kernels.merge(w, bs, as_, coeffs, out=out)


# -- values that cannot overflow silently (issue 11) ----------------------------------------------

def check_overflow(plan: MergePlan) -> None:
    """Refuse, before anything is written, merges whose scale and factors would write Inf: per
    merged tensor, Σ |coef| · Σ_k max|B[:,k]|·max|A[k,:]| (``LoraModule.overflow``) against the
    output dtype's largest value, from the factors alone. The base's own values are not read
    (that would read the base twice); what they add is caught by the executor's last guard,
    which checks every written block (``_check_block``, ``npmerge.PlainMath``)."""
    effect = "the merge would write Inf"
    problems: dict[str, None] = {}  # ordered, without repeats (a module's weight and bias)
    mags: dict[tuple[int, int], Magnitudes] = {}
    for t in plan.tensors():
        if t.action is not Action.MERGE:
            continue
        limit, name = DTYPE_MAX[t.dtype], DTYPE_NAMES[t.dtype]
        bound, found = 0.0, False
        for term in t.terms:
            m, c = term.module, abs(term.coef)
            why = m.scale_overflow(limit, t.dtype, c, effect)
            if why is None:
                key = (id(m.lora_A), id(m.lora_B))
                if key not in mags:
                    mags[key] = m.magnitudes()
                mg = mags[key]
                if term.part == "bias":  # b + coef · lora_B.bias; the factors are the weight's term
                    bound += c * mg.bias
                    continue
                bound += c * mg.products
                why = m.overflow(limit, t.dtype, c, mg, effect)
                if why is None and term.dora:
                    # DoRA writes m · V / ‖V‖ (at most max|m|); ‖V‖ sums V² along rows or columns
                    # (by kind) in float32: bound the longer of the two
                    n = max(t.shape[0], t.numel // max(1, t.shape[0]))
                    if mg.magnitude > limit:
                        why = (f"its DoRA magnitude reaches {mg.magnitude:.3g}, past {name}'s largest value "
                               f"{limit:.3g}; {effect}; fix lora_magnitude_vector")
                    elif c * mg.products > math.sqrt(F32_MAX / n):
                        why = (f"scale {c:.3g} × factors reaches {c * mg.products:.3g}, so the squares that "
                               f"DoRA's row norms sum overflow float32 (max {F32_MAX:.3g}); the merge would write "
                               "zero or NaN rows; fix lora_alpha / alpha_pattern or the factors")
            if why:
                weighted = f" (at merge weight {term.weight:g}; lower it)" if term.weight not in (1.0, -1.0) else ""
                problems[f"{term.adapter}: module {m.name!r}: {why}{weighted}"] = None
                found = True
        if not found and not t.dora and bound > limit:  # several adapters (or a bias), each fine alone
            problems[f"base tensor {t.name!r}: the deltas of {', '.join(sorted({x.adapter for x in t.terms}))} "
                     f"together reach {bound:.3g}, past {name}'s largest value {limit:.3g}; {effect}; lower the "
                     "weights or fix the adapters' scales"] = None
    if problems:
        raise InputError(_listed(list(problems), limit=2))


def _nonfinite_error(t: TensorPlan, count: int, row: int, col: int, value: float, base: float) -> InputError:
    """The last guard's error: a block of ``t`` came out Inf/NaN where the base is finite."""
    limit, name = DTYPE_MAX[t.dtype], DTYPE_NAMES[t.dtype]
    where = f"{t.src.file.path}: tensor {t.name!r}"
    if t.action is Action.CAST:
        return InputError(f"{where}: converting it to {name} gives {count} Inf values where the base is finite "
                          f"(first at [{row}, {col}]: {base:.3g}, past {name}'s largest value {limit:.3g}); "
                          "nothing was written; choose a wider --dtype (bf16, fp32) or keep")
    adapters = ", ".join(sorted({x.adapter for x in t.terms}))
    return InputError(f"{where}: the merge gives {count} Inf/NaN values where the base is finite (first at "
                      f"[{row}, {col}]: base {base:.3g}, merged {value:.3g}; {name}'s largest value is {limit:.3g}); "
                      f"nothing was written; check {adapters} with `loratool validate` (lora_alpha, alpha_pattern, "
                      "factors) and the merge weights")


def _check_block(t: TensorPlan, w: "torch.Tensor", block: "torch.Tensor", i: int) -> None:
    """The last guard of the torch engines (CPU, and CUDA, whose blocks arrive here on the CPU):
    refuse a block that holds Inf/NaN where the base rows ``w`` are finite. One reduction over the
    written block (NaN propagates through aminmax); the mask only when that finds something."""
    import torch

    if not block.numel():
        return
    lo, hi = torch.aminmax(block)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    bad = (~torch.isfinite(block) & torch.isfinite(w.reshape(block.shape))).reshape(-1)
    count = int(bad.sum())
    if count:
        k = int(bad.nonzero()[0, 0])
        cols = max(1, block.numel() // max(1, block.shape[0] if block.dim() else 1))
        raise _nonfinite_error(t, count, i + k // cols, k % cols, float(block.reshape(-1)[k]),
                               float(w.reshape(-1)[k]))


# -- the executor -------------------------------------------------------------------------------

class MergeResult(BaseModel):
    """What ``merge``/``unmerge`` wrote."""

    operation: str  # "merge" | "unmerge"
    out: str
    base: str
    adapters: list[str]  # PATH:WEIGHT
    device: str
    dtype: str  # "keep" or the output dtype
    tensors: int
    merged: int  # tensors changed by LoRA deltas (weights and lora_bias biases)
    replaced: int  # modules_to_save (merge) or restored from the base (unmerge)
    copied: int  # raw bytes, never decoded
    cast: int  # converted to --dtype only
    files: int  # safetensors files written
    bytes_written: int
    seconds: float
    warnings: list[str] = []

    def describe(self) -> str:
        verb = "merged" if self.operation == "merge" else "unmerged"
        parts = [f"{self.merged} {verb}"]
        if self.replaced:
            parts.append(f"{self.replaced} {'replaced' if self.operation == 'merge' else 'restored'}")
        parts.append(f"{self.copied} copied raw")
        if self.cast:
            parts.append(f"{self.cast} cast to {self.dtype}")
        return (f"wrote {self.out}: {self.tensors} tensors ({', '.join(parts)}) in {self.files} "
                f"file(s), {self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f} s on {self.device}")


class _Stop(Exception):
    pass


class _Worker:
    """A thread fed through a bounded queue; errors surface in the caller at the next put/close."""

    _END = object()

    def __init__(self, name: str, depth: int = QUEUE_DEPTH):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "_Worker":
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is self._END or self.stop.is_set():
                    return
                self.handle(item)
        except BaseException as e:  # handed to the main thread
            self.error = e
            self.stop.set()

    def handle(self, item) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise OutputError("internal error: the writer thread stopped") from self.error

    def close(self) -> None:
        self.put(self._END)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.stop.set()
        while True:  # unblock the thread and let it see the stop flag
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        try:
            self.q.put_nowait(self._END)
        except queue.Full:
            pass
        self.thread.join(timeout=10)


@dataclass
class _Open:
    path: Path


@dataclass
class _Copy:
    src: Path
    offset: int
    nbytes: int


@dataclass
class _Skip:
    """Bytes the prefill wrote (the header, raw copies): the writer moves past them."""

    nbytes: int


class _Close:
    pass


def _libc_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``: start writing a range back
    without waiting for it (Linux; None elsewhere: the final fsync then does all the work)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; errors surface at the final fsync

    return start


_WRITE_BEHIND = _libc_sync_file_range()


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, nbytes: int, stop: threading.Event,
                advance: Callable[[int], None], where: Path, chunk: int = COPY_CHUNK,
                fast: bool = True) -> bool:
    """Copy ``nbytes`` from ``src`` at ``src_off`` to ``dst`` at ``dst_off``: in the kernel
    (``copy_file_range``: the bytes never enter our memory) or, where the filesystem refuses that,
    through a small buffer. Returns whether the kernel copy still works (the caller's ``fast``)."""
    while nbytes and fast:
        if stop.is_set():
            raise _Stop()
        try:
            n = os.copy_file_range(src, dst, min(nbytes, chunk), src_off, dst_off)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                fast = False  # e.g. across filesystems on old kernels: copy by hand
                break
            raise
        if n == 0:
            raise InputError(f"{where}: truncated while copying (expected {nbytes} more bytes)")
        src_off, dst_off, nbytes = src_off + n, dst_off + n, nbytes - n
        advance(n)
    while nbytes:
        if stop.is_set():
            raise _Stop()
        data = os.pread(src, min(nbytes, 8 << 20), src_off)
        if not data:
            raise InputError(f"{where}: truncated while copying (expected {nbytes} more bytes)")
        view = memoryview(data)
        while view:
            n = os.pwrite(dst, view, dst_off)
            view, dst_off = view[n:], dst_off + n
            advance(n)
        src_off, nbytes = src_off + len(data), nbytes - len(data)
    return fast


class _Prefill:
    """Writes what needs no torch while torch is imported (a second or more on one core, during
    which the other cores would idle; ``copy_file_range`` releases the GIL): creates the output
    files, writes their headers and copies the untouched tensors raw, starting their write-back.
    The writer waits for a file to exist before writing the computed tensors into it, at their
    offsets; the two write different ranges of the same files.

    (Copying the base bytes of the tensors to merge into place too, for the merge to overwrite,
    was tried: it made the import slower and the stream no faster.)"""

    def __init__(self, plan: MergePlan, root: Path, progress: Callable[[int], None] | None):
        self.plan = plan
        self.root = root
        self.progress = progress
        self.written = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.created: dict[Path, threading.Event] = {self.path(s): threading.Event() for s in plan.shards}
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="loratool-prefill", daemon=True)

    def path(self, shard: ShardPlan) -> Path:
        return self.root if self.plan.single_file else self.root / shard.rel

    def start(self) -> "_Prefill":
        self.thread.start()
        return self

    def _advance(self, n: int) -> None:
        with self._lock:
            self.written += n
        if self.progress is not None and n:
            self.progress(n)

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        outs: list[tuple[ShardPlan, int]] = []
        try:
            fast = hasattr(os, "copy_file_range")
            for shard in self.plan.shards:
                path = self.path(shard)
                if self.plan.single_file:
                    os.unlink(path)  # atomic_path created the temporary file: write it from scratch
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                outs.append((shard, fd))
                self.created[path].set()
            for shard, fd in outs:
                header = shard.header()
                os.pwrite(fd, header, 0)
                self._advance(len(header))
                for t, offset in _offsets(shard, len(header)):
                    if t.action is Action.COPY:
                        src = self._src(fds, t.src.file.path)
                        fast = _copy_range(src, fd, t.src.info.start, offset, t.src.nbytes, self.stop,
                                           self._advance, t.src.file.path, fast=fast)
                        if _WRITE_BEHIND is not None:
                            _WRITE_BEHIND(fd, offset, t.src.nbytes)
        except _Stop:
            pass
        except BaseException as e:  # handed to the main thread
            self.error = e
        finally:
            for fd in fds.values():
                os.close(fd)
            for _, fd in outs:
                os.close(fd)
            for ev in self.created.values():
                ev.set()  # never leave the writer waiting (it sees ``error``)

    @staticmethod
    def _src(fds: dict[Path, int], path: Path) -> int:
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = boundary.open_regular(path)  # inputs are opened read-only
        return fd

    def wait_created(self, path: Path) -> None:
        self.created[path].wait()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> int:
        self.thread.join()
        self.check()
        return self.written

    def abort(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _offsets(shard: ShardPlan, start: int) -> Iterator[tuple[TensorPlan, int]]:
    """Each tensor of ``shard`` with its offset in the output file (data after the header)."""
    offset = start
    for t in shard.tensors:
        yield t, offset
        offset += t.nbytes


class _Writer(_Worker):
    """Writes the computed tensors (row blocks) and replacements into the files the prefill
    created, at their offsets, in file order; starts write-back of what is final every 256 MB,
    so that the final fsync has little left."""

    def __init__(self, progress: Callable[[int], None] | None, prefill: _Prefill):
        super().__init__("loratool-writer")
        self.progress = progress
        self.prefill = prefill
        self.fd: int | None = None
        self.pos = 0  # where the next byte goes in the open file
        self.sources: dict[Path, int] = {}
        self.written = 0
        self._fast_copy = hasattr(os, "copy_file_range")
        self._unsynced = 0
        self._synced_to = 0
        self._syncs: list[threading.Thread] = []

    def _src(self, path: Path) -> int:
        fd = self.sources.get(path)
        if fd is None:
            fd = self.sources[path] = boundary.open_regular(path)  # inputs are opened read-only
        return fd

    def _advance(self, n: int) -> None:
        self.pos += n
        self.written += n
        self._unsynced += n
        if self._unsynced >= SYNC_EVERY:
            self._sync_behind()
        if self.progress is not None and n:
            self.progress(n)

    def _sync_behind(self) -> None:
        """Start writing back [where the last call stopped, here) in the background, without
        waiting for it (``sync_file_range``; an ``fdatasync`` here waited for the whole file and
        slowed the stream by what it saved the final fsync). One at a time; a dup'd descriptor,
        so that closing the file does not race with it."""
        if _WRITE_BEHIND is None or (self._syncs and self._syncs[-1].is_alive()):
            return
        self._unsynced = 0
        fd, off, n = os.dup(self.fd), self._synced_to, self.pos - self._synced_to
        self._synced_to = self.pos

        def sync() -> None:
            try:
                _WRITE_BEHIND(fd, off, n)
            finally:
                os.close(fd)

        t = threading.Thread(target=sync, name="loratool-sync", daemon=True)
        t.start()
        self._syncs.append(t)

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, self.pos)
            view = view[n:]
            self._advance(n)

    def handle(self, item) -> None:
        if isinstance(item, _Open):
            self.prefill.wait_created(item.path)
            self.fd = os.open(item.path, os.O_WRONLY)
            self.pos = self._synced_to = 0
        elif isinstance(item, _Close):
            os.close(self.fd)
            self.fd = None
        elif isinstance(item, _Skip):
            self.pos += item.nbytes
        elif isinstance(item, _Copy):
            self._fast_copy = _copy_range(self._src(item.src), self.fd, item.offset, self.pos, item.nbytes,
                                          self.stop, self._advance, item.src, fast=self._fast_copy)
        elif len(item):  # computed bytes: a numpy array (or bytes)
            self._write(item)

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            if self.fd is not None:
                os.close(self.fd)
            for fd in self.sources.values():
                os.close(fd)
            for t in self._syncs:
                t.join()


class _Reader:
    """Reads the row blocks of the tensors to compute, ahead of the math, in a thread: with
    ``pread`` into reused buffers, or (``mapped``, for numpy, which takes read-only buffers) as
    views of a read-only mapping of each tensor, populated here (``MAP_POPULATE``), so that the
    math threads find the pages mapped and no bytes are copied. A mapping is released when the
    last view of it is dropped: a few tensors at a time count toward the resident set."""

    _END = object()

    def __init__(self, jobs: list[tuple[TensorPlan, list[tuple[int, int]]]], mapped: bool = False):
        self.jobs = jobs
        self.mapped = mapped and hasattr(mmap, "MAP_POPULATE")
        self.out: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        # buffers handed back by ``release``: reused, so that blocks do not fault in fresh pages
        self.free: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH + 2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="loratool-reader", daemon=True)

    def start(self) -> "_Reader":
        self.thread.start()
        return self

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        try:
            item: Any = self._END
            try:
                for block in self._blocks(fds):
                    self._put(block)
            except _Stop:
                return
            except BaseException as e:  # handed to the main thread
                item = e
            self._put(item)
        except _Stop:
            pass
        finally:
            for fd in fds.values():
                os.close(fd)

    def _blocks(self, fds: dict[Path, int]) -> Iterator[tuple]:
        """(tensor, i, j, buf, n): rows [i, j) of the tensor as the first n bytes of buf."""
        for t, spans in self.jobs:
            path = t.src.file.path
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = boundary.open_regular(path)  # inputs are opened read-only
            rows = t.shape[0] if t.shape else 1
            row_bytes = t.src.nbytes // max(1, rows)
            if self.mapped and t.src.nbytes:
                yield from self._mapped(t, spans, fd, row_bytes)
                continue
            for i, j in spans:
                n = (j - i) * row_bytes
                buf = self._buffer(n)
                view, off, got = memoryview(buf)[:n], t.src.info.start + i * row_bytes, 0
                while got < n:
                    k = os.preadv(fd, [view[got:]], off + got)
                    if k == 0:
                        raise InputError(f"{path}: truncated while reading tensor {t.key!r}")
                    got += k
                yield t, i, j, buf, n

    @staticmethod
    def _mapped(t: TensorPlan, spans: list[tuple[int, int]], fd: int, row_bytes: int) -> Iterator[tuple]:
        start, end = t.src.info.start, t.src.info.start + t.src.nbytes
        if os.fstat(fd).st_size < end:  # mapped pages past the end would raise SIGBUS
            raise InputError(f"{t.src.file.path}: truncated: tensor {t.key!r} ends at byte {end}")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, end - base, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE, prot=mmap.PROT_READ,
                       offset=base)
        view = memoryview(mm)
        del mm  # the views keep the mapping alive; the last one dropped unmaps it
        for i, j in spans:
            off = start - base + i * row_bytes
            yield t, i, j, view[off:off + (j - i) * row_bytes], (j - i) * row_bytes

    def _buffer(self, n: int) -> bytearray:
        try:
            buf = self.free.get_nowait()
            if len(buf) >= n:
                return buf
        except queue.Empty:
            pass
        return bytearray(max(n, 1))

    def release(self, buf) -> None:
        """The main thread is done with a block's buffer (no tensor may view it any more)."""
        if isinstance(buf, bytearray) and len(buf) <= POOL_MAX_BYTES:
            try:
                self.free.put_nowait(buf)
            except queue.Full:
                pass

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop()

    def get(self):
        while True:
            try:
                item = self.out.get(timeout=0.1)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.out.empty():
                    raise OutputError("internal error: the reader thread stopped") from None
        if item is self._END:
            raise OutputError("internal error: the reader ran out of blocks")
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self) -> None:
        self.stop.set()
        while True:
            try:
                self.out.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


def _cpu_only_torch() -> bool:
    """Whether torch can only run on the CPU here: a CPU-only build (read from its ``version.py``)
    or no GPU device on the machine, found without importing torch (a second or more; see
    ``loratool.npmerge``)."""
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
    w = torch.frombuffer(buf, dtype=dt, count=n // dt.itemsize) if n else torch.empty(0, dtype=dt)
    w = w.reshape((j - i,) + t.shape[1:] if t.shape else ())
    out = torch_dtype(t.dtype)
    if t.action is Action.CAST:
        block = w.to(out)
    else:
        acc = math_.rows(w, i, j)
        # a fresh tensor for the writer (on the CPU): acc is reused for the next block
        block = torch.empty(acc.shape, dtype=out).copy_(acc)
    _check_block(t, w, block, i)
    return block.reshape(-1).view(torch.uint8).numpy()


def _numpy_block(t: TensorPlan, engine, reader: "_Reader", buf, n: int, i: int, j: int, outs: list):
    """Rows [i, j) of ``t`` through ``loratool.npmerge`` (in a worker thread); the read buffer is
    handed back to the reader when done. ``outs``: output arrays to reuse (handed back by the
    caller)."""
    import numpy as np

    from loratool import npmerge

    dtype = t.src.dtype
    try:
        w = npmerge.raw_array(buf, dtype, n // npmerge.RAW[dtype].itemsize).reshape(j - i, -1)
        try:
            out = outs.pop()
        except IndexError:
            out = None
        size = w.size * npmerge.RAW[engine.dtype].itemsize
        if out is None or out.nbytes < size:
            out = np.empty(-(-max(size, BLOCK_BYTES) // 8) * 8, np.uint8)  # any itemsize views it
        return engine.rows(w, i, j, out.view(npmerge.RAW[engine.dtype]))
    except npmerge.NonFiniteBlock as e:
        raise _nonfinite_error(t, e.count, e.row, e.col, e.value, e.base) from None
    finally:
        reader.release(buf)


def _numpy_plan(plan: MergePlan, device: str, block_bytes: int | None = None) -> bool:
    """Whether every computed tensor of ``plan`` goes through ``loratool.npmerge`` (then torch is
    never imported), rather than torch."""
    if device != "cpu" or os.environ.get("LORATOOL_MERGE_ENGINE", "").lower() == "torch":
        return False
    from loratool import npmerge

    for t in plan.tensors():
        if t.action is Action.CAST or (t.action is Action.MERGE and not npmerge.eligible(t, tensor_spans(t, device, block_bytes))):
            return False
        if t.action is Action.REPLACE and not isinstance(_replacement_bytes(t, probe=True), _Copy):
            return False
    return True


def _replacement_bytes(t: TensorPlan, probe: bool = False):
    """A modules_to_save tensor's bytes: a raw copy, or (``probe``: None) a conversion in torch."""
    src = t.replacement
    if isinstance(src, TensorRef) and src.dtype == t.dtype:
        return _Copy(src.file.path, src.info.start, src.nbytes)
    if probe:
        return None
    import torch

    return load_tensor(src).to(torch_dtype(t.dtype)).reshape(t.shape).reshape(-1).view(torch.uint8).numpy()


def execute(
    plan: MergePlan,
    out: str | os.PathLike,
    overwrite: bool = False,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    before_commit: Callable[[Path, MergePlan], None] | None = None,
    fail_after_tensors: int | None = None,
    block_bytes: int | None = None,
) -> int:
    """Write ``plan`` to ``out`` atomically; return the bytes of safetensors data written.

    ``progress(n)`` is called from the writer threads with each number of bytes written.
    ``before_commit(tmp_dir, plan)`` runs when everything is written, before the rename (a place
    to add files, e.g. a manifest, that must appear together with the output).
    ``fail_after_tensors``: a testing hook, raises after that many tensors have been queued.
    """
    return _execute(plan, out, overwrite, device, progress, before_commit, fail_after_tensors, block_bytes)[0]


def _execute(plan: MergePlan, out, overwrite, device, progress, before_commit, fail_after,
             block_bytes) -> tuple[int, str]:
    """``execute``, with ``device`` resolved (torch imported) only once the prefill runs; returns
    (bytes written, the device)."""
    out = Path(out)
    check_overflow(plan)  # before any byte is written
    ctx = atomic_path(out, overwrite=overwrite) if plan.single_file else atomic_dir(out, overwrite=overwrite)
    with ctx as tmp:
        root = tmp
        if not plan.single_file:
            _write_other_files(plan, root)
        if resolve_device(device, probe=True) == "cpu" and _numpy_plan(plan, "cpu", block_bytes):
            direct = _direct_supported(root.parent if plan.single_file else root)
            written = _stream_direct(plan, root, progress, fail_after, block_bytes, direct)
            if before_commit is not None:
                before_commit(root, plan)
            return written, "cpu"
        prefill = _Prefill(plan, root, progress).start()
        try:
            dev = resolve_device(device)  # imports torch: a second or so, which the prefill uses
            written = _stream(plan, root, dev, progress, fail_after, block_bytes, prefill)
            written += prefill.finish()
        except BaseException:
            prefill.abort()  # before atomic_dir removes the directory it writes into
            raise
        if before_commit is not None:
            before_commit(root, plan)
    return written, dev


def _write_other_files(plan: MergePlan, root: Path) -> None:
    """Config, tokenizer and the other files of the model directory, and the indexes."""
    for src, rel in plan.copies:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel in plan.json_updates:
            data = boundary.read_json(src)
            data.update(plan.json_updates[rel])
            dest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            boundary.copy_regular(src, dest)  # a regular file, whatever the source was
    for rel, content in plan.indexes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)


def _stream(plan: MergePlan, root: Path, device: str, progress, fail_after: int | None,
            block_bytes: int | None, prefill: _Prefill) -> int:
    """Reads, computes (in torch) and writes the tensors that are not raw copies."""
    import torch

    jobs = [(t, tensor_spans(t, device, block_bytes)) for t in plan.tensors()
            if t.action in (Action.MERGE, Action.CAST)]
    spans = {id(t): s for t, s in jobs}
    writer = _Writer(progress, prefill).start()
    reader = _Reader(jobs).start()
    done = 0
    threads = torch.get_num_threads()
    # One math thread: the reader and the writer need the other cores, and torch's OpenMP workers
    # spin between the many small calls and take the cores the I/O threads need.
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for shard in plan.shards:
                writer.put(_Open(prefill.path(shard)))
                writer.put(_Skip(len(shard.header())))  # the prefill wrote it
                for t in shard.tensors:
                    if fail_after is not None and done >= fail_after:
                        raise OutputError(f"simulated failure after {done} tensors (fail_after_tensors)")
                    if t.action is Action.COPY:
                        writer.put(_Skip(t.nbytes))  # the prefill copies it
                    elif t.action is Action.REPLACE:
                        writer.put(_replacement_bytes(t))
                    else:
                        engine = None
                        if t.action is Action.MERGE:
                            engine = (_CudaMath if device == "cuda" else TensorMath)(
                                t, _cpu_dtype(t, device), device, reuse=True)
                        for _ in spans[id(t)]:
                            bt, i, j, buf, n = reader.get()
                            assert bt is t, "reader and executor disagree on the order of blocks"
                            block = _compute_block(t, engine, buf, n, i, j)
                            reader.release(buf)
                            writer.put(block)
                    done += 1
                writer.put(_Close())
        writer.close()
        reader.thread.join()
    except BaseException:
        reader.abort()
        writer.abort()
        raise
    finally:
        torch.set_num_threads(threads)
    return writer.written


# -- plain merges on the CPU: numpy math, O_DIRECT output -------------------------------------

def _direct_supported(where: Path) -> bool:
    """Whether files in the folder ``where`` take O_DIRECT writes (tmpfs, for one, refuses them);
    ``LORATOOL_DIRECT_IO=0`` turns them off."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get("LORATOOL_DIRECT_IO", "1") == "0":
        return False
    import tempfile

    fd0, probe = tempfile.mkstemp(prefix=".loratool-direct-", dir=where)
    os.close(fd0)
    buf = mmap.mmap(-1, DIRECT_ALIGN)
    try:
        fd = os.open(probe, os.O_WRONLY | flag)
        try:
            return os.pwrite(fd, buf, 0) == DIRECT_ALIGN
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        buf.close()
        os.unlink(probe)


class _DirectIO(_Worker):
    """Writes full chunks with O_DIRECT, in a thread, from a few page-aligned buffers: the bytes
    go from our buffer to the device (no copy into the page cache, no write-back to wait for at
    the fsync), while the math goes on."""

    def __init__(self, progress: Callable[[int], None] | None):
        super().__init__("loratool-direct-io", depth=DIRECT_BUFFERS)
        self.progress = progress
        self.written = 0
        self.free: queue.Queue = queue.Queue()
        self.idle = threading.Condition()
        self.busy = 0
        for _ in range(DIRECT_BUFFERS):
            self.free.put(mmap.mmap(-1, DIRECT_CHUNK))  # anonymous mappings: page-aligned

    def buffer(self) -> mmap.mmap:
        while True:
            if self.error is not None:
                raise self.error
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise OutputError("internal error: the writer thread stopped") from self.error

    def submit(self, fds: tuple[int, int], buf: mmap.mmap, offset: int, length: int, payload: int) -> None:
        with self.idle:
            self.busy += 1
        self.put((*fds, buf, offset, length, payload))

    def handle(self, item) -> None:
        fd, buffered, buf, offset, length, payload = item
        try:
            view = memoryview(buf)[:length]
            while view:
                # after a short write (a file-size limit, a full disk) the rest is unaligned: it
                # goes through the page cache, where the error, if any, is then reported
                # (a limit can also cut an O_DIRECT write to an unaligned length before it starts,
                # which fails with EINVAL: the same bytes then go through the page cache too)
                n = 0
                whole = len(view) // DIRECT_ALIGN * DIRECT_ALIGN  # the file's tail goes buffered
                if offset % DIRECT_ALIGN == 0 and whole:
                    try:
                        n = os.pwrite(fd, view[:whole], offset)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                if n == 0:
                    n = os.pwrite(buffered, view, offset)
                view, offset = view[n:], offset + n
            view.release()
            self.written += payload
            if self.progress is not None:
                self.progress(payload)
        finally:
            self.free.put(buf)
            with self.idle:
                self.busy -= 1
                self.idle.notify_all()

    def drain(self) -> None:
        """Wait until every submitted chunk is written."""
        with self.idle:
            while self.busy and self.error is None and self.thread.is_alive():
                self.idle.wait(0.1)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        super().close()
        self._unmap()

    def abort(self) -> None:
        super().abort()
        self._unmap()

    def _unmap(self) -> None:
        while True:
            try:
                self.free.get_nowait().close()
            except queue.Empty:
                return
            except BufferError:  # still viewed by a failed write: left to the garbage collector
                continue


class _DirectFile:
    """One output file, written front to back in DIRECT_CHUNK pieces through ``_DirectIO``: with
    O_DIRECT (``direct``), the last piece's whole pages too and its tail through the page cache
    (never past the file's size, which a file-size limit would refuse); else all through the page
    cache."""

    def __init__(self, path: Path, size: int, io: _DirectIO, direct: bool):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o644)
        try:
            self.buffered = os.open(path, os.O_WRONLY)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.io = io
        self.pos = 0  # file offset of the buffer's first byte
        self.buf = io.buffer()
        self.fill = 0

    def put(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            k = min(len(view), DIRECT_CHUNK - self.fill)
            self.buf[self.fill:self.fill + k] = view[:k]
            self.fill += k
            view = view[k:]
            if self.fill == DIRECT_CHUNK:
                self._flush()

    def copy_from(self, src: int, offset: int, nbytes: int, where: Path, key: str) -> None:
        """``nbytes`` of the file ``src`` from ``offset``, read straight into the buffer."""
        while nbytes:
            k = min(nbytes, DIRECT_CHUNK - self.fill)
            got = os.preadv(src, [memoryview(self.buf)[self.fill:self.fill + k]], offset)
            if got == 0:
                raise InputError(f"{where}: truncated while reading tensor {key!r}")
            self.fill, offset, nbytes = self.fill + got, offset + got, nbytes - got
            if self.fill == DIRECT_CHUNK:
                self._flush()

    def _flush(self) -> None:
        n = self.fill
        self.io.submit((self.fd, self.buffered), self.buf, self.pos, n, n)
        self.pos += n
        self.fill = 0
        self.buf = None
        self.buf = self.io.buffer()

    def close(self) -> None:
        if self.fill:
            self._flush()
        self.io.free.put(self.buf)
        self.buf = None
        self.io.drain()
        if self.pos != self.size:
            raise OutputError(f"internal error: wrote {self.pos} bytes of a {self.size}-byte file")
        os.close(self.fd)
        os.close(self.buffered)
        self.fd = self.buffered = -1


def _stream_direct(plan: MergePlan, root: Path, progress, fail_after: int | None,
                   block_bytes: int | None, direct: bool) -> int:
    """The whole output of a plain merge on the CPU (``_numpy_plan``): ``loratool.npmerge`` math
    in worker threads on blocks of mapped base rows, and each file written front to back, with
    O_DIRECT where the filesystem takes it (``direct``); untouched tensors are read into the same
    buffers (no torch import; with O_DIRECT, nothing for the page cache to write back)."""
    from loratool._threads import default_workers
    from loratool.npmerge import PlainMath, single_threaded_blas

    jobs = [(t, tensor_spans(t, "cpu", block_bytes)) for t in plan.tensors() if t.action is Action.MERGE]
    spans = {id(t): s for t, s in jobs}
    reader = _Reader(jobs, mapped=True).start()
    io = _DirectIO(progress).start()
    pool = ThreadPoolExecutor(default_workers(), thread_name_prefix="loratool-math")
    sources: dict[Path, int] = {}
    files: list[_DirectFile] = []
    pending: list[Future] = []
    done = 0

    def src(path: Path) -> int:
        if path not in sources:
            sources[path] = boundary.open_regular(path)  # inputs are opened read-only
        return sources[path]

    outs: list = []  # output arrays, reused (list.pop and append are atomic)

    def drain(out: _DirectFile, keep: int = 0) -> None:
        while len(pending) > keep:
            block = pending.pop(0).result()
            out.put(block)
            outs.append(block.base if block.base is not None else block)

    try:
        with single_threaded_blas():
            for shard in plan.shards:
                path = root if plan.single_file else root / shard.rel
                path.parent.mkdir(parents=True, exist_ok=True)
                out = _DirectFile(path, shard.nbytes, io, direct)
                files.append(out)
                out.put(shard.header())
                for t in shard.tensors:
                    if fail_after is not None and done >= fail_after:
                        raise OutputError(f"simulated failure after {done} tensors (fail_after_tensors)")
                    if t.action is Action.MERGE:
                        engine = PlainMath(t)
                        for _ in spans[id(t)]:
                            bt, i, j, buf, n = reader.get()
                            assert bt is t, "reader and executor disagree on the order of blocks"
                            pending.append(pool.submit(_numpy_block, t, engine, reader, buf, n, i, j, outs))
                            drain(out, keep=2 * QUEUE_DEPTH)
                    else:
                        drain(out)
                        ref = t.src if t.action is Action.COPY else t.replacement
                        out.copy_from(src(ref.file.path), ref.info.start, ref.nbytes, ref.file.path, t.key)
                    done += 1
                drain(out)
                out.close()
        io.close()
        reader.thread.join()
    except BaseException:
        for f in pending:
            f.cancel()
        pending.clear()
        reader.abort()
        io.abort()
        # the error travels on; a copy kept here would tie it to this frame (its views, mappings
        # and descriptors) in a cycle that only the garbage collector breaks
        io.error = None
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in sources.values():
            os.close(fd)
        for f in files:
            for fd in (f.fd, f.buffered):
                if fd >= 0:
                    os.close(fd)
    return io.written


# -- the entry points ---------------------------------------------------------------------------

def load_adapters(specs: Sequence[AdapterSpec]) -> list[LoadedAdapter]:
    from loratool.formats import load_adapter

    from loratool.adapter import require_usable

    loaded = []
    for spec in specs:
        adapter = load_adapter(spec.path)
        if not adapter.modules and not adapter.modules_to_save:
            raise InputError(f"{spec.path}: holds no LoRA modules and no modules_to_save; nothing to merge")
        # NaN/Inf or a non-finite scale would be written into the model: refuse before anything is
        require_usable(adapter)
        # A tensor we cannot place (a modules_to_save entry missing from the config, trainable
        # tokens…) would silently be left out of the merge: refuse instead.
        if adapter.format == "peft" and adapter.config and "components" not in adapter.config:
            from loratool.formats.peft import targeted

            skipped = [n for n in adapter.modules if targeted(adapter.config, n) is False]
            if skipped:
                raise InputError(f"{spec.path}: module {skipped[0]} (and {len(skipped) - 1} more) has weights but the "
                                 "config's target_modules/exclude_modules leave it out, so PEFT would not apply it; "
                                 "fix adapter_config.json so that the merge and PEFT agree")
        unknown = sorted(n for n in adapter.extra_tensors if not n.endswith(".base_layer.weight"))
        if unknown:
            raise InputError(f"{spec.path}: holds tensors that are neither LoRA factors nor modules_to_save of its "
                             f"config ({', '.join(unknown[:3])}{' …' if len(unknown) > 3 else ''}); merging would "
                             "leave them out (add them to modules_to_save in the config if they replace base tensors)")
        loaded.append(LoadedAdapter(spec, adapter))
    return loaded


def _check_paths(out: Path, inputs: Sequence[Path], overwrite: bool, single_file: bool) -> None:
    """The output check of ``loratool.boundary``, before any work is spent (the writer checks again)."""
    boundary.check_output(out, overwrite=overwrite, inputs=[p for p in inputs if os.path.lexists(p)],
                          kind="file" if single_file else "dir")


def _specs(adapters) -> list[AdapterSpec]:
    """``"a:0.7,b:0.3"``, or a list of such strings, paths and ``AdapterSpec``s."""
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    specs: list[AdapterSpec] = []
    for a in adapters:
        specs.extend([a] if isinstance(a, AdapterSpec) else parse_adapter_specs(os.fspath(a)))
    if not specs:
        raise UsageError("no adapter given; expected PATH[:WEIGHT][,PATH[:WEIGHT]...]")
    return specs


def merge(
    base: str | os.PathLike,
    adapters: str | Sequence[AdapterSpec | str],
    out: str | os.PathLike,
    dtype: str | None = "keep",
    device: str | None = "auto",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    check_base: Callable[[Adapter, "BaseCheckpoint"], None] | None = None,
    before_commit: Callable[[Path, MergePlan], None] | None = None,
    fail_after_tensors: int | None = None,
    block_bytes: int | None = None,
) -> MergeResult:
    """Merge ``adapters`` (``"a:0.7,b:0.3"`` or ``AdapterSpec``s) into the checkpoint at ``base``
    and write the result to ``out`` (same layout, atomically).

    ``progress(advance, total)``: bytes written so far are reported as they go.
    ``check_base(adapter, base)``: called for each adapter before anything is planned; raise
    ``BaseMismatchError`` to refuse (see HOOK(manifest) below).
    """
    from loratool.checkpoint import BaseCheckpoint

    t0 = time.perf_counter()
    specs = _specs(adapters)
    out = Path(out)
    _check_paths(out, [Path(base), *(s.path for s in specs)], overwrite, Path(base).is_file())
    ckpt = BaseCheckpoint(base)
    loaded = load_adapters(specs)
    # HOOK(manifest): base-hash enforcement. The CLI passes loratool.manifest.check_base here
    # (with --allow-base-mismatch / --require-manifest); lineage for the output goes through
    # ``before_commit``, which runs inside the temporary output directory before the rename.
    if check_base is not None:
        for la in loaded:
            check_base(la.adapter, ckpt)
    plan = plan_merge(ckpt, loaded, dtype=None if dtype == "keep" else dtype,
                      max_shard_size=parse_size(max_shard_size))
    return _run(plan, "merge", out, overwrite, device, progress, before_commit, fail_after_tensors, t0,
                block_bytes)


def _run(plan, operation, out, overwrite, device, progress, before_commit, fail_after, t0,
         block_bytes=None) -> MergeResult:
    total = plan.nbytes
    cb = (lambda n: progress(n, total)) if progress is not None else None
    written, dev = _execute(plan, out, overwrite, device, cb, before_commit, fail_after, block_bytes)
    return MergeResult(
        operation=operation,
        out=str(out),
        base=str(plan.base.path),
        adapters=[str(la.spec) for la in plan.adapters],
        device=dev,
        dtype=TORCH_NAMES.get(plan.dtype, "keep") if plan.dtype else "keep",
        tensors=sum(1 for _ in plan.tensors()),
        merged=plan.count(Action.MERGE),
        replaced=plan.count(Action.REPLACE),
        copied=plan.count(Action.COPY),
        cast=plan.count(Action.CAST),
        files=len(plan.shards),
        bytes_written=written,
        seconds=round(time.perf_counter() - t0, 3),
        warnings=plan.warnings,
    )


class LayerDistance(BaseModel):
    """How far one tensor is from another (``unmerge --base``: the result from the original)."""

    name: str
    dtype: str
    numel: int
    differing: int  # elements that are not bit-equal
    max_abs: float
    max_ulp: float  # in ulps of the reference tensor's dtype at the reference value


class UnmergeResult(MergeResult):
    """``unmerge`` output, with the distance to the original base when it was given."""

    distance: list[LayerDistance] = []
    max_ulp: float | None = None
    max_abs: float | None = None


def unmerge(
    merged: str | os.PathLike,
    adapters: str | Sequence[AdapterSpec | str],
    out: str | os.PathLike,
    base: str | os.PathLike | None = None,
    dtype: str | None = "keep",
    device: str | None = "auto",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    check_base: Callable[[Adapter, "BaseCheckpoint"], None] | None = None,
    before_commit: Callable[[Path, MergePlan], None] | None = None,
) -> UnmergeResult:
    """Subtract the adapters' deltas from ``merged``: round(M − Σ wᵢ sᵢ ΔWᵢ). DoRA is refused
    (its per-row rescaling needs the original norms). With ``base`` the modules_to_save tensors
    are restored from it and the result is compared with it (``distance``)."""
    from loratool.checkpoint import BaseCheckpoint
    from loratool.parity import tensor_distance

    t0 = time.perf_counter()
    specs = _specs(adapters)
    out = Path(out)
    _check_paths(out, [Path(merged), *(s.path for s in specs), *([Path(base)] if base else [])], overwrite,
                 Path(merged).is_file())
    ckpt = BaseCheckpoint(merged)
    original = BaseCheckpoint(base) if base is not None else None
    loaded = load_adapters(specs)
    # HOOK(manifest): as in ``merge``; the merged checkpoint stands in for the base here.
    if check_base is not None:
        for la in loaded:
            check_base(la.adapter, original or ckpt)
    plan = plan_merge(ckpt, loaded, dtype=None if dtype == "keep" else dtype, sign=-1, restore=original)
    result = _run(plan, "unmerge", out, overwrite, device, progress, before_commit, None, t0)
    res = UnmergeResult(**result.model_dump())
    if original is not None:
        restored = BaseCheckpoint(out)
        for t in plan.tensors():
            if t.action is Action.MERGE and t.name in original:
                res.distance.append(tensor_distance(t.name, restored.ref(t.name), original.ref(t.name),
                                                     scale=ckpt.ref(t.name)))
        if res.distance:
            res.max_ulp = max(d.max_ulp for d in res.distance)
            res.max_abs = max(d.max_abs for d in res.distance)
    return res
