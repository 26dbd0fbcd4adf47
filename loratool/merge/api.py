"""The entry points: ``merge`` and ``unmerge`` (read the inputs, plan, execute, report)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from pydantic import BaseModel

from loratool import boundary
from loratool.adapter import Adapter
from loratool.merge.executor import _execute
from loratool.merge.parity import LayerDistance, tensor_distance
from loratool.merge.plan import TORCH_NAMES, Action, MergePlan, plan_merge
from loratool.merge.specs import AdapterSpec, _specs, load_adapters, parse_size

if TYPE_CHECKING:  # pragma: no cover
    from loratool.checkpoint import BaseCheckpoint


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


def _check_paths(out: Path, inputs: Sequence[Path], overwrite: bool, single_file: bool) -> None:
    """The output check of ``loratool.boundary``, before any work is spent (the writer checks again)."""
    boundary.check_output(out, overwrite=overwrite, inputs=[p for p in inputs if os.path.lexists(p)],
                          kind="file" if single_file else "dir")


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
