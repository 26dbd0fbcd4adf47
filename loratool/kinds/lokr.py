"""LoKr (LyCORIS ``lokr``, PEFT ``LOKR``): the Kronecker product of two factors.

    ΔW = scale · W1 ⊗ W2

W1 (a, b) is ``lokr_w1`` or ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, b); W2 (c, d[, kh, kw]) is
``lokr_w2``, ``lokr_w2_a`` (c, r) @ ``lokr_w2_b`` (r, d·kh·kw), or, with a Tucker core ``lokr_t2``
(r, r, kh, kw), ``rebuild_tucker(t2, w2_a (r, c), w2_b (r, d))``. out = a·c, in = b·d; a conv's
ΔW is W1 ⊗ W2 with W2's kernel kept (LyCORIS unsqueezes W1), which is the Kronecker product of
W1 and W2 flattened to (c, d·kh·kw), read as (out, in, kh, kw).

The scale is LyCORIS's forward pass: alpha / dim with dim the rank of the decomposed factor
(``lokr_w1_b``'s rows, else ``lokr_w2_b``'s), and 1 when both factors are full matrices (LyCORIS
sets alpha = dim then). PEFT's LoKr is always alpha / r with its config's r (``peft_rank``).

The SVD of a Kronecker product is the Kronecker product of the SVDs: the singular values are the
products σ1ᵢ·σ2ⱼ of the two small factors', and the exact low-rank form has rank
rank(W1)·rank(W2): W1 = P1 Q1, W2 = P2 Q2 give W1 ⊗ W2 = (P1 ⊗ P2)(Q1 ⊗ Q2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from loratool.kinds.base import Problem, TensorSource, register_kind, shape_of
from loratool.kinds.layout import LayerKind
from loratool.kinds.lycoris_base import (LycorisModule, abs_max, np_dtype, pair_bound, tucker_factors, tucker_problem,
                                         tucker_rebuild)


def _eye_split(w):
    """(P, Q) with P @ Q = w and inner dimension min(w's shape): the identity on the smaller side."""
    import numpy as np

    m, n = w.shape
    return (np.eye(m, dtype=w.dtype), w) if m <= n else (w, np.eye(n, dtype=w.dtype))


@register_kind
@dataclass
class LokrModule(LycorisModule):
    module_kind: ClassVar[str] = "lokr"
    algorithm: ClassVar[str] = "LoKr"
    # no one tensor is always there: readers build the class directly (``module_of`` with lokr_w1)
    required: ClassVar[frozenset[str]] = frozenset({"lokr_w1"})

    name: str
    kind: LayerKind
    alpha: float
    lokr_w1: TensorSource | None = None
    lokr_w1_a: TensorSource | None = None
    lokr_w1_b: TensorSource | None = None
    lokr_w2: TensorSource | None = None
    lokr_w2_a: TensorSource | None = None
    lokr_w2_b: TensorSource | None = None
    lokr_t2: TensorSource | None = None
    dora_scale: TensorSource | None = None
    kernel: tuple[int, ...] = ()  # a conv's kernel when W2 is flattened (lokr_w2_b (r, d·kh·kw))
    layer_note: str | None = None  # the reader's note when the file does not say the layer (lycoris_base)
    peft_rank: int | None = None  # PEFT: the scale is alpha / r, whatever the factors
    use_rslora: bool = False
    config_rank: int | None = None
    config_alpha: float | None = None
    source_keys: dict[str, str] = field(default_factory=dict)

    _ROLES: ClassVar[tuple[str, ...]] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                         "lokr_t2", "dora_scale")

    def tensors(self) -> dict[str, TensorSource]:
        return {r: getattr(self, r) for r in self._ROLES if getattr(self, r) is not None}

    @property
    def layout_name(self) -> str:
        """"full" (both factors full matrices), "one-factor" (W2 decomposed), "both-factors"."""
        if self.lokr_w1 is not None and self.lokr_w2 is not None:
            return "full"
        if self.lokr_w1 is None and self.lokr_w2 is None:
            return "both-factors"
        return "one-factor"

    @property
    def dim(self) -> int | None:
        if self.peft_rank is not None:
            return self.peft_rank
        if self.lokr_w1_b is not None:
            return shape_of(self.lokr_w1_b)[0]
        if self.lokr_w2_b is not None:
            return shape_of(self.lokr_w2_b)[0]
        return None  # both full: scale 1

    def _w1_shape(self) -> tuple[int, int]:
        if self.lokr_w1 is not None:
            return tuple(shape_of(self.lokr_w1)[:2])
        return shape_of(self.lokr_w1_a)[0], shape_of(self.lokr_w1_b)[-1]

    def _w2_shape(self) -> tuple[int, int, tuple[int, ...]]:
        """(c, d, kernel) of W2 (kernel from its tensors, else ``self.kernel``)."""
        k = tuple(self.kernel) if self.kind is LayerKind.CONV2D else ()
        if self.lokr_w2 is not None:
            s = shape_of(self.lokr_w2)
            return (s[0], s[1], tuple(s[2:])) if len(s) > 2 else (s[0], s[1] // max(1, math.prod(k)), k)
        if self.lokr_t2 is not None:
            return shape_of(self.lokr_w2_a)[1], shape_of(self.lokr_w2_b)[1], tuple(shape_of(self.lokr_t2)[2:])
        s = shape_of(self.lokr_w2_b)
        if len(s) > 2:
            return shape_of(self.lokr_w2_a)[0], s[1], tuple(s[2:])
        return shape_of(self.lokr_w2_a)[0], s[1] // max(1, math.prod(k)), k

    def out_in(self):
        (a, b), (c, d, k) = self._w1_shape(), self._w2_shape()
        return a * c, b * d, k

    def _ranks(self) -> tuple[int, int]:
        a, b = self._w1_shape()
        c, d, k = self._w2_shape()
        r1 = shape_of(self.lokr_w1_b)[0] if self.lokr_w1 is None else min(a, b)
        r2 = shape_of(self.lokr_w2_b)[0] if self.lokr_w2 is None else min(c, d * math.prod(k))
        return min(r1, a, b), min(r2, c, d * math.prod(k))

    @property
    def rank(self) -> int:
        return self.dim if self.dim is not None else self.exact_rank

    @property
    def exact_rank(self) -> int:
        r1, r2 = self._ranks()
        return r1 * r2

    def structure_problems(self) -> list[Problem]:
        s = {r: tuple(shape_of(t)) for r, t in self.tensors().items()}
        out: list[Problem] = []
        text = self.shapes_text()
        if (self.lokr_w1 is None) == (self.lokr_w1_a is None and self.lokr_w1_b is None) or \
                (self.lokr_w1 is None and (self.lokr_w1_a is None or self.lokr_w1_b is None)):
            out.append(Problem("LT102", f"LoKr W1 needs lokr_w1, or lokr_w1_a with lokr_w1_b: {text}"))
        if (self.lokr_w2 is None) == (self.lokr_w2_a is None and self.lokr_w2_b is None) or \
                (self.lokr_w2 is None and (self.lokr_w2_a is None or self.lokr_w2_b is None)):
            out.append(Problem("LT102", f"LoKr W2 needs lokr_w2, or lokr_w2_a with lokr_w2_b: {text}"))
        if out:
            return out
        if self.lokr_w1 is None and (len(s["lokr_w1_a"]) != 2 or len(s["lokr_w1_b"]) != 2
                                     or s["lokr_w1_a"][1] != s["lokr_w1_b"][0]):
            out.append(Problem("LT101", f"LoKr lokr_w1_a @ lokr_w1_b does not multiply: {text}"))
        if self.lokr_w1 is not None and len(s["lokr_w1"]) != 2:
            out.append(Problem("LT106", f"LoKr lokr_w1 must be 2-D, found {list(s['lokr_w1'])}"))
        if self.lokr_t2 is not None:
            if self.lokr_w2 is not None:
                out.append(Problem("LT106", "LoKr Tucker core lokr_t2 beside a full lokr_w2"))
            else:
                why = tucker_problem("LoKr", s["lokr_t2"], s["lokr_w2_a"], s["lokr_w2_b"],
                                     ("lokr_t2", "lokr_w2_a", "lokr_w2_b"))
                if why:
                    out.append(Problem("LT106", why))
        elif self.lokr_w2 is None and (len(s["lokr_w2_a"]) != 2 or s["lokr_w2_a"][1] != s["lokr_w2_b"][0]):
            out.append(Problem("LT101", f"LoKr lokr_w2_a @ lokr_w2_b does not multiply: {text}"))
        if self.lokr_w2 is not None and len(s["lokr_w2"]) not in (2, 4):
            out.append(Problem("LT106", f"LoKr lokr_w2 must be 2-D or 4-D (conv), found {list(s['lokr_w2'])}"))
        if self.peft_rank is not None and not out:  # PEFT makes every decomposed factor of rank r
            inner = [(role, s[role][0]) for role in ("lokr_w1_b", "lokr_w2_b") if role in s]
            off = [(role, k) for role, k in inner if k != self.peft_rank]
            if off:
                out.append(Problem("LT103", f"the config asks for rank {self.peft_rank} (r / rank_pattern) but "
                                            f"{off[0][0]} has rank {off[0][1]}; PEFT will refuse to load it"))
        return out + self.dora_problems()

    # -- values -------------------------------------------------------------------------------
    def _w1(self, v):
        return v["lokr_w1"] if self.lokr_w1 is not None else v["lokr_w1_a"] @ v["lokr_w1_b"]

    def _w2(self, v):
        """W2 flattened to (c, d·kh·kw)."""
        if self.lokr_w2 is not None:
            w = v["lokr_w2"]
        elif self.lokr_t2 is not None:
            w = tucker_rebuild(v["lokr_t2"], v["lokr_w2_a"], v["lokr_w2_b"])
        else:
            b = v["lokr_w2_b"]
            w = v["lokr_w2_a"] @ b.reshape(b.shape[0], -1)
        return w.reshape(w.shape[0], -1)

    def _d2(self, dt, loaded=None):
        import numpy as np

        v = self.vals(loaded, dt)
        return np.kron(self._w1(v), self._w2(v))

    def split(self, v):
        """((P1, Q1), (P2, Q2)) with W1 = P1 Q1, W2 (flat) = P2 Q2, inner dimensions the ranks."""
        if self.lokr_w1 is not None:
            p1 = _eye_split(v["lokr_w1"])
        else:
            p1 = (v["lokr_w1_a"], v["lokr_w1_b"])
        if self.lokr_w2 is not None:
            w = v["lokr_w2"]
            p2 = _eye_split(w.reshape(w.shape[0], -1))
        elif self.lokr_t2 is not None:
            p2 = tucker_factors(v["lokr_t2"], v["lokr_w2_a"], v["lokr_w2_b"])
        else:
            b = v["lokr_w2_b"]
            p2 = (v["lokr_w2_a"], b.reshape(b.shape[0], -1))
        return p1, p2

    def exact_factors(self, loaded=None):
        import numpy as np

        (p1, q1), (p2, q2) = self.split(self.vals(loaded, np.float64))
        return np.kron(p1, p2), np.kron(q1, q2)

    def factor_svds(self, loaded=None):
        """The thin SVDs (U, S, Vh) of W1 and of W2 (flat), float64, from their factors' QR cores."""
        import numpy as np

        from loratool.lowrank import core_svd

        (p1, q1), (p2, q2) = self.split(self.vals(loaded, np.float64))
        return core_svd(p1, q1), core_svd(p2, q2)

    def singular_values(self, low_rank=None):
        import numpy as np

        (_, s1, _), (_, s2, _) = self.factor_svds()
        return np.sort(np.outer(s1, s2).reshape(-1))[::-1] * abs(self.scale)

    def delta_rows(self, i: int, j: int, dtype=None):
        """Rows [i, j) of W1 ⊗ W2, from the rows of W1 and W2 that make them (Linear)."""
        import numpy as np
        import torch

        if self.kind is not LayerKind.LINEAR:
            return self.delta(dtype)[i:j]
        dtype = dtype or torch.float32
        v = self.vals(None, np_dtype(dtype))
        w1, w2 = self._w1(v), self._w2(v)
        c = w2.shape[0]
        rows = np.arange(i, j)
        d = (w1[rows // c][:, :, None] * w2[rows % c][:, None, :]).reshape(j - i, -1)
        d = d * d.dtype.type(self.scale)
        return torch.from_numpy(d).to(dtype)

    def bound(self, vals) -> float:
        import numpy as np

        v = {r: np.asarray(x, np.float64) for r, x in vals.items()}
        b1 = abs_max(v["lokr_w1"]) if self.lokr_w1 is not None else pair_bound(v["lokr_w1_a"], v["lokr_w1_b"])
        if self.lokr_w2 is not None:
            b2 = abs_max(v["lokr_w2"])
        else:
            p2, q2 = self.split(v)[1]
            b2 = pair_bound(p2, q2)
        return b1 * b2
