"""Compose adapters: weighted combinations of LoRA deltas, written as one adapter.

Per module, over the inputs that target it (targets are the union of the inputs'), a method of
``loratool.compose_methods`` does the math: ``linear`` (default; PEFT's ``svd``), ``cat``, and
PEFT's ``*_svd`` delta merges ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``. A PEFT
name is accepted for the method it equals; the report records loratool's name. This module owns
what is common to every method: input checks, the factors of each kind, lora_B.bias, the output
adapter and the report.

The output has scale 1: alpha = rank and no rsLoRA (as PEFT's ``add_weighted_adapter`` does), the
singular values split evenly between the factors. ``lora_B.bias`` (PEFT lora_bias) is summed
exactly: Σ wᵢ·sᵢ·biasᵢ. DoRA inputs are refused (each magnitude vector normalises its own W+ΔW,
so a combination of DoRA adapters is not a LoRA adapter), as are inputs whose modules_to_save
differ, and inputs recorded for different models (base names, manifest fingerprints, task types;
``--allow-different-bases`` overrides, and the lineage records it).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Callable, Sequence

from loratool.adapter import Adapter, AdapterModule, LayerKind, LoraModule, float_values, load_tensor
from loratool.adapter_specs import AdapterSpec, parse_adapter_specs
from loratool.compose_methods import ComposeMethod, ComposeOptions, Factors, get_method
from loratool.errors import InputError, UsageError
from loratool.formats import COMMON_FORMAT, get_format
from loratool.lowrank import RankRule

if TYPE_CHECKING:  # pragma: no cover
    from loratool.formats.loraconfig import LoraConfig
    from loratool.schemas.lowrank import ComposeReport


# -- checks ---------------------------------------------------------------------------------------

def _label(adapter: Adapter, i: int) -> str:
    return str(adapter.path) if adapter.path else f"adapter #{i + 1}"


def _same_tensors(a: dict, b: dict) -> list[str]:
    """Names present in both with different content, plus names present in one only (torch is
    imported only when there are tensors to compare)."""
    diff = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        import torch

        ta, tb = load_tensor(a[k]), load_tensor(b[k])
        if ta.shape != tb.shape or ta.dtype != tb.dtype or not torch.equal(ta, tb):
            diff.append(k)
    return diff


ALLOW_BASES_HINT = ("pass --allow-different-bases to compose them anyway (the override is recorded in the "
                    "output's lineage)")


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def model_differences(adapters: Sequence[Adapter]) -> list[str]:
    """What records that ``adapters`` belong to different models, one clause per input that
    differs from the first: the base each config names (compared as ``manifest.same_base_name``
    does: a Hub id or a local path, by its last part), the base each manifest fingerprints, and
    the PEFT task type. What either of a pair does not record is not compared."""
    from loratool.manifest import load_manifest, same_base_fingerprint, same_base_name

    manifests = [load_manifest(a) for a in adapters]
    first, m0 = adapters[0], manifests[0]
    out = []
    for i, (a, m) in enumerate(zip(adapters[1:], manifests[1:]), start=1):
        what = []
        n0, n = _text(first.base_model), _text(a.base_model)
        if n0 and n and not same_base_name(n0, n):
            what.append(f"base {n0!r} vs {n!r}")
        if m0 is not None and m is not None and m0.base is not None and m.base is not None \
                and same_base_fingerprint(m0.base, m.base) is False:
            what.append(f"their manifests record different bases ({m0.base.name or 'unnamed'} vs "
                        f"{m.base.name or 'unnamed'}, different fingerprints)")
        t0, t = _text(first.task_type), _text(a.task_type)
        if t0 and t and t0.upper() != t.upper():
            what.append(f"task type {t0} vs {t}")
        if what:
            out.append(f"{_label(first, 0)} and {_label(a, i)} are for different models: {', '.join(what)}")
    return out


def check_inputs(adapters: Sequence[Adapter], allow_different_bases: bool = False) -> list[str]:
    """Refuse what cannot be composed, naming every problem at once. Adapters recorded for
    different models (``model_differences``) are refused unless ``allow_different_bases``; then
    the differences are returned, for the caller to report and record."""
    problems = []
    for i, a in enumerate(adapters):
        dora = [n for n, m in a.modules.items() if m.use_dora]
        if dora:
            problems.append(
                f"{_label(a, i)} is a DoRA adapter ({len(dora)} modules with a magnitude vector, e.g. {dora[0]!r}): "
                "each magnitude normalises its own W+ΔW, so a weighted combination is not a LoRA adapter; "
                "merge DoRA adapters into the base one at a time instead")
    first = adapters[0]
    for i, a in enumerate(adapters[1:], start=1):
        diff = _same_tensors(first.modules_to_save, a.modules_to_save)
        if diff:
            problems.append(
                f"modules_to_save differ between {_label(first, 0)} and {_label(a, i)} (e.g. {diff[0]!r}): "
                "full replacement tensors cannot be combined; compose adapters trained with the same "
                "modules_to_save, or drop them first")
        diff = _same_tensors({k: v for k, v in first.extra_tensors.items() if k in a.extra_tensors},
                             {k: v for k, v in a.extra_tensors.items() if k in first.extra_tensors})
        if diff:
            problems.append(f"tensor {diff[0]!r} differs between {_label(first, 0)} and {_label(a, i)}; "
                            "it is not a LoRA factor and cannot be combined")
    for name in sorted({n for a in adapters for n in a.modules}):
        owners = [(i, a.modules[name]) for i, a in enumerate(adapters) if name in a.modules]
        i0, m0 = owners[0]
        for i, m in owners[1:]:
            if m.kind is not m0.kind or m.base_weight_shape != m0.base_weight_shape:
                problems.append(
                    f"module {name!r} is a {m0.kind.value} with base shape {list(m0.base_weight_shape)} in "
                    f"{_label(adapters[i0], i0)} but a {m.kind.value} with base shape {list(m.base_weight_shape)} "
                    f"in {_label(adapters[i], i)}: these adapters are for different models")
                break
    allowed = model_differences(adapters)
    if allowed and not allow_different_bases:
        # the override helps only when nothing else is wrong (modules of other shapes never combine)
        problems.append("; ".join(allowed) + ("" if problems else "; " + ALLOW_BASES_HINT))
        allowed = []
    if problems:
        raise InputError("cannot compose: " + "; ".join(problems))
    return allowed


# -- per module -----------------------------------------------------------------------------------

def _bias(owners, weights, dtype, with_bias: bool, out_features: int):
    import numpy as np

    from loratool.safetensors_io import host_tensor, st_dtype

    if not with_bias:
        return None
    total = np.zeros(out_features, dtype=np.float64)
    for i, m in owners:
        bias = m.tensors().get("lora_B_bias")
        if bias is not None:
            total += float_values(bias).astype(np.float64) * (weights[i] * m.scale)
    return host_tensor(total, dtype if isinstance(dtype, str) else st_dtype(dtype))


def compose_module(name: str, owners: list[tuple[int, AdapterModule]], weights: Sequence[float],
                   method: ComposeMethod, options: ComposeOptions, dtype, with_bias: bool):
    """Combine one module with ``method``. Returns (LoraModule, report row)."""
    from loratool.schemas.lowrank import ModuleCompose

    m0 = owners[0][1]
    forms = [(i, m, m.low_rank()) for i, m in owners]  # (B2, A2, scale) of each kind
    bad = [m for _, m, lr in forms if lr is None]
    if bad:
        raise UsageError(f"module {name!r}: a {bad[0].module_kind} module has no low-rank form to compose")
    done = method.compose(name, [Factors(weights[i], lr.scale, lr.B2, lr.A2) for i, _, lr in forms], options)
    k, d_out = done.rank, done.B2.shape[0]
    B, A = m0.factors_like(done.B2, done.A2, dtype)  # in m0's layout (conv: A keeps the kernel, B is 1×1)
    module = LoraModule(
        name=name,
        kind=m0.kind,
        lora_A=A,
        lora_B=B,
        alpha=float(k),  # scale 1: the weights and scales are in the factors
        use_rslora=False,
        lora_B_bias=_bias(owners, weights, dtype, with_bias and m0.kind is not LayerKind.EMBEDDING, d_out),
        config_rank=k,
        config_alpha=float(k),
    )
    row = ModuleCompose(name=name, kind=m0.kind.value, inputs=[i for i, _ in owners],
                        input_ranks=[m.rank for _, m in owners], new_rank=k, energy_kept=done.energy_kept,
                        relative_error=done.relative_error)
    return module, row


# -- whole adapters -------------------------------------------------------------------------------

def _output_dtype(adapters: Sequence[Adapter]) -> str:
    """The inputs' common factor dtype (a safetensors name), float32 when they differ."""
    dtypes = {d for a in adapters for m in a.modules.values() for d in m.delta_dtypes()}
    return dtypes.pop() if len(dtypes) == 1 else "F32"


def _output_config(adapters: Sequence[Adapter], names: set[str]) -> "LoraConfig | None":
    """The first input's PEFT config, as a composition of ``names`` keeps it (``LoraConfig.composed``)."""
    from loratool.formats.loraconfig import lora_config

    for a in adapters:
        config = lora_config(a)
        if config is not None:
            return config.composed(same_modules=names == set(a.modules))
    return None


def compose_adapters(adapters: Sequence[Adapter], weights: Sequence[float], method: str = "linear",
                     rule: RankRule | None = None, density: float | None = None, seed: int = 0,
                     majority_sign_method: str = "total", dtype=None,
                     allow_different_bases: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> tuple[Adapter, "ComposeReport"]:
    """Combine ``adapters`` with ``weights`` by ``method`` (a name of ``loratool.compose_methods``
    or a PEFT alias), with no I/O beyond reading their tensors.

    ``rule`` defaults to ``--rank`` = the largest input rank for the methods that take one (``cat``
    takes none, the dense-delta methods a fixed rank only). ``dtype`` defaults to the inputs'
    common factor dtype (float32 when they differ). Adapters recorded for different models are
    refused unless ``allow_different_bases`` (``check_inputs``; the report then warns).
    ``progress(n_done, n_total)`` is called after each module (in order, from worker threads).
    """
    from loratool.schemas.lowrank import ComposeInput, ComposeReport

    m = get_method(method)
    if not adapters:
        raise UsageError("compose needs at least one adapter")
    if len(weights) != len(adapters):
        raise UsageError(f"{len(adapters)} adapters but {len(weights)} weights")
    different_bases = check_inputs(adapters, allow_different_bases)
    max_rank = max(r for a in adapters for r in a.ranks) if any(a.modules for a in adapters) else 1
    rule = m.check(rule, density, max_rank)
    if majority_sign_method not in ("total", "frequency"):
        raise UsageError(f"majority sign method must be total or frequency, found {majority_sign_method!r}")

    dtype = dtype or _output_dtype(adapters)
    names = sorted({n for a in adapters for n in a.modules})
    with_bias = any(a.lora_bias for a in adapters)
    options = ComposeOptions(rule, density, seed, majority_sign_method)
    modules, rows = {}, []

    done, lock = [0], threading.Lock()

    def one(name):
        owners = [(i, a.modules[name]) for i, a in enumerate(adapters) if name in a.modules]
        result = compose_module(name, owners, weights, m, options, dtype, with_bias)
        if progress is not None:
            with lock:  # called in order, from the worker threads
                done[0] += 1
                progress(done[0], len(names))
        return result

    from loratool._threads import default_workers, map_modules

    # one torch thread per module, so a module's result does not depend on the worker count.
    # Dense d×k deltas: two modules at a time (memory bounded by two modules' deltas); small
    # tall-skinny work in factor space: modules spread over all the workers.
    results = map_modules(one, names, workers=min(2, default_workers()) if m.dense else None)
    for name, (module, row) in zip(names, results):
        modules[name] = module
        rows.append(row)

    warnings = [f"composed anyway (--allow-different-bases): {d}" for d in different_bases]
    if rule is not None and rule.rank is not None:
        low = [r for r in rows if r.new_rank < rule.rank]
        if low:
            warnings.append(f"{len(low)} of {len(rows)} modules (e.g. {low[0].name!r}, rank {low[0].new_rank}) have "
                            f"rank below the target {rule.rank}: their combination has no more components "
                            "(at most Σrᵢ, or the layer size), so they are kept whole")

    formats = {a.format for a in adapters}
    fmt = formats.pop() if len(formats) == 1 else COMMON_FORMAT
    first = adapters[0]
    components = tuple(dict.fromkeys(c for a in adapters for c in a.components))
    metadata = {k: v for k, v in first.metadata.items() if k not in ("ss_network_dim", "ss_network_alpha")} \
        if fmt != COMMON_FORMAT else {}
    extra = {}
    for a in adapters:
        extra.update(a.extra_tensors)
    out = Adapter(
        format=fmt,
        modules=modules,
        base_model=first.base_model,
        base_revision=first.base_revision,
        task_type=first.task_type,
        config=_output_config(adapters, set(names)),
        metadata=metadata,
        modules_to_save=dict(first.modules_to_save),
        extra_tensors=extra,
        components=components,
    )
    writable = get_format(fmt).check_writable
    if fmt != COMMON_FORMAT and writable is not None:
        try:
            writable(out)
        except UsageError as e:  # inputs read as a format their modules cannot be written in
            warnings.append(f"written as {COMMON_FORMAT}, not {fmt}: {e.message}")
            fmt = out.format = COMMON_FORMAT
            out.metadata = {}
    report = ComposeReport(
        inputs=[ComposeInput(path=_label(a, i), weight=w, format=a.format, num_modules=len(a.modules),
                             ranks=sorted(set(a.ranks))) for i, (a, w) in enumerate(zip(adapters, weights))],
        format=fmt,
        method=m.name,
        rule=rule.describe() if rule is not None else None,
        density=density,
        seed=seed if m.seeded else None,
        num_modules=len(rows),
        num_params=out.num_params,
        max_relative_error=max((r.relative_error for r in rows), default=0.0),
        modules=rows,
        warnings=warnings,
    )
    return out, report


def compose_paths(specs: str | Sequence[AdapterSpec | str], out: str | os.PathLike, method: str = "linear",
                  rule: RankRule | None = None, density: float | None = None, seed: int = 0,
                  overwrite: bool = False, allow_different_bases: bool = False,
                  progress: Callable[[int, int], None] | None = None, format: str | None = None) -> "ComposeReport":
    """Read the adapters of ``specs`` (``"a:0.7,b:0.3"`` or ``AdapterSpec``s, the grammar of
    ``loratool.adapter_specs``), compose them, write ``out``. With ``allow_different_bases``, what
    differed is recorded in the lineage step (``base_mismatch``) and its params. ``progress``: as
    ``compose_adapters``'s. ``format``: read every input as this format (detection otherwise)."""
    from loratool.formats import write_adapter
    from loratool.resolve import load_adapter

    from loratool.manifest import finish_output, stamp_adapter
    from loratool.resize import _rule_params

    from loratool.adapter import require_usable

    specs = parse_adapter_specs(specs)
    weights = [s.weight for s in specs]
    adapters = [load_adapter(s.path, format=format) for s in specs]
    for a in adapters:
        require_usable(a)
    composed, report = compose_adapters(adapters, weights, method, rule, density, seed,
                                        allow_different_bases=allow_different_bases, progress=progress)
    params = {"method": report.method, "weights": weights, "density": density, "seed": seed,
              "rule": _rule_params(rule) if rule is not None else None}
    different = model_differences(adapters) if allow_different_bases else []
    if different:
        params["allow_different_bases"] = True
    manifest = stamp_adapter(composed, "composed", adapters, params,
                             base_mismatch="; ".join(different) or None)
    write_adapter(composed, out, composed.format, overwrite=overwrite)
    finish_output(manifest, out)
    report.output = str(out)
    return report
