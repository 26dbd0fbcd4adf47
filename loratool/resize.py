"""Resize an adapter: optimal rank truncation of every module, computed on the r×r core.

Each module's delta scale·B@A (its kind's ``low_rank`` form; a kind without one is refused) is
decomposed with ``lowrank.core_svd`` (QR of the factors, SVD of the r×r core, float64) and cut to
the rank a ``RankRule`` picks; by Eckart–Young that is the best rank-k approximation, and its
error follows from the singular values alone. The kind builds the new module (``with_factors``).

Alpha policy: the module's alpha is kept and the new scale is PEFT's for the new rank
(alpha/k, or alpha/√k with rsLoRA); the factors carry the rest, √(σ/scale) in each. So a PEFT
config changes only in rank_pattern (lora_alpha stays what the user chose), a kohya file keeps its
``.alpha`` values, and the module's ``delta()`` of the output is the truncated delta whatever the
reader. A ``lora_B.bias`` (PEFT lora_bias) is multiplied by scale_old/scale_new so that its
contribution, scale·bias, is unchanged. DoRA: the low-rank part is truncated and the magnitude
vector kept as it is.

Modules the rule would keep whole (and modules asked for a rank above their own, with a warning)
are left untouched: their tensors are copied byte for byte.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from loratool.adapter import Adapter, AdapterModule, peft_scale
from loratool.lowrank import (
    RankRule,
    core_svd,
    energy_kept,
    numerical_rank,
    split_factors,
    truncation_error,
)

if TYPE_CHECKING:  # pragma: no cover
    from loratool.schemas.lowrank import ModuleResize, ResizeReport

ALPHA_POLICY = ("alpha kept; scale = alpha/new_rank (alpha/sqrt(new_rank) with rsLoRA); singular values "
                "split evenly between the factors as sqrt(sigma/scale)")


def resize_module(m: AdapterModule, rule: RankRule) -> tuple[AdapterModule, "ModuleResize", str | None, float]:
    """Truncate one module (its low-rank form; a kind without one is refused). Returns (new
    module, its report row, a warning or None, ‖ΔW‖²_F)."""
    from loratool.errors import UsageError
    from loratool.schemas.lowrank import ModuleResize

    r = m.rank
    lr = m.low_rank()
    if lr is None:
        raise UsageError(f"module {m.name!r}: a {m.module_kind} module has no low-rank form to truncate")
    shape = (lr.B2.shape[0], lr.A2.shape[1])
    U, S, Vh = core_svd(lr.B2, lr.A2, lr.scale, keep=lambda S: min(rule.choose(S, shape), r))
    n = numerical_rank(S, shape)
    total = float((S ** 2).sum())
    warning = None
    k = rule.choose(S, shape)
    row = dict(name=m.name, kind=m.kind.value, old_rank=r, old_alpha=m.alpha, numerical_rank=n)
    if rule.rank is not None and k > r:
        warning = f"module {m.name!r}: asked rank {k} is above its rank {r}; left as it is"
        return m, ModuleResize(**row, new_rank=r, new_alpha=m.alpha, energy_kept=1.0, relative_error=0.0,
                               status="kept"), warning, total
    k = min(k, r)
    if k >= r:
        return m, ModuleResize(**row, new_rank=r, new_alpha=m.alpha, energy_kept=1.0, relative_error=0.0,
                               status="unchanged"), None, total

    new_scale = peft_scale(m.alpha, k, m.use_rslora)
    new = m.with_factors(*split_factors(U, S, Vh, k, new_scale))
    report = ModuleResize(**row, new_rank=k, new_alpha=m.alpha, energy_kept=energy_kept(S, k),
                          relative_error=truncation_error(S, k), status="resized")
    return new, report, warning, total


def resize_adapter(adapter: Adapter, rule: RankRule) -> tuple[Adapter, "ResizeReport"]:
    """Resize every module of ``adapter`` (no I/O beyond reading its tensors)."""
    from loratool.schemas.lowrank import ResizeReport

    modules: dict[str, AdapterModule] = {}
    rows, warnings = [], []
    total = kept = 0.0
    from loratool._threads import map_modules

    results = map_modules(lambda m: resize_module(m, rule), adapter.modules.values())
    for name, (new, row, warning, energy) in zip(adapter.modules, results):
        modules[name] = new
        rows.append(row)
        if warning:
            warnings.append(warning)
        total += energy
        kept += energy * row.energy_kept
    out = dataclasses.replace(adapter, modules=modules, files=[], problems=[])
    report = ResizeReport(
        input=str(adapter.path) if adapter.path else "",
        format=adapter.format,
        rule=rule.describe(),
        alpha_policy=ALPHA_POLICY,
        num_modules=len(rows),
        num_resized=sum(r.status == "resized" for r in rows),
        old_params=adapter.num_params,
        new_params=out.num_params,
        energy_kept=1.0 if total == 0 else kept / total,
        max_relative_error=max((r.relative_error for r in rows), default=0.0),
        modules=rows,
        warnings=warnings,
    )
    return out, report


def resize_path(path: str | os.PathLike, out: str | os.PathLike, rule: RankRule, format: str | None = None,
                overwrite: bool = False) -> "ResizeReport":
    """Read the adapter at ``path``, resize it, write it to ``out`` in the same format."""
    from loratool.adapter import require_usable
    from loratool.formats import write_adapter
    from loratool.resolve import load_adapter

    from loratool.manifest import finish_output, stamp_adapter

    adapter = load_adapter(path, format=format)
    require_usable(adapter)
    resized, report = resize_adapter(adapter, rule)
    manifest = stamp_adapter(resized, "resized", [adapter], {"rule": _rule_params(rule)})
    write_adapter(resized, out, adapter.format, overwrite=overwrite)
    finish_output(manifest, out)
    report.output = str(out)
    return report


def _rule_params(rule) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(rule):
        return dataclasses.asdict(rule)
    return {k: v for k, v in vars(rule).items() if not k.startswith("_")}
