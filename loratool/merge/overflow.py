"""Values that cannot overflow silently (issue 11).

A finite but huge scale or factor would make the arithmetic of the engines write Inf or NaN.
Before anything is written, ``check_overflow`` bounds each merged tensor's delta from the factors
alone (|coef| · Σ_k max|B[:,k]|·max|A[k,:]|, one pass over each factor) and refuses one past the
output dtype's largest value; then every engine checks every block it writes for Inf/NaN where the
base is finite (what the base's own values add): ``numpy_engine.PlainMath`` on the numpy path,
``_check_block`` for torch's (CPU and CUDA blocks both reach it on the CPU). Either ends the merge
with one line, exit 2, and nothing at OUT (``_nonfinite_error`` words it for both).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from loratool.adapter import DTYPE_MAX, DTYPE_NAMES, F32_MAX, Magnitudes
from loratool.errors import InputError
from loratool.merge.plan import Action, MergePlan, TensorPlan
from loratool.text import listed

if TYPE_CHECKING:  # pragma: no cover
    import torch


def check_overflow(plan: MergePlan) -> None:
    """Refuse, before anything is written, merges whose scale and factors would write Inf: per
    merged tensor, Σ |coef| · Σ_k max|B[:,k]|·max|A[k,:]| (``LoraModule.overflow``) against the
    output dtype's largest value, from the factors alone. The base's own values are not read
    (that would read the base twice); what they add is caught by the executor's last guard,
    which checks every written block (``_check_block``, ``numpy_engine.PlainMath``)."""
    effect = "the merge would write Inf"
    problems: dict[str, None] = {}  # ordered, without repeats (a module's weight and bias)
    mags: dict[tuple[int, int], Magnitudes] = {}
    for t in plan.tensors():
        if t.action is not Action.MERGE:
            continue
        limit, name = DTYPE_MAX[t.dtype], DTYPE_NAMES[t.dtype]
        # the deltas' bound on one element: terms that add into disjoint rows of the tensor (q, k, v
        # fused, ``Term.rows``) never meet, so each block of rows is bounded on its own
        bounds: dict[tuple[int, int] | None, float] = {}
        found = False
        for term in t.terms:
            m, c = term.module, abs(term.coef)
            why = m.scale_overflow(limit, t.dtype, c, effect)
            if why is None:
                key = tuple(id(x) for x in m.tensors().values())
                if key not in mags:
                    mags[key] = m.magnitudes()
                mg = mags[key]
                if term.part == "bias":  # b + coef · lora_B.bias; the factors are the weight's term
                    bounds[term.rows] = bounds.get(term.rows, 0.0) + c * mg.bias
                    continue
                bounds[term.rows] = bounds.get(term.rows, 0.0) + c * mg.products
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
        whole = bounds.pop(None, 0.0)
        bound = whole + max(bounds.values(), default=0.0)
        if not found and not t.dora and bound > limit:  # several adapters (or a bias), each fine alone
            problems[f"base tensor {t.name!r}: the deltas of {', '.join(sorted({x.adapter for x in t.terms}))} "
                     f"together reach {bound:.3g}, past {name}'s largest value {limit:.3g}; {effect}; lower the "
                     "weights or fix the adapters' scales"] = None
    if problems:
        raise InputError(listed(list(problems), limit=2))


def _nonfinite_error(t: TensorPlan, count: int, row: int, col: int, value: float, base: float) -> InputError:
    """The last guard's error: a block of ``t`` came out Inf/NaN where the base is finite."""
    limit, name = DTYPE_MAX[t.dtype], DTYPE_NAMES[t.dtype]
    where = f"{t.src.file.path}: tensor {t.name!r}"
    row += getattr(t.src, "first_row", 0)  # a piece of a fused tensor (``plan.RowsRef``): the tensor's row
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
    bad = (~torch.isfinite(block) & torch.isfinite(w.reshape(block.shape).to(block.device))).reshape(-1)
    count = int(bad.sum())
    if count:
        k = int(bad.nonzero()[0, 0])
        cols = max(1, block.numel() // max(1, block.shape[0] if block.dim() else 1))
        raise _nonfinite_error(t, count, i + k // cols, k % cols, float(block.reshape(-1)[k]),
                               float(w.reshape(-1)[k]))
