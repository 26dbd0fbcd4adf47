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

kohya sd-scripts' ``resize_lora.py`` options (issue 14): Conv2d modules with a kernel above 1×1
can get their own rank (``conv_rank``, its ``--new_conv_rank``); ``save_precision`` casts every
tensor of the output to fp32/fp16/bf16 (default: each factor keeps its dtype), the truncation being
computed before the cast; and the output's ``ss_network_dim``/``ss_network_alpha`` and
``ss_network_args`` conv_dim/conv_alpha say the new ranks and alphas (``formats.kohya.network_metadata``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from loratool.adapter import Adapter, AdapterModule, dtype_of, float_values, peft_scale
from loratool.formats.kohya import is_conv_kernel, network_metadata
from loratool.lowrank import (
    RankRule,
    core_svd,
    energy_kept,
    numerical_rank,
    split_factors,
    truncation_error,
)
from loratool.safetensors_io import host_tensor

if TYPE_CHECKING:  # pragma: no cover
    from loratool.schemas.lowrank import ModuleResize, ResizeReport

ALPHA_POLICY = ("alpha kept; scale = alpha/new_rank (alpha/sqrt(new_rank) with rsLoRA); singular values "
                "split evenly between the factors as sqrt(sigma/scale)")
# --save-precision -> safetensors dtype ("keep": each tensor its own)
SAVE_PRECISIONS = {"keep": None, "fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def cast_module(m: AdapterModule, dtype: str | None) -> AdapterModule:
    """``m`` with every tensor in ``dtype`` (a safetensors name; None: ``m`` as it is). A module
    with a tensor cast loses its source keys, so that a kohya alpha is written in the new dtype
    too (sd-scripts casts the whole state dict)."""
    if dtype is None or all(dtype_of(t) == dtype for t in m.tensors().values()):
        return m
    cast = {role: t if dtype_of(t) == dtype else host_tensor(float_values(t), dtype)
            for role, t in m.tensors().items()}
    return dataclasses.replace(m, **cast, source_keys={})


def resize_module(m: AdapterModule, rule: RankRule, dtype: str | None = None
                  ) -> tuple[AdapterModule, "ModuleResize", str | None, float]:
    """Truncate one module (its low-rank form; a kind without one is refused), its tensors in
    ``dtype`` (None: their own). Returns (new module, its report row, a warning or None, ‖ΔW‖²_F)."""
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
        return cast_module(m, dtype), ModuleResize(**row, new_rank=r, new_alpha=m.alpha, energy_kept=1.0,
                                                   relative_error=0.0, status="kept"), warning, total
    k = min(k, r)
    if k >= r:
        return cast_module(m, dtype), ModuleResize(**row, new_rank=r, new_alpha=m.alpha, energy_kept=1.0,
                                                   relative_error=0.0, status="unchanged"), None, total

    new_scale = peft_scale(m.alpha, k, m.use_rslora)
    new = cast_module(m, dtype).with_factors(*split_factors(U, S, Vh, k, new_scale))
    report = ModuleResize(**row, new_rank=k, new_alpha=m.alpha, energy_kept=energy_kept(S, k),
                          relative_error=truncation_error(S, k), status="resized")
    return new, report, warning, total


def resize_adapter(adapter: Adapter, rule: RankRule, conv_rank: int | None = None,
                   save_precision: str = "keep") -> tuple[Adapter, "ResizeReport"]:
    """Resize every module of ``adapter`` (no I/O beyond reading its tensors): by ``rule``, or
    for Conv2d modules with a kernel above 1×1 by ``rule.with_rank(conv_rank)`` when given; every
    tensor in ``save_precision`` (a key of ``SAVE_PRECISIONS``)."""
    from loratool.errors import UsageError
    from loratool.schemas.lowrank import ResizeReport

    if save_precision not in SAVE_PRECISIONS:
        raise UsageError(f"save precision must be one of {', '.join(SAVE_PRECISIONS)}, found {save_precision!r}")
    if conv_rank is not None and conv_rank < 1:
        raise UsageError(f"--conv-rank must be at least 1, found {conv_rank}")
    dtype = SAVE_PRECISIONS[save_precision]
    conv_rule = rule.with_rank(conv_rank) if conv_rank is not None else rule

    modules: dict[str, AdapterModule] = {}
    rows, warnings = [], []
    total = kept = 0.0
    from loratool._threads import map_modules

    results = map_modules(lambda m: resize_module(m, conv_rule if is_conv_kernel(m) else rule, dtype),
                          adapter.modules.values())
    for name, (new, row, warning, energy) in zip(adapter.modules, results):
        modules[name] = new
        rows.append(row)
        if warning:
            warnings.append(warning)
        total += energy
        kept += energy * row.energy_kept
    out = dataclasses.replace(adapter, modules=modules, files=[], problems=[],
                              metadata=network_metadata(adapter.metadata, modules.values()))
    report = ResizeReport(
        input=str(adapter.path) if adapter.path else "",
        format=adapter.format,
        rule=rule.describe(),
        conv_rule=conv_rule.describe() if conv_rank is not None else None,
        save_precision=save_precision,
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
                overwrite: bool = False, conv_rank: int | None = None, save_precision: str = "keep") -> "ResizeReport":
    """Read the adapter at ``path``, resize it, write it to ``out`` in the same format."""
    from loratool.adapter import require_usable
    from loratool.formats import write_adapter
    from loratool.resolve import load_adapter

    from loratool.manifest import finish_output, stamp_adapter

    adapter = load_adapter(path, format=format)
    require_usable(adapter)
    resized, report = resize_adapter(adapter, rule, conv_rank=conv_rank, save_precision=save_precision)
    params = {"rule": _rule_params(rule)}
    if conv_rank is not None:
        params["conv_rank"] = conv_rank
    if save_precision != "keep":
        params["save_precision"] = save_precision
    manifest = stamp_adapter(resized, "resized", [adapter], params)
    write_adapter(resized, out, adapter.format, overwrite=overwrite)
    finish_output(manifest, out)
    report.output = str(out)
    return report


def _rule_params(rule) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(rule):
        return dataclasses.asdict(rule)
    return {k: v for k, v in vars(rule).items() if not k.startswith("_")}
