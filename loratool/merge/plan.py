"""The plan of a merge: what happens to every base tensor, and where its bytes go.

The plan is built from headers only (``BaseCheckpoint`` and the lazy ``Adapter``): every base
tensor gets one ``TensorPlan`` with an ``Action``; tensors no adapter touches are copied as raw
bytes (never decoded, never in our memory). The output keeps the base's shard layout, index,
safetensors metadata and the other files of the model directory (config, tokenizer, generation
config), or is re-sharded (``--max-shard-size``) by transformers' rule.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from loratool import boundary
from loratool.adapter import AdapterModule, LayerKind, TensorSource, shape_of
from loratool.text import listed
from loratool.errors import InputError, MisfitError, UsageError
from loratool.merge.basepacked import DequantizePacked
from loratool.merge.basequant import BaseTransform, Dequantize, OutputQuant, Requantize
from loratool.merge.specs import LoadedAdapter, parse_dtype
from loratool.quant.bnb import QuantSpec
from loratool.quant.gptq import PackedRef
from loratool.quant.stored import QuantizedRef
from loratool.safetensors_io import DTYPES, PICKLE_SUFFIXES, SafetensorsFile, TensorRef, encode_header

if TYPE_CHECKING:  # pragma: no cover
    from loratool.checkpoint import BaseCheckpoint

CONVERTIBLE = {"F32", "F16", "BF16"}  # --dtype converts these; other dtypes are kept as they are
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


class Action(str, Enum):
    COPY = "copy"  # raw bytes, never decoded
    CAST = "cast"  # dtype conversion only (--dtype)
    MERGE = "merge"  # W + Σ coef·ΔW (a LoRA weight) or b + Σ coef·bias (PEFT lora_bias)
    REPLACE = "replace"  # modules_to_save (or, in unmerge, the base's tensor restored)


@dataclass
class Term:
    """One adapter's contribution to one base tensor."""

    module: AdapterModule
    coef: float  # sign · weight · scale
    weight: float
    adapter: str  # the adapter's path, for reports
    part: str = "weight"  # "weight": the LoRA delta; "bias": lora_B.bias (PEFT lora_bias=True)
    # rows [lo, hi) of the base tensor that the delta is added to (``checkpoint.Target``: q, k or v
    # fused by rows into one tensor); None: all of them
    rows: tuple[int, int] | None = None

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
    # the base rows as the adapter saw them (issue 16): dequant(quant(W)), or a stored 4-bit weight's
    transform: BaseTransform | None = None
    _pieces: "list[TensorPlan] | None" = field(default=None, init=False, repr=False, compare=False)

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

    def pieces(self) -> "list[TensorPlan]":
        """What the executor computes and writes, in row order: this plan itself, or, where terms
        add into rows of the tensor (``Term.rows``: q, k and v fused in one base tensor), one plan
        per block of rows: the rows a set of terms covers, a tensor of its own (its source those
        rows, its terms' rows relative: computed exactly as the unfused tensor would be), and the
        rows between them, copied (or cast). The same objects every call."""
        if self._pieces is None:
            self._pieces = _pieces(self)
        return self._pieces


def _pieces(t: TensorPlan) -> list[TensorPlan]:
    if t.action is not Action.MERGE or t.transform is not None or all(term.rows is None for term in t.terms):
        return [t]  # (a transformed base's rows: the engines add the terms' rows themselves)
    rows = t.shape[0]
    blocks = sorted({term.rows for term in t.terms})  # disjoint (``plan_merge``)
    out: list[TensorPlan] = []
    at = 0
    for lo, hi in blocks + [(rows, rows)]:
        if at < lo:  # rows no term changes
            out.append(TensorPlan(t.name, rows_ref(t.src, at, lo), t.dtype,
                                  Action.COPY if t.dtype == t.src.dtype else Action.CAST))
        if lo < hi:
            terms = [dataclasses.replace(term, rows=None) for term in t.terms if term.rows == (lo, hi)]
            out.append(TensorPlan(t.name, rows_ref(t.src, lo, hi), t.dtype, Action.MERGE, terms=terms))
        at = hi
    return out


@dataclass(frozen=True)
class RowsRef(TensorRef):
    """Rows [lo, hi) of a tensor in a file, as a tensor of its own (``info``: their bytes and
    shape; C order makes them one contiguous range)."""

    def raw(self) -> bytes:
        whole = self.file.tensors[self.info.name]
        off = self.info.start - whole.start
        return self.file.read_bytes(self.info.name)[off:off + self.info.nbytes]

    def load(self):
        import torch

        from loratool.safetensors_io import torch_dtype

        dt = torch_dtype(self.dtype)
        data = self.raw()
        return torch.frombuffer(bytearray(data), dtype=dt).reshape(self.shape) if data else torch.empty(self.shape, dtype=dt)

    @property
    def first_row(self) -> int:
        """The row of the whole tensor that is this one's row 0 (for messages)."""
        whole = self.file.tensors[self.info.name]
        return (self.info.start - whole.start) // max(1, self.nbytes // max(1, self.shape[0]))


def rows_ref(ref: TensorRef, lo: int, hi: int) -> TensorRef:
    """Rows [lo, hi) of ``ref`` (``RowsRef``)."""
    rows = ref.shape[0]
    row_bytes = ref.nbytes // max(1, rows)
    info = dataclasses.replace(ref.info, shape=(hi - lo,) + tuple(ref.shape[1:]), start=ref.info.start + lo * row_bytes,
                               end=ref.info.start + hi * row_bytes)
    return RowsRef(ref.file, info)


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
class MergePlan:
    base: "BaseCheckpoint"
    adapters: list[LoadedAdapter]
    shards: list[ShardPlan]
    dtype: str | None  # --dtype (None: keep)
    sign: int = 1  # -1: unmerge
    single_file: bool = False  # the base is one .safetensors file: so is the output
    indexes: dict[str, bytes] = field(default_factory=dict)  # rel -> content
    copies: list[tuple[Path, str]] = field(default_factory=list)  # other files: source -> rel
    json_updates: dict[str, dict[str, Any]] = field(default_factory=dict)  # rel -> keys to set (None: drop)
    warnings: list[str] = field(default_factory=list)
    base_precision: QuantSpec | None = None  # --base-precision (None: keep)
    requantize: Requantize | None = None  # its transform, which measures the quantization term
    quantized_base: list[str] = field(default_factory=list)  # base weights stored in 4 bits
    output_quant: OutputQuant | None = None  # --output-precision: the merged 4-bit weights requantized

    def tensors(self) -> Iterator[TensorPlan]:
        for shard in self.shards:
            yield from shard.tensors

    def count(self, action: Action) -> int:
        return sum(1 for t in self.tensors() if t.action is action)

    @property
    def nbytes(self) -> int:
        """Bytes of the safetensors files written (the progress total)."""
        return sum(s.nbytes for s in self.shards)


# transformers models whose projections are Conv1D ((in, out) weights): bitsandbytes quantizes them
# transposed (transformers/integrations/bitsandbytes.py), which a 4-bit checkpoint keeps
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})


def plan_merge(
    base: "BaseCheckpoint",
    adapters: Sequence[LoadedAdapter],
    dtype: str | None = None,
    max_shard_size: int | None = None,
    sign: int = 1,
    restore: "BaseCheckpoint | None" = None,
    base_precision: QuantSpec | None = None,
) -> MergePlan:
    """Decide, from headers only, what happens to every base tensor.

    ``sign=-1`` plans an unmerge (deltas subtracted); ``restore`` is then the original base, from
    which modules_to_save tensors are restored. ``base_precision``: merge onto bitsandbytes'
    dequant(quant(W)) of each Linear weight an adapter changes (issue 16). Problems (a module without a base tensor, shapes
    that do not fit, a weighted DoRA merge) are collected and raised together.
    """
    out_dtype = parse_dtype(dtype)
    terms: dict[str, list[Term]] = {}
    replacements: dict[str, tuple[TensorSource, str]] = {}
    misfits: list[str] = []  # adapter and base do not fit (exit 3)
    usage: list[str] = []  # the request cannot be done (exit 2)

    for la in adapters:
        a, w, label = la.adapter, la.spec.weight, str(la.spec.path)
        for module in a.modules.values():
            where = f"{label}: module {module.name!r}"
            fit = module.fit_in(base)  # the one fit check, as validate and the manifest use it
            if fit.check == "LT301":
                misfits.append(f"{where}: {fit.message}")
                continue
            bad = module.structure_problems()
            if bad:
                misfits.extend(f"{where}: {p.message}" for p in bad)
                continue
            if not fit.mergeable:
                misfits.append(f"{where}: {fit.message}")
                continue
            if fit.layer is not module.kind:
                # PEFT decides Linear vs Conv1D per layer from the base module's type and flips
                # fan_in_fan_out itself (with a warning), so one saved config can cover both kinds
                # (peft/tuners/lora/layer.py, dispatch_default); the base's layout decides here.
                module = dataclasses.replace(module, kind=fit.layer)
            target, rows = fit.target, fit.rows  # rows: q, k or v of a fused base tensor
            if base.dtype(target) not in CONVERTIBLE:
                misfits.append(f"{where}: base tensor {target!r} is {base.dtype(target)}; merging needs "
                               "a bf16/fp16/fp32 base (dequantize it first)")
                continue
            why = module.merge_problem(w, sign)  # DoRA: no unmerge, no weight but 1.0
            if why is None and rows is not None and module.use_dora:
                why = (f"a DoRA module whose base weight is {rows_text(target, rows)} (q, k and v fused in one tensor) "
                       "is not merged; merge into the diffusers pipeline folder")
            if why:
                usage.append(f"{where}: {why}")
                continue
            terms.setdefault(target, []).append(Term(module, sign * w * module.scale, w, label, rows=rows))
            bias_src = module.tensors().get("lora_B_bias")
            if bias_src is not None:
                bias = target[: -len("weight")] + "bias"  # in_proj_weight: in_proj_bias
                shape = tuple(base.shape(bias)) if bias in base else None
                if shape and rows is not None and len(shape) == 1 and shape[0] >= rows[1]:
                    shape = (rows[1] - rows[0],)  # its rows, as the weight's
                if bias not in base:
                    misfits.append(f"{where} has lora_bias but the base layer has no bias ({bias!r} "
                                   "is missing); PEFT refuses this merge too")
                elif shape != tuple(shape_of(bias_src)):
                    misfits.append(f"{where}: lora_B.bias has shape {list(shape_of(bias_src))}, "
                                   f"base {rows_text(bias, rows)!r} has {list(shape)}")
                else:
                    terms.setdefault(bias, []).append(
                        Term(module, sign * w * module.scale, w, label, part="bias", rows=rows))
        for name, src in a.modules_to_save.items():
            target = base.tensor_name(name)  # the one name rule, as modules use (``fit_in``)
            where = f"{label}: modules_to_save tensor {name!r}"
            if target is None:
                misfits.append(f"{where} has no counterpart in the base ({base.missing(name)})")
                continue
            if tuple(shape_of(src)) != tuple(base.shape(target)):
                misfits.append(f"{where} has shape {list(shape_of(src))}, base {target!r} has "
                               f"{list(base.shape(target))}")
                continue
            if target in replacements:
                usage.append(f"{where}: {replacements[target][1]} also carries a replacement for "
                             f"{target!r}; two adapters cannot both replace one tensor (merge them "
                             "one at a time, or drop one)")
                continue
            replacements[target] = (src, label)

    for name, ts in terms.items():
        blocks = sorted({t.rows for t in ts if t.rows is not None})
        if blocks and (len(blocks) < len({t.rows for t in ts})
                       or any(a[1] > b[0] for a, b in zip(blocks, blocks[1:]))):
            usage.append(f"base tensor {name!r}: modules add into overlapping rows of it "
                         f"({', '.join(sorted({str(t.rows or 'all') for t in ts}))}); they cannot be merged together")
        if any(t.dora for t in ts) and len(ts) > 1:
            usage.append(f"base tensor {name!r}: a DoRA module ({ts[0].adapter}) and another "
                         "adapter both change it; DoRA's per-row rescaling is defined for one "
                         "adapter, merge them one at a time")
        if name in replacements:
            usage.append(f"base tensor {name!r} is replaced by modules_to_save of "
                         f"{replacements[name][1]} and changed by a LoRA module of {ts[0].adapter}; "
                         "the two cannot be combined")
    if usage:
        raise UsageError(f"cannot merge: {listed(usage)}")
    if misfits:
        raise MisfitError(f"adapter and base do not fit: {listed(misfits)}; is {base.path} the "
                          "base these adapters were trained on?")

    quantized = [name for name, ref in base.items() if isinstance(ref, (QuantizedRef, PackedRef))]
    model_type = base.config.get("model_type")
    bnb4 = next((ref for _, ref in base.items() if isinstance(ref, QuantizedRef)), None)
    if model_type in CONV1D_MODEL_TYPES and bnb4 is not None:
        raise UsageError(f"{base.path}: a {model_type} checkpoint stored in 4 bits: transformers quantizes its "
                         "Conv1D weights transposed, as the Linear layers they stand for, and loratool does not "
                         "read them back as Conv1D yet (the output would hold them transposed); merge onto the "
                         f"16-bit checkpoint it was made from with --base-precision {bnb4.spec}")
    if quantized and base_precision is not None:
        raise UsageError(f"--base-precision {base_precision}: {base.path} is stored quantized already "
                         f"({len(quantized)} bitsandbytes, GPTQ or AWQ weights); the merge dequantizes them as "
                         "stored, so use --base-precision keep")
    requantize = Requantize(base_precision) if base_precision is not None else None
    warnings: list[str] = []
    plans: dict[str, TensorPlan] = {}
    for name, ref in base.items():
        dt = out_dtype if (out_dtype and ref.dtype in CONVERTIBLE) else ref.dtype
        if isinstance(ref, (QuantizedRef, PackedRef)):  # never copied raw: its bytes are the packed ones
            if name in replacements and sign > 0:
                plans[name] = TensorPlan(name, ref, dt, Action.REPLACE, replacement=replacements[name][0])
            else:
                plans[name] = TensorPlan(name, ref, dt, Action.MERGE if name in terms else Action.CAST,
                                         terms=terms.get(name, []),
                                         transform=Dequantize(ref) if isinstance(ref, QuantizedRef)
                                         else DequantizePacked(ref))
                note = ref.warning(name) if isinstance(ref, PackedRef) and name in terms else None
                if note:
                    warnings.append(note)
            continue
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
            t = plans[name]
            if requantize is not None and t.kind in (LayerKind.LINEAR, LayerKind.CONV1D) and len(t.shape) == 2 \
                    and all(term.rows is None for term in t.terms):  # not a fused q/k/v (MHA's in_proj)
                # transformers quantizes Linear weights, and Conv1D ones transposed, as Linear
                if t.kind is LayerKind.LINEAR:
                    t.transform = requantize
                elif t.shape[0] % requantize.blocksize:
                    raise UsageError(f"--base-precision {requantize.spec}: {name} is a Conv1D weight {list(t.shape)} "
                                     f"whose {t.shape[0]} inputs are not whole blocks of {requantize.blocksize}; "
                                     "loratool streams a transposed weight's blocks only when they are")
                else:
                    t.transform = requantize.for_conv1d()
        else:
            plans[name] = TensorPlan(name, ref, dt, Action.COPY if dt == ref.dtype else Action.CAST)

    plan = MergePlan(base=base, adapters=list(adapters), shards=[], dtype=out_dtype, sign=sign,
                     warnings=warnings, base_precision=base_precision, requantize=requantize,
                     quantized_base=quantized)
    _plan_layout(plan, plans, max_shard_size)
    return plan


def rows_text(name: str, rows: tuple[int, int] | None) -> str:
    return name if rows is None else f"rows [{rows[0]}, {rows[1]}) of {name}"


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
        # (a 4-bit weight's quant-state tensors are part of its plan, not plans of their own)
        tensors = [plans[r.info.name] for r in _data_order(st.ref(n) for n in st.keys() if n in plans)]
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
            if plan.quantized_base:  # the quant-state tensors are gone, and the weights are 16-bit
                data = boundary.read_json(idx)
                data["weight_map"] = {t.key: f.name for f in files for t in sorted(
                    by_file.get(f, []), key=lambda t: t.key)}
                data.setdefault("metadata", {})["total_size"] = sum(t.nbytes for f in files for t in by_file.get(f, []))
                plan.indexes[rel] = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
            elif plan.dtype is None:
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
        if plan.quantized_base and src.name in ("quantize_config.json", "quant_config.json"):
            continue  # AutoGPTQ's/AutoAWQ's packing config: the output's weights are 16-bit
        if stale:
            plan.warnings.append(f"{rel}: not copied: weights that are not part of the checkpoint "
                                 "(they would not hold the merge)")
            continue
        plan.copies.append((src, str(rel)))
        if plan.quantized_base and src.name == "config.json" and src.parent in groups:
            # the output holds 16-bit weights: transformers must not load it as a 4-bit model
            plan.json_updates.setdefault(str(rel), {})["quantization_config"] = None
        if plan.dtype is not None and src.name == "config.json" and src.parent in groups:
            try:
                cfg = boundary.read_json(src)
            except InputError:
                continue
            keys = [k for k in ("torch_dtype", "dtype") if k in cfg] if isinstance(cfg, dict) else []
            if keys:
                plan.json_updates.setdefault(str(rel), {}).update({k: TORCH_NAMES[plan.dtype] for k in keys})


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
