"""Compose adapters: weighted combinations of LoRA deltas, written as one adapter.

Methods (per module, over the inputs that target it; targets are the union of the inputs'):

* ``linear`` (default): the exact weighted sum Σ wᵢ·ΔWᵢ = Σ wᵢ·sᵢ·Bᵢ·Aᵢ, cut optimally to a rank
  rule (default: the largest input rank). The stacked factors [w₁s₁B₁ …] and [A₁; …] give it
  through a (Σrᵢ)×(Σrᵢ) core (``lowrank.core_svd``); no d×k delta is ever formed. This is not
  PEFT's ``linear``, which weights A and B separately by √(w·s) and adds the factors, so its
  delta is not the weighted sum (PEFT issue #3004); it is what PEFT's ``svd`` computes, without the
  dense SVD.
* ``cat``: exact, rank Σrᵢ: the factors side by side, wᵢ·sᵢ folded into B (PEFT's ``cat`` folds
  them into A; the delta is the same).
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: PEFT's ``*_svd`` combination
  types: the merge functions of ``peft/utils/merge_utils.py`` on the dense deltas of one module at
  a time (memory bounded by one module), then a seeded randomized SVD to ``--rank``. DARE masks
  and sketches come from a generator seeded by (seed, module name), so a run is reproducible
  and does not depend on module order.

The output has scale 1: alpha = rank and no rsLoRA (as PEFT's ``add_weighted_adapter`` does), the
singular values split evenly between the factors. ``lora_B.bias`` (PEFT lora_bias) is summed
exactly: Σ wᵢ·sᵢ·biasᵢ. DoRA inputs are refused (each magnitude vector normalises its own W+ΔW,
so a combination of DoRA adapters is not a LoRA adapter), as are inputs whose modules_to_save
differ.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import TYPE_CHECKING, Sequence

from loratool.adapter import Adapter, LayerKind, LoraModule, dtype_of, load_tensor, shape_of
from loratool.adapter_specs import AdapterSpec, parse_adapter_specs
from loratool.errors import InputError, UsageError
from loratool.lowrank import (
    DELTA_METHODS,
    RankRule,
    core_svd,
    energy_kept,
    merge_deltas,
    randomized_svd,
    split_factors,
    stack_factors,
    truncation_error,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from loratool.schemas.lowrank import ComposeReport

METHODS = ("linear", "cat") + DELTA_METHODS


def module_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one module (blake2b, not Python's salted hash)."""
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# -- checks ---------------------------------------------------------------------------------------

def _label(adapter: Adapter, i: int) -> str:
    return str(adapter.path) if adapter.path else f"adapter #{i + 1}"


def _same_tensors(a: dict, b: dict) -> list[str]:
    """Names present in both with different content, plus names present in one only."""
    import torch

    diff = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        ta, tb = load_tensor(a[k]), load_tensor(b[k])
        if ta.shape != tb.shape or ta.dtype != tb.dtype or not torch.equal(ta, tb):
            diff.append(k)
    return diff


def check_inputs(adapters: Sequence[Adapter]) -> None:
    """Refuse what cannot be composed, naming every problem at once."""
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
    if problems:
        raise InputError("cannot compose: " + "; ".join(problems))


# -- per module -----------------------------------------------------------------------------------

def _reshape(m: LoraModule, B2: "torch.Tensor", A2: "torch.Tensor", dtype) -> tuple["torch.Tensor", "torch.Tensor"]:
    """2-D factors back into m's layout (conv: A keeps the kernel, B is 1×1)."""
    k = A2.shape[0]
    a_shape, b_shape = shape_of(m.lora_A), shape_of(m.lora_B)
    A = A2.reshape(k, *a_shape[1:]).to(dtype).contiguous()
    B = B2.reshape(b_shape[0], k, *b_shape[2:]).to(dtype).contiguous()
    return B, A


def _bias(owners, weights, dtype, with_bias: bool, out_features: int):
    import torch

    if not with_bias:
        return None
    total = torch.zeros(out_features, dtype=torch.float64)
    for i, m in owners:
        if m.lora_B_bias is not None:
            total += load_tensor(m.lora_B_bias).to(torch.float64) * (weights[i] * m.scale)
    return total.to(dtype)


def compose_module(name: str, owners: list[tuple[int, LoraModule]], weights: Sequence[float], method: str,
                   rule: RankRule | None, density: float | None, seed: int, dtype, with_bias: bool,
                   majority_sign_method: str = "total"):
    """Combine one module. Returns (LoraModule, report row)."""
    import torch

    from loratool.schemas.lowrank import ModuleCompose

    m0 = owners[0][1]
    factors = [(i, m, *m.factors_2d()) for i, m in owners]
    d_out, d_in = factors[0][2].shape[0], factors[0][3].shape[1]
    energy = None
    if method == "cat":
        B2 = torch.cat([b.to(torch.float64) * (weights[i] * m.scale) for i, m, b, _ in factors], dim=1)
        A2 = torch.cat([a.to(torch.float64) for _, _, _, a in factors], dim=0)
        k, error, energy = A2.shape[0], 0.0, 1.0
    elif method == "linear":
        B, A = stack_factors([(weights[i] * m.scale, b, a) for i, m, b, a in factors])
        U, S, Vh = core_svd(B, A, keep=lambda S: max(1, min(rule.choose(S, (d_out, d_in)), S.shape[0])))
        k = max(1, min(rule.choose(S, (d_out, d_in)), S.shape[0]))
        B2, A2 = split_factors(U, S, Vh, k)
        error, energy = truncation_error(S, k), energy_kept(S, k)
    else:
        g = torch.Generator().manual_seed(module_seed(seed, name))
        # PEFT computes get_delta_weight in float32 (upcasting half precision on the CPU)
        deltas = [(b.to(torch.float32) @ a.to(torch.float32)) * m.scale for _, m, b, a in factors]
        M = merge_deltas(deltas, [weights[i] for i, _ in owners], method, density, majority_sign_method, g)
        del deltas
        k = max(1, min(rule.rank, d_out, d_in))
        U, S, Vh = randomized_svd(M, k, generator=g)
        norm2 = float(torch.linalg.vector_norm(M, dtype=torch.float64) ** 2)
        del M
        S = S.to(torch.float64)
        B2, A2 = split_factors(U.to(torch.float64), S, Vh.to(torch.float64), k)
        error = 0.0 if norm2 == 0 else math.sqrt(max(norm2 - float((S ** 2).sum()), 0.0) / norm2)
    B, A = _reshape(m0, B2, A2, dtype)
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
                        input_ranks=[m.rank for _, m in owners], new_rank=k, energy_kept=energy,
                        relative_error=error)
    return module, row


# -- whole adapters -------------------------------------------------------------------------------

def _output_dtype(adapters: Sequence[Adapter]):
    import torch

    from loratool.safetensors_io import torch_dtype

    dtypes = {dtype_of(t) for a in adapters for m in a.modules.values() for t in (m.lora_A, m.lora_B)}
    return torch_dtype(dtypes.pop()) if len(dtypes) == 1 else torch.float32


def _output_config(adapters: Sequence[Adapter], names: set[str]) -> dict:
    peft = [a for a in adapters if a.format == "peft" and "components" not in a.config]
    if not peft:
        return {}
    config = {k: v for k, v in peft[0].config.items() if k not in ("rank_pattern", "alpha_pattern")}
    if names != set(peft[0].modules):  # the first config's layer selection may not cover the union
        for k in ("layers_to_transform", "layers_pattern", "exclude_modules"):
            config.pop(k, None)
    return config


def compose_adapters(adapters: Sequence[Adapter], weights: Sequence[float], method: str = "linear",
                     rule: RankRule | None = None, density: float | None = None, seed: int = 0,
                     majority_sign_method: str = "total", dtype=None) -> tuple[Adapter, "ComposeReport"]:
    """Combine ``adapters`` with ``weights`` (no I/O beyond reading their tensors).

    ``rule`` defaults to ``--rank`` = the largest input rank; ``cat`` takes no rule; the delta
    methods take a fixed rank only. ``dtype`` defaults to the inputs' common factor dtype
    (float32 when they differ).
    """
    from loratool.schemas.lowrank import ComposeInput, ComposeReport

    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if not adapters:
        raise UsageError("compose needs at least one adapter")
    if len(weights) != len(adapters):
        raise UsageError(f"{len(adapters)} adapters but {len(weights)} weights")
    check_inputs(adapters)
    max_rank = max(r for a in adapters for r in a.ranks) if any(a.modules for a in adapters) else 1
    if method == "cat":
        if rule is not None:
            raise UsageError("--method cat keeps every component (rank Σrᵢ) exactly; rank rules apply to the "
                             "other methods")
        if density is not None:
            raise UsageError("--density applies to ties, dare_linear, dare_ties and magnitude_prune, not cat")
    elif method == "linear":
        if density is not None:
            raise UsageError("--density applies to ties, dare_linear, dare_ties and magnitude_prune, not linear")
        rule = rule or RankRule(rank=max_rank)
    else:
        rule = rule or RankRule(rank=max_rank)
        if rule.rank is None:
            raise UsageError(f"--method {method} takes --rank only: its merged delta is full rank, and an energy or "
                             "singular-value rule would need its full SVD")
        if density is None:
            raise UsageError(f"--method {method} needs --density (the share of entries each delta keeps, in (0, 1])")
        if not 0 < density <= 1:
            raise UsageError(f"--density must be in (0, 1], found {density}")
    if majority_sign_method not in ("total", "frequency"):
        raise UsageError(f"majority sign method must be total or frequency, found {majority_sign_method!r}")

    dtype = dtype or _output_dtype(adapters)
    names = sorted({n for a in adapters for n in a.modules})
    with_bias = any(a.lora_bias for a in adapters)
    modules, rows = {}, []

    def one(name):
        owners = [(i, a.modules[name]) for i, a in enumerate(adapters) if name in a.modules]
        return compose_module(name, owners, weights, method, rule, density, seed, dtype, with_bias,
                              majority_sign_method)

    if method in ("linear", "cat"):
        # small tall-skinny work in factor space: modules spread over threads, one torch thread each
        from loratool._threads import map_modules

        results = map_modules(one, names)
    else:  # dense d×k deltas: one module at a time (memory bounded by one module), torch threaded
        results = [one(name) for name in names]
    for name, (module, row) in zip(names, results):
        modules[name] = module
        rows.append(row)

    warnings = []
    if rule is not None and rule.rank is not None:
        low = [r for r in rows if r.new_rank < rule.rank]
        if low:
            warnings.append(f"{len(low)} of {len(rows)} modules (e.g. {low[0].name!r}, rank {low[0].new_rank}) have "
                            f"rank below the target {rule.rank}: their combination has no more components "
                            "(at most Σrᵢ, or the layer size), so they are kept whole")

    formats = {a.format for a in adapters}
    fmt = formats.pop() if len(formats) == 1 else "peft"
    first = adapters[0]
    components = tuple(dict.fromkeys(c for a in adapters for c in a.components))
    metadata = {k: v for k, v in first.metadata.items() if k not in ("ss_network_dim", "ss_network_alpha")} \
        if fmt != "peft" else {}
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
    report = ComposeReport(
        inputs=[ComposeInput(path=_label(a, i), weight=w, format=a.format, num_modules=len(a.modules),
                             ranks=sorted(set(a.ranks))) for i, (a, w) in enumerate(zip(adapters, weights))],
        format=fmt,
        method=method,
        rule=rule.describe() if rule is not None else None,
        density=density,
        seed=seed if method in DELTA_METHODS else None,
        num_modules=len(rows),
        num_params=out.num_params,
        max_relative_error=max((r.relative_error for r in rows), default=0.0),
        modules=rows,
        warnings=warnings,
    )
    return out, report


def compose_paths(specs: str | Sequence[AdapterSpec | str], out: str | os.PathLike, method: str = "linear",
                  rule: RankRule | None = None, density: float | None = None, seed: int = 0,
                  overwrite: bool = False) -> "ComposeReport":
    """Read the adapters of ``specs`` (``"a:0.7,b:0.3"`` or ``AdapterSpec``s, the grammar of
    ``loratool.adapter_specs``), compose them, write ``out``."""
    from loratool.formats import write_adapter
    from loratool.resolve import load_adapter

    from loratool.manifest import finish_output, stamp_adapter
    from loratool.resize import _rule_params

    from loratool.adapter import require_usable

    specs = parse_adapter_specs(specs)
    weights = [s.weight for s in specs]
    adapters = [load_adapter(s.path) for s in specs]
    for a in adapters:
        require_usable(a)
    composed, report = compose_adapters(adapters, weights, method, rule, density, seed)
    params = {"method": method, "weights": weights, "density": density, "seed": seed,
              "rule": _rule_params(rule) if rule is not None else None}
    manifest = stamp_adapter(composed, "composed", adapters, params)
    write_adapter(composed, out, composed.format, overwrite=overwrite)
    finish_output(manifest, out)
    report.output = str(out)
    return report
