"""The entry points: ``merge`` and ``unmerge`` (read the inputs, check the base, plan, execute with the
lineage, report)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence


from loratool import boundary
from loratool.manifest import BaseGuard, merged_manifest, write_merged_manifest
from loratool.errors import InputError, UsageError
from loratool.merge.basequant import OutputQuant, requant_report
from loratool.merge.basequant import report as quant_report
from loratool.merge.executor import _execute
from loratool.merge.parity import tensor_distance
from loratool.merge.plan import TORCH_NAMES, Action, MergePlan, plan_merge
from loratool.merge.specs import AdapterSpec, _specs, load_adapters, parse_size
from loratool.quant.bnb import QuantSpec, parse_precision
from loratool.schemas.merge import MergeResult, QuantLayer, RequantLayer, UnmergeResult


def _check_paths(out: Path, inputs: Sequence[Path], overwrite: bool, single_file: bool) -> None:
    """The output check of ``loratool.boundary``, before any work is spent (the writer checks again)."""
    boundary.check_output(out, overwrite=overwrite, inputs=[p for p in inputs if os.path.lexists(p)],
                          kind="file" if single_file else "dir")


def _given(adapters: str | Sequence[AdapterSpec | str]) -> list[str]:
    """The adapters as given (the lineage's ``params``), as the command line spells them."""
    return [adapters] if isinstance(adapters, str) else [str(a) for a in adapters]


def _lineage(guard: BaseGuard, operation: str, params: dict) -> Callable[[Path, MergePlan], None]:
    """``before_commit``: ``loratool.json`` inside the output directory, with the base's
    fingerprint and the step that made it (and the mismatch the guard allowed), written before
    the rename so that it appears together with the output."""

    def write(root: Path, plan: MergePlan) -> None:
        if not root.is_dir():  # a single-file output has no place for it
            return
        adapters = [la.adapter for la in plan.adapters]
        precision = _precision(plan)
        recorded = params
        if precision != "keep":  # the choice and what it changed, per tensor (issue 16)
            recorded = {**params, "base_precision": precision, "quantization": quant_report(plan)}
        if plan.output_quant is not None:
            recorded = {**recorded, "output_precision": str(plan.output_quant),
                        "requantization": requant_report(plan, plan.output_quant)}
        write_merged_manifest(merged_manifest(operation, guard.base, adapters, recorded, guard.mismatch), root)
        _model_card(root, plan, guard, operation)

    return write


def _model_card(root: Path, plan: MergePlan, guard: BaseGuard, operation: str) -> None:
    """README.md: a merge's own card (``loratool.modelcard``) in place of the base's copy; an
    unmerge drops the card a merge wrote (the base's own card is not in the merged checkpoint)."""
    from loratool import modelcard
    from loratool._version import __version__

    card = root / modelcard.CARD
    if operation != "merged":
        if card.is_file() and modelcard.is_ours(card):
            card.unlink()
        return
    base_card = None
    if card.is_file():  # the copy of the base's card: only its front matter is read
        with open(card, "rb") as f:
            base_card = f.read(64 << 10).decode("utf-8", errors="replace")
    base = guard.base
    if base is not None:
        name = base.repo_id or base.name
    else:  # no manifest was checked: the name the base gives itself (or its Hub cache path)
        from loratool.fingerprint import _local_name

        name = _local_name(plan.base)[0]
    # a local adapter by its folder or file name (cards are shared; absolute paths are not), a
    # registry or Hub reference as given
    rows = [(la.spec.path.name if os.path.exists(la.spec.path) else str(la.spec.path), la.spec.weight,
             la.adapter.base_model) for la in plan.adapters]
    card.write_text(modelcard.merge_card(name, rows, base_card, __version__), encoding="utf-8")


def merge(
    base: str | os.PathLike,
    adapters: str | Sequence[AdapterSpec | str],
    out: str | os.PathLike,
    dtype: str | None = "keep",
    device: str | None = "auto",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    *,
    engine: str = "auto",
    direct_io: bool | None = None,
    allow_base_mismatch: bool = False,
    require_manifest: bool = False,
    base_precision: str | QuantSpec | None = "keep",
    format: str | None = None,
    output_precision: str | QuantSpec | None = "keep",
) -> MergeResult:
    """Merge ``adapters`` (``"a:0.7,b:0.3"`` or ``AdapterSpec``s) into the checkpoint at ``base``
    and write the result to ``out`` (same layout, atomically), with ``loratool.json`` (the
    lineage) inside a directory output.

    Each adapter's manifest is checked against ``base`` before anything is written: another base
    raises ``BaseMismatchError`` unless ``allow_base_mismatch`` (the lineage then records it), and
    with ``require_manifest`` an adapter without one is refused too. What the check could not
    verify is in ``result.base_warnings``.

    ``base_precision``: ``"keep"`` (the base as it is), or ``"nf4|fp4[,blocksize=N][,double-quant]"``
    (a ``QuantSpec``): each Linear weight an adapter changes is first made bitsandbytes'
    dequant(quant(W)), the base a QLoRA adapter was trained against, bit for bit; ``result.quantization``
    says per tensor how much that changed. A base stored in 4 bits (a bitsandbytes checkpoint) is
    dequantized as stored, and the output is 16-bit unless ``output_precision`` says otherwise:
    ``"nf4|fp4[,blocksize=N][,double-quant]"`` or ``"stored"`` (each weight as the base held it)
    writes each merged 4-bit weight requantized (bitsandbytes' bits, transformers' serialization)
    and the untouched ones raw; ``result.requantization`` gives per tensor
    ‖M − dequant(quant(M))‖ / ‖ΔW‖, the error that adds relative to the adapter's own delta.

    ``progress(advance, total)``: bytes written so far are reported as they go. ``engine`` and
    ``direct_io``: how the bytes are computed and written (``execute``); the result is the same.
    """
    return _merge(base, adapters, out, dtype, device, max_shard_size, overwrite, progress, engine=engine,
                  direct_io=direct_io, allow_base_mismatch=allow_base_mismatch, require_manifest=require_manifest,
                  base_precision=base_precision, format=format, output_precision=output_precision)


def _merge(base, adapters, out, dtype="keep", device="auto", max_shard_size=None, overwrite=False, progress=None,
           *, engine: str = "auto", direct_io: bool | None = None, allow_base_mismatch: bool = False,
           require_manifest: bool = False, block_bytes: int | None = None,
           fail_after_tensors: int | None = None, base_precision: str | QuantSpec | None = "keep",
           format: str | None = None, output_precision: str | QuantSpec | None = "keep") -> MergeResult:
    """``merge``, with the executor's test parameters (``block_bytes``, ``fail_after_tensors``)."""
    from loratool.checkpoint import BaseCheckpoint

    from loratool.resolve import resolve_base

    t0 = time.perf_counter()
    spec = _parse_precision(base_precision)
    out_spec = _parse_output_precision(output_precision)
    specs = _specs(adapters)
    out = Path(out)
    base = resolve_base(base)  # hf://owner/name[@rev]: downloaded into the Hugging Face cache
    _check_paths(out, [Path(base), *(s.path for s in specs)], overwrite, Path(base).is_file())
    ckpt = BaseCheckpoint(base)
    loaded = load_adapters(specs, format=format)
    guard = BaseGuard(allow_base_mismatch, require_manifest)
    for la in loaded:  # another base: BaseMismatchError (exit 3) before anything is planned or written
        guard(la.adapter, ckpt)
    plan = plan_merge(ckpt, loaded, dtype=None if dtype == "keep" else dtype,
                      max_shard_size=parse_size(max_shard_size), base_precision=spec)
    if out_spec is not False:
        _output_quant(plan, out_spec, output_precision, dtype)
    params = {"adapters": _given(adapters), "dtype": dtype, "device": device, "max_shard_size": max_shard_size}
    return _run(plan, MergeResult, "merge", out, t0, overwrite=overwrite, device=device, progress=progress,
                before_commit=_lineage(guard, "merged", params), base_warnings=guard.messages, engine=engine,
                direct_io=direct_io, block_bytes=block_bytes, fail_after_tensors=fail_after_tensors)


def _run(plan: MergePlan, result: type[MergeResult], operation: str, out: Path, t0: float, *, overwrite: bool,
         device, progress, before_commit, base_warnings: list[str], engine: str, direct_io: bool | None,
         block_bytes: int | None = None, fail_after_tensors: int | None = None) -> MergeResult:
    """Execute ``plan`` into ``out`` and say what was written (a ``result``)."""
    total = plan.nbytes
    cb = (lambda n: progress(n, total)) if progress is not None else None
    written, dev = _execute(plan, out, overwrite, device, cb, before_commit, engine=engine, direct_io=direct_io,
                            block_bytes=block_bytes, fail_after=fail_after_tensors)
    layers = [QuantLayer(**row) for row in quant_report(plan)]
    requant = [RequantLayer(**row) for row in requant_report(plan, plan.output_quant)]
    warnings = list(plan.warnings)
    loud = [q for q in requant if q.warn]
    if loud:
        worst = max(loud, key=lambda q: q.requant_over_delta or float("inf"))
        ratio = f"{worst.requant_over_delta:.3g}×" if worst.requant_over_delta is not None else "∞ (ΔW = 0)"
        warnings.append(f"{len(loud)} of {len(requant)} requantized tensors: ‖M − dequant(quant(M))‖ exceeds the "
                        f"adapter's delta ‖ΔW‖ (worst {worst.name}: {ratio}); the 4-bit output loses more of these "
                        "weights than the adapter changed (write it in 16 bits: --output-precision keep)")
    loud = [q for q in layers if q.warn]
    if loud:
        worst = max(loud, key=lambda q: q.quant_over_delta or float("inf"))
        ratio = f"{worst.quant_over_delta:.3g}×" if worst.quant_over_delta is not None else "∞ (ΔW = 0)"
        warnings.append(f"{len(loud)} of {len(layers)} merged tensors: the quantization term ‖W − dequant(quant(W))‖ "
                        f"exceeds the adapter's delta ‖ΔW‖ (worst {worst.name}: {ratio}); the base precision "
                        f"({_precision(plan)}) changes these weights more than the adapter does")
    return result(
        operation=operation,
        out=str(out),
        base=str(plan.base.path),
        adapters=[str(la.spec) for la in plan.adapters],
        device=dev,
        dtype=TORCH_NAMES.get(plan.dtype, "keep") if plan.dtype else "keep",
        num_tensors=sum(1 for _ in plan.tensors()),
        num_merged=plan.count(Action.MERGE),
        num_replaced=plan.count(Action.REPLACE),
        num_copied=plan.count(Action.COPY),
        num_cast=plan.count(Action.CAST),
        num_files=len(plan.shards),
        bytes_written=written,
        seconds=round(time.perf_counter() - t0, 3),
        warnings=warnings,
        base_warnings=base_warnings,
        base_precision=_precision(plan),
        quantization=layers,
        output_precision=str(plan.output_quant) if plan.output_quant is not None else "keep",
        requantization=requant,
    )


def _parse_precision(value: str | QuantSpec | None) -> QuantSpec | None:
    """``--base-precision`` as a ``QuantSpec`` (None: keep); a ``UsageError`` naming the problem."""
    if value is None or isinstance(value, QuantSpec):
        return value
    try:
        return parse_precision(str(value))
    except ValueError as e:
        raise UsageError(f"--base-precision {value!r}: {e}") from None


def _parse_output_precision(value: str | QuantSpec | None) -> QuantSpec | None | bool:
    """``--output-precision``: False (keep: 16-bit), None ("stored") or a ``QuantSpec``."""
    if value is None or isinstance(value, QuantSpec):
        return False if value is None else value
    if str(value).strip().lower() == "stored":
        return None
    try:
        spec = parse_precision(str(value))
    except ValueError as e:
        raise UsageError(f"--output-precision {value!r}: {e} (or stored)") from None
    return False if spec is None else spec


def _output_quant(plan: MergePlan, spec: QuantSpec | None, given, dtype) -> None:
    """Attach the 4-bit output to ``plan`` and set config.json's quantization_config as
    transformers writes it for a bitsandbytes 4-bit model."""
    from loratool.quant.stored import QuantizedRef

    if not any(isinstance(plan.base.ref(n), QuantizedRef) for n in plan.quantized_base):
        raise UsageError(f"--output-precision {given}: {plan.base.path} is not stored in 4 bits; a 4-bit output "
                         "needs a bitsandbytes 4-bit base (its untouched weights are copied as stored)")
    if dtype not in (None, "keep"):
        raise UsageError(f"--output-precision {given} with --dtype {dtype}: the 4-bit weights keep the base's "
                         "compute dtype; pass --dtype keep")
    plan.output_quant = OutputQuant(spec)
    first = plan.base.ref(plan.quantized_base[0])
    use = spec or first.spec
    for rel, updates in plan.json_updates.items():
        if "quantization_config" in updates:
            updates["quantization_config"] = _bnb_config(plan.base.path / rel, use, first.state["dtype"])


def _bnb_config(config_path: Path, spec: QuantSpec, compute_dtype: str) -> dict:
    """``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` for ``spec``, over the base's own
    quantization_config (its skip modules and the like are kept)."""
    try:
        old = boundary.read_json(config_path).get("quantization_config") or {}
    except (AttributeError, InputError):
        old = {}
    cfg = {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": compute_dtype,
           "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
           "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
           "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
           "quant_method": "bitsandbytes"}
    cfg.update(old if isinstance(old, dict) else {})
    cfg.update({"bnb_4bit_quant_type": spec.quant_type, "bnb_4bit_use_double_quant": spec.double_quant,
                "load_in_4bit": True, "_load_in_4bit": True, "load_in_8bit": False, "_load_in_8bit": False})
    return cfg


def _precision(plan: MergePlan) -> str:
    """What the deltas were added to: "keep", the spec, or "stored:<spec>" (a 4-bit base)."""
    if plan.base_precision is not None:
        return str(plan.base_precision)
    if plan.quantized_base:
        specs = sorted({str(plan.base.ref(n).spec) for n in plan.quantized_base})
        return "stored:" + ";".join(specs)
    return "keep"


def unmerge(
    merged: str | os.PathLike,
    adapters: str | Sequence[AdapterSpec | str],
    out: str | os.PathLike,
    base: str | os.PathLike | None = None,
    dtype: str | None = "keep",
    device: str | None = "auto",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    *,
    engine: str = "auto",
    direct_io: bool | None = None,
    format: str | None = None,
) -> UnmergeResult:
    """Subtract the adapters' deltas from ``merged``: round(M − Σ wᵢ sᵢ ΔWᵢ). DoRA is refused
    (its per-row rescaling needs the original norms). With ``base`` the modules_to_save tensors
    are restored from it and the result is compared with it (``distance``). A directory output
    holds ``loratool.json`` with the lineage.

    No base check: the merged checkpoint is by design not the adapters' base (and the lineage
    records no base fingerprint)."""
    from loratool.checkpoint import BaseCheckpoint

    t0 = time.perf_counter()
    specs = _specs(adapters)
    out = Path(out)
    if base is not None:
        from loratool.resolve import resolve_base

        base = resolve_base(base)
    _check_paths(out, [Path(merged), *(s.path for s in specs), *([Path(base)] if base else [])], overwrite,
                 Path(merged).is_file())
    ckpt = BaseCheckpoint(merged)
    original = BaseCheckpoint(base) if base is not None else None
    loaded = load_adapters(specs, format=format)
    plan = plan_merge(ckpt, loaded, dtype=None if dtype == "keep" else dtype, sign=-1, restore=original)
    params = {"adapters": _given(adapters), "dtype": dtype, "device": device}
    res = _run(plan, UnmergeResult, "unmerge", out, t0, overwrite=overwrite, device=device, progress=progress,
               before_commit=_lineage(BaseGuard(), "unmerged", params), base_warnings=[], engine=engine,
               direct_io=direct_io)
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
