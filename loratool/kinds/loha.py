"""LoHa (LyCORIS ``loha``, PEFT ``LOHA``): the Hadamard product of two low-rank products.

    ΔW = scale · (W1a @ W1b) ∘ (W2a @ W2b)            scale = alpha / r1

Factors as LyCORIS and PEFT store them: ``hada_w1_a`` (out, r1), ``hada_w1_b`` (r1, in·kh·kw),
``hada_w2_a`` (out, r2), ``hada_w2_b`` (r2, in·kh·kw); a conv layer's factors are flattened (the
base says the kernel, ``lycoris_base.kernel_fit``). With Tucker cores (``hada_t1``/``hada_t2``,
LyCORIS use_tucker, PEFT use_effective_conv2d) each half is ``rebuild_tucker(t, w_a, w_b)`` with
t (r, r, kh, kw), w_a (r, out), w_b (r, in).

Exact low-rank form: (B1 A1) ∘ (B2 A2) = (B1 • B2)(A1 ∘ A2), the face-splitting product (row-wise
Kronecker of the B's) times the column-wise Khatri–Rao product of the A's: a LoRA of rank r1·r2,
exactly; its QR core then gives the optimal truncation. Tucker halves are first written as 2-D
products (``tucker_factors``), so the same holds for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from loratool.kinds.base import Problem, TensorSource, register_kind, shape_of
from loratool.kinds.layout import LayerKind
from loratool.kinds.lycoris_base import LycorisModule, pair_bound, tucker_factors, tucker_problem, tucker_rebuild


def face_split(b1, a1, b2, a2):
    """(B, A) with B @ A = (b1 @ a1) ∘ (b2 @ a2): B (out, r1·r2) row-wise Kronecker, A (r1·r2, n)
    column-wise Khatri–Rao."""
    out, n = b1.shape[0], a1.shape[1]
    B = (b1[:, :, None] * b2[:, None, :]).reshape(out, -1)
    A = (a1[:, None, :] * a2[None, :, :]).reshape(-1, n)
    return B, A


@register_kind
@dataclass
class LohaModule(LycorisModule):
    module_kind: ClassVar[str] = "loha"
    algorithm: ClassVar[str] = "LoHa"
    required: ClassVar[frozenset[str]] = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})

    name: str
    kind: LayerKind
    hada_w1_a: TensorSource
    hada_w1_b: TensorSource
    hada_w2_a: TensorSource
    hada_w2_b: TensorSource
    alpha: float
    hada_t1: TensorSource | None = None
    hada_t2: TensorSource | None = None
    dora_scale: TensorSource | None = None
    kernel: tuple[int, ...] = ()  # a conv's kernel when the factors are flattened (non-Tucker)
    layer_note: str | None = None  # the reader's note when the file does not say the layer (lycoris_base)
    use_rslora: bool = False
    config_rank: int | None = None
    config_alpha: float | None = None
    source_keys: dict[str, str] = field(default_factory=dict)

    @property
    def tucker(self) -> bool:
        return self.hada_t1 is not None or self.hada_t2 is not None

    def tensors(self) -> dict[str, TensorSource]:
        out = {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
               "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}
        for role in ("hada_t1", "hada_t2", "dora_scale"):
            if getattr(self, role) is not None:
                out[role] = getattr(self, role)
        return out

    @property
    def rank(self) -> int:
        """r1 (LyCORIS's dim: the scale is alpha / r1)."""
        return shape_of(self.hada_w1_b)[0]

    @property
    def exact_rank(self) -> int:
        out, in_, k = self.out_in()
        return min(shape_of(self.hada_w1_b)[0] * shape_of(self.hada_w2_b)[0], out, in_ * math.prod(k))

    def out_in(self):
        if self.tucker and self.hada_t1 is not None:
            t = shape_of(self.hada_t1)
            return shape_of(self.hada_w1_a)[-1], shape_of(self.hada_w1_b)[-1], tuple(t[2:])
        out, cols = shape_of(self.hada_w1_a)[0], math.prod(shape_of(self.hada_w1_b)[1:])
        k = self.kernel if self.kind is LayerKind.CONV2D else ()
        return out, cols // max(1, math.prod(k)), tuple(k)

    def structure_problems(self) -> list[Problem]:
        s = {r: tuple(shape_of(t)) for r, t in self.tensors().items()}
        out: list[Problem] = []
        if self.tucker:
            if self.hada_t1 is None or self.hada_t2 is None:
                out.append(Problem("LT106", "LoHa with one Tucker core: hada_t1 and hada_t2 come together"))
            else:
                for h in ("1", "2"):
                    why = tucker_problem("LoHa", s[f"hada_t{h}"], s[f"hada_w{h}_a"], s[f"hada_w{h}_b"],
                                         (f"hada_t{h}", f"hada_w{h}_a", f"hada_w{h}_b"))
                    if why:
                        out.append(Problem("LT106", why))
                if not out and (s["hada_t1"][2:] != s["hada_t2"][2:] or s["hada_w1_a"][1] != s["hada_w2_a"][1]
                                or s["hada_w1_b"][1] != s["hada_w2_b"][1]):
                    out.append(Problem("LT106", f"LoHa halves differ: {self.shapes_text()}"))
        else:
            if any(len(s[r]) != 2 for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
                out.append(Problem("LT106", f"LoHa factors must be 2-D (conv factors flattened): {self.shapes_text()}"))
            elif s["hada_w1_a"][1] != s["hada_w1_b"][0] or s["hada_w2_a"][1] != s["hada_w2_b"][0]:
                out.append(Problem("LT101", f"LoHa rank mismatch: {self.shapes_text()}"))
            elif s["hada_w1_a"][0] != s["hada_w2_a"][0] or s["hada_w1_b"][1] != s["hada_w2_b"][1]:
                out.append(Problem("LT106", f"LoHa halves give different shapes: {self.shapes_text()}"))
            elif self.kind is LayerKind.CONV2D and self.kernel and s["hada_w1_b"][1] % math.prod(self.kernel):
                out.append(Problem("LT106", f"LoHa hada_w1_b has {s['hada_w1_b'][1]} columns, not a multiple of "
                                            f"the kernel {list(self.kernel)}"))
        if not out and 0 in (s["hada_w1_b"][0], s["hada_w2_b"][0]):
            out.append(Problem("LT106", f"LoHa rank 0: {self.shapes_text()}"))
        return out + self.dora_problems()

    def halves(self, v):
        """The two halves as 2-D factor pairs ((B1, A1), (B2, A2)), B @ A (out, in·kh·kw)."""
        if self.tucker:
            return (tucker_factors(v["hada_t1"], v["hada_w1_a"], v["hada_w1_b"]),
                    tucker_factors(v["hada_t2"], v["hada_w2_a"], v["hada_w2_b"]))
        return ((v["hada_w1_a"], v["hada_w1_b"].reshape(v["hada_w1_b"].shape[0], -1)),
                (v["hada_w2_a"], v["hada_w2_b"].reshape(v["hada_w2_b"].shape[0], -1)))

    def _d2(self, dt, loaded=None):
        v = self.vals(loaded, dt)
        if self.tucker:  # LyCORIS's order: rebuild each half, then the Hadamard product
            w1 = tucker_rebuild(v["hada_t1"], v["hada_w1_a"], v["hada_w1_b"])
            w2 = tucker_rebuild(v["hada_t2"], v["hada_w2_a"], v["hada_w2_b"])
            return (w1 * w2).reshape(w1.shape[0], -1)
        (b1, a1), (b2, a2) = self.halves(v)
        return (b1 @ a1) * (b2 @ a2)

    def exact_factors(self, loaded=None):
        import numpy as np

        (b1, a1), (b2, a2) = self.halves(self.vals(loaded, np.float64))
        return face_split(b1, a1, b2, a2)

    def bound(self, vals) -> float:
        import numpy as np

        (b1, a1), (b2, a2) = self.halves({r: np.asarray(x, np.float64) for r, x in vals.items()})
        return pair_bound(b1, a1) * pair_bound(b2, a2)
