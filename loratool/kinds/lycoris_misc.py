"""The other LyCORIS kinds: LoCon with a Tucker core, and the full weight difference.

LoCon+Tucker (LyCORIS ``locon``/``lora`` with use_tucker on a k×k conv): ``lora_down`` (r, in, 1, 1),
``lora_mid`` (r, r, kh, kw), ``lora_up`` (out, r, 1, 1):

    ΔW[p, q, …] = alpha/r · Σ_ij up[p, i] · mid[i, j, …] · down[j, q]

an exact LoRA of rank r: B2 = up, A2[i, (q, …)] = Σ_j mid[i, j, …] · down[j, q].

full (LyCORIS ``full``): ``diff`` is ΔW itself, in the base layout, and ``diff_b`` the bias's
difference; scale 1. It has no low-rank form; conversion to LoRA goes through the SVD of ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from loratool.kinds.base import Problem, TensorSource, register_kind, shape_of
from loratool.kinds.layout import LayerKind
from loratool.kinds.lycoris_base import LycorisModule, pair_bound, tucker_factors


@register_kind
@dataclass
class LoconTuckerModule(LycorisModule):
    module_kind: ClassVar[str] = "locon-tucker"
    algorithm: ClassVar[str] = "LoCon+Tucker"
    required: ClassVar[frozenset[str]] = frozenset({"lora_A", "lora_B", "lora_mid"})

    name: str
    kind: LayerKind
    lora_A: TensorSource  # lora_down (r, in, 1, 1)
    lora_B: TensorSource  # lora_up (out, r, 1, 1)
    lora_mid: TensorSource  # (r, r, kh, kw)
    alpha: float
    dora_scale: TensorSource | None = None
    use_rslora: bool = False
    config_rank: int | None = None
    config_alpha: float | None = None
    source_keys: dict[str, str] = field(default_factory=dict)

    def tensors(self):
        out = {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_mid": self.lora_mid}
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out

    @property
    def rank(self) -> int:
        return shape_of(self.lora_A)[0]

    @property
    def exact_rank(self) -> int:
        return shape_of(self.lora_mid)[0]

    def out_in(self):
        return shape_of(self.lora_B)[0], shape_of(self.lora_A)[1], tuple(shape_of(self.lora_mid)[2:])

    def structure_problems(self):
        a, b, m = (tuple(shape_of(t)) for t in (self.lora_A, self.lora_B, self.lora_mid))
        if len(m) != 4 or m[0] != b[1] or m[1] != a[0]:
            return [Problem("LT106", f"Tucker core lora_mid has shape {list(m)}, expected [{b[1] if len(b) > 1 else '?'}, "
                                     f"{a[0]}, kh, kw] (lora_up's rank, lora_down's rank, the kernel)")]
        if len(a) not in (2, 4) or math.prod(a[2:]) != 1 or len(b) not in (2, 4) or math.prod(b[2:]) != 1:
            return [Problem("LT106", f"LoCon+Tucker needs 1×1 lora_down and lora_up around the core: {self.shapes_text()}")]
        return self.dora_problems()

    def _v(self, v):
        a, b = v["lora_A"], v["lora_B"]
        return a.reshape(a.shape[0], a.shape[1]), b.reshape(b.shape[0], b.shape[1]), v["lora_mid"]

    def exact_factors(self, loaded=None):
        import numpy as np

        down, up, mid = self._v(self.vals(loaded, np.float64))
        _, a2 = tucker_factors(mid, np.eye(mid.shape[0]), down)
        return up, a2

    def _d2(self, dt, loaded=None):
        down, up, mid = self._v(self.vals(loaded, dt))
        import numpy as np

        _, a2 = tucker_factors(mid, np.eye(mid.shape[0], dtype=dt), down)
        return up @ a2

    def bound(self, vals) -> float:
        import numpy as np

        b2, a2 = self.exact_factors({r: np.asarray(x, np.float64) for r, x in vals.items()})
        return pair_bound(b2, np.abs(a2))


@register_kind
@dataclass
class FullModule(LycorisModule):
    module_kind: ClassVar[str] = "full"
    algorithm: ClassVar[str] = "full"
    required: ClassVar[frozenset[str]] = frozenset({"diff"})

    name: str
    kind: LayerKind
    diff: TensorSource  # ΔW in the base layout
    alpha: float = 1.0  # no alpha: the scale is 1
    lora_B_bias: TensorSource | None = None  # diff_b: the bias's difference (merged as PEFT's lora_B bias)
    use_rslora: bool = False
    config_rank: int | None = None
    config_alpha: float | None = None
    source_keys: dict[str, str] = field(default_factory=dict)

    def tensors(self):
        out = {"diff": self.diff}
        if self.lora_B_bias is not None:
            out["lora_B_bias"] = self.lora_B_bias
        return out

    @property
    def dim(self) -> None:
        return None

    @property
    def rank(self) -> int:
        return self.exact_rank

    def out_in(self):
        s = shape_of(self.diff)
        return s[0], (s[1] if len(s) > 1 else 1), tuple(s[2:])

    def structure_problems(self):
        s = tuple(shape_of(self.diff))
        out = []
        if len(s) not in (2, 4):
            out.append(Problem("LT106", f"full diff has shape {list(s)}, expected 2-D (Linear) or 4-D (Conv2d)"))
        if self.lora_B_bias is not None and tuple(shape_of(self.lora_B_bias)) != (s[0],):
            out.append(Problem("LT109", f"full diff_b has shape {list(shape_of(self.lora_B_bias))}, expected [{s[0]}]"))
        return out

    def _d2(self, dt, loaded=None):
        d = self.vals(loaded, dt)["diff"]
        return d.reshape(d.shape[0], -1)

    def bound(self, vals) -> float:
        import numpy as np

        return float(np.abs(vals["diff"]).max(initial=0))
