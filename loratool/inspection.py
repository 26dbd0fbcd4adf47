"""`inspect`: a format-neutral summary of an adapter, read from headers unless asked for spectra."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from loratool.adapter import Adapter, AdapterModule, shape_of
from loratool.schemas.reports import InspectReport, ModuleReport, Spectrum

_METADATA_MAX = 200  # skip long metadata values (kohya's ss_tag_frequency, ss_dataset_dirs…)


def _num_key(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def module_spectrum(m: AdapterModule) -> Spectrum:
    from loratool.lowrank import effective_rank

    from loratool.adapter import count_nonfinite
    from loratool.errors import FormatError

    lr = m.low_rank()  # LoRA's (B2, A2, scale); None for a kind without one: then the dense delta
    values = (lr.B2, lr.A2) if lr is not None else tuple(m.load().values())
    if any(any(count_nonfinite(t)) for t in values):
        raise FormatError(f"module {m.name}: factors hold NaN or Inf values, so no spectrum; run "
                          "`loratool validate` for details")
    s = m.singular_values(lr)
    energy = s**2
    total = float(energy.sum())
    return Spectrum(
        singular_values=[float(v) for v in s],
        effective_rank_90=effective_rank(s, 0.90),
        effective_rank_99=effective_rank(s, 0.99),
        top_energy=float(energy[0]) / total if total > 0 and len(s) else 0.0,
        frobenius_norm=total**0.5,
    )


def module_report(m: AdapterModule, spectrum: bool = False) -> ModuleReport:
    dtypes = sorted(m.dtypes())
    shapes = [list(shape_of(t)) for t in m.tensors().values()]
    return ModuleReport(
        name=m.name,
        kind=m.kind.value,
        algorithm=m.algorithm,
        rank=m.rank,
        alpha=m.alpha,
        scale=m.scale,
        # a LoRA module's A and B; another kind's first two tensors
        a_shape=shapes[0],
        b_shape=shapes[1] if len(shapes) > 1 else [],
        base_shape=list(m.base_weight_shape),
        dtype=dtypes[0] if len(dtypes) == 1 else ",".join(dtypes),
        num_params=m.num_params,
        dora=m.use_dora,
        lora_bias="lora_B_bias" in m.tensors(),
        spectrum=module_spectrum(m) if spectrum else None,
    )


def inspect_adapter(adapter: Adapter, modules: bool = False, spectrum: bool = False) -> InspectReport:
    """Summarise ``adapter``; per-module rows with ``modules`` (implied by ``spectrum``)."""
    ranks = Counter(m.rank for m in adapter.modules.values())
    alphas = Counter(m.alpha for m in adapter.modules.values())
    scales = {m.scale for m in adapter.modules.values()}
    kinds = Counter(m.kind.value for m in adapter.modules.values())
    algorithms = Counter(m.algorithm for m in adapter.modules.values())
    return InspectReport(
        path=str(adapter.path),
        format=adapter.format,
        base_model=adapter.base_model,
        base_revision=adapter.base_revision,
        task_type=adapter.task_type,
        components=list(adapter.components),
        num_modules=len(adapter.modules),
        targets=adapter.target_names(),
        rank=next(iter(ranks)) if len(ranks) == 1 else None,
        rank_counts={str(k): v for k, v in sorted(ranks.items())},
        alpha=next(iter(alphas)) if len(alphas) == 1 else None,
        alpha_counts={_num_key(k): v for k, v in sorted(alphas.items())},
        scale=next(iter(scales)) if len(scales) == 1 else None,
        use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora,
        lora_bias=adapter.lora_bias,
        kinds=dict(sorted(kinds.items())),
        algorithms=dict(sorted(algorithms.items())),
        dtypes=dict(sorted(adapter.dtypes().items())),
        num_params=adapter.num_params,
        file_size=adapter.file_size(),
        modules_to_save=sorted(adapter.modules_to_save),
        extra_tensors=sorted(adapter.extra_tensors),
        metadata={k: v for k, v in sorted(adapter.metadata.items()) if len(v) <= _METADATA_MAX},
        modules=_module_reports(adapter, spectrum) if (modules or spectrum) else None,
    )


def _module_reports(adapter: Adapter, spectrum: bool) -> list[ModuleReport]:
    if not spectrum:
        return [module_report(m) for m in adapter.modules.values()]
    from loratool._threads import map_modules

    return map_modules(lambda m: module_report(m, True), adapter.modules.values())


def inspect_path(path: str | Path, format: str | None = None, modules: bool = False, spectrum: bool = False) -> InspectReport:
    from loratool.resolve import load_adapter

    return inspect_adapter(load_adapter(path, format=format), modules=modules, spectrum=spectrum)
