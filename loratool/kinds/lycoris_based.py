"""LyCORIS kinds whose ΔW depends on the base weight W: OFT, IA3, GLoRA (``needs_base``).

They have no ΔW of their own: ``delta()`` refuses with the reason, and the merge engines call
``delta_from_base(W_rows, i, j)`` with the base rows of each block instead (engines.TensorMath).
The formulas are the ones LyCORIS 4.1.3's forward pass applies (lycoris/modules/diag_oft.py,
ia3.py, glora.py; ``get_diff_weight`` equals the forward's delta for these three, the scale once):

diag-OFT (``oft_blocks`` (n, b, b), optional ``rescale`` (out, 1…), ``alpha`` = the constraint):
    Q_k = O_k − O_kᵀ, Q scaled to norm c = alpha·out when ‖Q‖ (over all blocks) exceeds it (c > 0),
    R_k = (I + Q_k)(I − Q_k)⁻¹ (Cayley),  ΔW[k-th row block] = (R_k − I)ᵀ · W[k-th row block]
    with rescale s (per output row): ΔW = s · R_kᵀ W − W.
    Old LyCORIS OFT (``oft_diag``) holds R_k itself (A1111's network_oft.py, ``is_R``).
    R is block-diagonal over output rows: a merge's row blocks are cut at multiples of b
    (``row_quantum``). Scale 1 (alpha is the constraint, not a scale).
IA3 (``weight``, ``on_input``): ΔW = W ∘ w, w per output row (on_input 0) or per input column
    (on_input 1); LyCORIS trains w from 0 (the forward applies W·(1 + w)). Scale 1.
GLoRA (``a1`` (in, r), ``a2`` (r, in), ``b1`` (out, r), ``b2`` (r, in·kh·kw), alpha):
    ΔW = alpha/r · (W·a1·a2 + b1·b2), W·a1·a2 over the input axis (per kernel position for conv).

Each kind reads its dimensions from its tensors; the ones the tensors do not say (OFT's and IA3's
other axis) come from the base in ``fit`` (as LyCORIS takes them from the model's layer). There is
no low-rank form without the base, so ``convert``, ``resize``, ``compose`` and ``inspect
--spectrum`` refuse these kinds with the reason; ``merge`` applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from loratool.kinds.base import Fit, Problem, TensorSource, float_values, register_kind, shape_of
from loratool.kinds.layout import LayerKind
from loratool.kinds.lycoris_base import LycorisModule, abs_max, pair_bound

if TYPE_CHECKING:  # pragma: no cover
    import numpy


class BaseDependentModule(LycorisModule):
    """What the base-dependent LyCORIS kinds share: no ΔW without the base, ``delta_from_base``
    instead; the unknown base dimensions (0 until ``fit`` says them)."""

    needs_base: ClassVar[bool] = True
    formula: ClassVar[str] = ""  # ΔW's formula, for messages

    def base_problem(self) -> str:
        return (f"module {self.name}: LyCORIS {self.algorithm}'s ΔW = {self.formula} depends on the base weight, "
                "which this command does not read; `loratool merge` applies it to a base")

    def _d2(self, dt, loaded=None):
        from loratool.errors import UsageError

        raise UsageError(self.base_problem())

    def low_rank(self, dtype=None, loaded=None):
        return None

    def exact_factors(self, loaded=None):
        return None

    @property
    def exact_rank(self) -> int:
        out, in_, k = self.out_in()
        return min(out, in_ * math.prod(k)) if in_ else out

    def row_quantum(self) -> int:
        """Row blocks of a merge must start at multiples of this (1: any row block)."""
        return 1

    def merge_problem(self, weight: float, sign: int) -> str | None:
        if sign < 0:
            return (f"LyCORIS {self.algorithm}: its ΔW = {self.formula} is computed from the base it was merged "
                    "into, which an unmerge does not have; unmerge refuses it")
        return None

    def fit(self, found, target=None):
        fit = super().fit(found, target)
        if fit.check != "LT302" or found is None:
            return fit
        adopted = self.adopt(tuple(found))
        if adopted is None:
            return fit
        self.base_shape, self.kind = adopted
        return Fit(self.name, None, target, tuple(found), tuple(found), self.kind)

    def adopt(self, found: tuple[int, ...]) -> tuple[tuple[int, ...], LayerKind] | None:
        """The base shape and layer kind a base of shape ``found`` gives this module, if it fits."""
        return None

    def _base_2d(self, w: "numpy.ndarray") -> "numpy.ndarray":
        return w.reshape(w.shape[0], -1)


def _adopt_out(out: int, kind: LayerKind, found: tuple[int, ...]):
    """A base whose output axis is ``out`` (any input axis, any kernel for Conv2d)."""
    if len(found) == 2 and found[0] == out and kind is LayerKind.LINEAR:
        return found, LayerKind.LINEAR
    if len(found) == 4 and found[0] == out:
        return found, LayerKind.CONV2D
    return None


@register_kind
@dataclass
class OftModule(BaseDependentModule):
    """LyCORIS diag-OFT (``oft_blocks``: Cayley form) or old OFT (``oft_diag``: R itself, ``is_r``;
    the tensor is this field either way)."""

    module_kind: ClassVar[str] = "oft"
    algorithm: ClassVar[str] = "OFT"
    formula: ClassVar[str] = "(R − I)·W"
    required: ClassVar[frozenset[str]] = frozenset({"oft_blocks"})

    name: str
    kind: LayerKind
    oft_blocks: TensorSource  # (n, b, b)
    alpha: float = 0.0  # the constraint per output row (0: none); not a scale
    rescale: TensorSource | None = None  # (out, 1…)
    is_r: bool = False  # oft_diag: the blocks are R itself
    base_shape: tuple[int, ...] | None = None
    use_rslora: bool = False
    config_rank: int | None = None
    config_alpha: float | None = None
    source_keys: dict[str, str] = field(default_factory=dict)

    def tensors(self):
        out = {"oft_diag" if self.is_r else "oft_blocks": self.oft_blocks}
        if self.rescale is not None:
            out["rescale"] = self.rescale
        return out

    @property
    def dim(self) -> None:
        return None  # scale 1

    @property
    def scale_rule(self) -> str:
        return "1 (alpha is the constraint)" if not self.is_r else "1"

    @property
    def scale_is_valid(self) -> bool:
        return math.isfinite(self.alpha) and self.alpha >= 0

    @property
    def rank(self) -> int:
        s = shape_of(self.oft_blocks)
        return s[-1] if s else 0

    def row_quantum(self) -> int:
        return max(1, self.rank)

    def out_in(self):
        s = tuple(shape_of(self.oft_blocks))
        out = s[0] * s[1] if len(s) == 3 else 0
        if self.base_shape is not None:
            return self.base_shape[0], self.base_shape[1], tuple(self.base_shape[2:])
        return out, 0, (1, 1) if self.kind is LayerKind.CONV2D else ()

    def adopt(self, found):
        return _adopt_out(self.out_in()[0], self.kind, found)

    def structure_problems(self):
        s = tuple(shape_of(self.oft_blocks))
        role = "oft_diag" if self.is_r else "oft_blocks"
        if len(s) != 3 or s[1] != s[2] or 0 in s:
            return [Problem("LT106", f"OFT {role} has shape {list(s)}, expected [blocks, b, b] (square blocks)")]
        if self.rescale is not None:
            r = tuple(shape_of(self.rescale))
            if not r or r[0] != s[0] * s[1] or math.prod(r) != r[0]:
                return [Problem("LT106", f"OFT rescale has shape {list(r)}, expected [{s[0] * s[1]}, 1…] (one per "
                                         "output row)")]
        return []

    def merge_problem(self, weight, sign):
        why = super().merge_problem(weight, sign)
        if why is None and self.rescale is not None and weight != 1.0:
            why = (f"LyCORIS OFT with rescale at weight {weight:g}: LyCORIS scales R − I, not the rescale, by the "
                   "multiplier; give it weight 1.0")
        return why

    def rotation(self, dt=None) -> "numpy.ndarray":
        """(R_k − I), (n, b, b), float64: from the Cayley form with the constraint, or R itself."""
        import numpy as np

        o = float_values(self.oft_blocks).astype(np.float64)
        eye = np.eye(o.shape[-1])
        if self.is_r:
            return o - eye
        q = o - np.swapaxes(o, 1, 2)
        c = self.alpha * o.shape[0] * o.shape[1]  # constraint · out (lycoris: self.constraint)
        if c > 0:
            # torch.norm(q) + 1e-8, in q's dtype (lycoris computes it in float32 from float32 blocks)
            norm = float(np.linalg.norm(q)) + 1e-8
            if norm > c:
                q = q * (c / norm)
        return np.linalg.solve(np.swapaxes(eye - q, 1, 2), np.swapaxes(eye + q, 1, 2)).swapaxes(1, 2) - eye

    def delta_from_base(self, w, i: int, j: int):
        """Rows [i, j) of ΔW (multiples of the block size), from the base rows ``w``."""
        import numpy as np

        b = self.rank
        if i % b or (j - i) % b:
            raise ValueError(f"OFT rows [{i}, {j}) are not whole blocks of {b} rows")
        rm = self.rotation()[i // b: j // b]  # (m, b, b)
        w64 = np.asarray(w, np.float64)
        blocks = w64.reshape(rm.shape[0], b, -1)
        d = np.einsum("knm,knc->kmc", rm, blocks).reshape(w64.shape)
        if self.rescale is not None:
            s = float_values(self.rescale).astype(np.float64).reshape(-1)[i:j].reshape(-1, *([1] * (w64.ndim - 1)))
            d = s * d + (s - 1) * w64
        return d.astype(w.dtype, copy=False)

    def bound(self, vals) -> float:
        """max |R − I| (at most 2 for an orthogonal R), times the largest rescale: ΔW per unit of W."""
        import numpy as np

        s = abs_max(vals["rescale"]) if "rescale" in vals else 1.0
        return float(np.abs(self.rotation()).max(initial=0)) * max(1.0, s) + abs(s - 1)


@register_kind
@dataclass
class Ia3Module(BaseDependentModule):
    """LyCORIS IA3: ΔW = W ∘ w, w per output row, or per input column with ``on_input``."""

    module_kind: ClassVar[str] = "ia3"
    algorithm: ClassVar[str] = "IA3"
    required: ClassVar[frozenset[str]] = frozenset({"weight", "on_input"})

    name: str
    kind: LayerKind
    weight: TensorSource  # (n,) Linear, (1, n, 1, 1) Conv2d
    on_input: bool = False
    alpha: float = 1.0
    base_shape: tuple[int, ...] | None = None
    use_rslora: bool = False
    config_rank: int | None = None
    config_alpha: float | None = None
    source_keys: dict[str, str] = field(default_factory=dict)

    @property
    def formula(self) -> str:  # type: ignore[override]
        return "W·diag(w) (per input column)" if self.on_input else "diag(w)·W (per output row)"

    def tensors(self):
        return {"weight": self.weight}

    @property
    def dim(self) -> None:
        return None

    @property
    def rank(self) -> int:
        return 1

    @property
    def size(self) -> int:
        return math.prod(shape_of(self.weight))

    def out_in(self):
        if self.base_shape is not None:
            return self.base_shape[0], self.base_shape[1], tuple(self.base_shape[2:])
        k = (1, 1) if self.kind is LayerKind.CONV2D else ()
        return (0, self.size, k) if self.on_input else (self.size, 0, k)

    def adopt(self, found):
        if len(found) not in (2, 4) or (len(found) == 2) != (self.kind is LayerKind.LINEAR):
            return None
        if found[1 if self.on_input else 0] != self.size:
            return None
        return found, self.kind

    def structure_problems(self):
        s = tuple(shape_of(self.weight))
        if self.kind is LayerKind.CONV2D:
            ok = len(s) == 4 and s[0] == 1 and s[2:] == (1, 1)
        else:
            ok = len(s) == 1
        if not ok or 0 in s:
            want = "[1, channels, 1, 1] (Conv2d)" if self.kind is LayerKind.CONV2D else "[features] (Linear)"
            return [Problem("LT106", f"IA3 weight has shape {list(s)}, expected {want}")]
        return []

    def delta_from_base(self, w, i: int, j: int):
        import numpy as np

        v = float_values(self.weight).astype(np.float64).reshape(-1)
        w64 = np.asarray(w, np.float64)
        if self.on_input:
            d = w64 * v.reshape(1, -1, *([1] * (w64.ndim - 2)))
        else:
            d = w64 * v[i:j].reshape(-1, *([1] * (w64.ndim - 1)))
        return d.astype(w.dtype, copy=False)

    def bound(self, vals) -> float:
        return abs_max(vals["weight"])


@register_kind
@dataclass
class GloraModule(BaseDependentModule):
    """LyCORIS GLoRA: ΔW = alpha/r · (W·a1·a2 + b1·b2)."""

    module_kind: ClassVar[str] = "glora"
    algorithm: ClassVar[str] = "GLoRA"
    formula: ClassVar[str] = "alpha/r·(W·a1·a2 + b1·b2)"
    required: ClassVar[frozenset[str]] = frozenset({"a1", "a2", "b1", "b2"})

    name: str
    kind: LayerKind
    a1: TensorSource  # (in, r[, 1, 1])
    a2: TensorSource  # (r, in[, 1, 1])
    b1: TensorSource  # (out, r[, 1, 1])
    b2: TensorSource  # (r, in[, kh, kw])
    alpha: float
    use_rslora: bool = False
    config_rank: int | None = None
    config_alpha: float | None = None
    source_keys: dict[str, str] = field(default_factory=dict)

    def tensors(self):
        return {"a1": self.a1, "a2": self.a2, "b1": self.b1, "b2": self.b2}

    @property
    def rank(self) -> int:
        return shape_of(self.a2)[0]

    def out_in(self):
        b1, b2 = shape_of(self.b1), shape_of(self.b2)
        return b1[0], b2[1], tuple(b2[2:])

    def structure_problems(self):
        a1, a2, b1, b2 = (tuple(shape_of(t)) for t in (self.a1, self.a2, self.b1, self.b2))
        r, in_ = (a2[0], a2[1]) if len(a2) >= 2 else (0, 0)
        flat = all(len(s) in (2, 4) and math.prod(s[2:]) == 1 for s in (a1, a2, b1))
        if not flat or len(b2) not in (2, 4) or 0 in a2:
            return [Problem("LT106", f"GLoRA factors of unknown layout: {self.shapes_text()} (expected a1 [in, r], "
                                     "a2 [r, in], b1 [out, r], b2 [r, in(, kh, kw)])")]
        if a1[:2] != (in_, r) or b1[1] != r or b2[:2] != (r, in_):
            return [Problem("LT101", f"GLoRA factors disagree on the rank or input size: {self.shapes_text()} "
                                     f"(expected a1 [{in_}, {r}], b1 [out, {r}], b2 [{r}, {in_}(, kh, kw)])")]
        return []

    def _v(self, loaded=None):
        import numpy as np

        v = self.vals(loaded, np.float64)
        a1, a2, b1, b2 = (v[k] for k in ("a1", "a2", "b1", "b2"))
        return (a1.reshape(a1.shape[0], -1), a2.reshape(a2.shape[0], -1), b1.reshape(b1.shape[0], -1),
                b2.reshape(b2.shape[0], -1))

    def delta_from_base(self, w, i: int, j: int):
        import numpy as np

        a1, a2, b1, b2 = self._v()
        w64 = np.asarray(w, np.float64)
        m = a1 @ a2  # (in, in)
        if w64.ndim == 4:  # over the input axis, per kernel position
            wa = np.einsum("oi...,ij->oj...", w64, m)
        else:
            wa = w64 @ m
        d = self.scale * (wa + (b1[i:j] @ b2).reshape(wa.shape))
        return d.astype(w.dtype, copy=False)

    def bound(self, vals) -> float:
        import numpy as np

        a1, a2, b1, b2 = self._v({k: np.asarray(x, np.float64) for k, x in vals.items()})
        return max(pair_bound(a1, a2), pair_bound(b1, b2))
