"""LoRA: delta = scale · B @ A (peft/tuners/lora/layer.py), with PEFT's optional ``lora_B`` bias.

Factors are stored as PEFT stores them:

    Linear / Conv1D:  A (r, in_features),  B (out_features, r)
    Conv2d:           A (r, in, kh, kw),   B (out, r, 1, 1)
    Embedding:        A (r, num_embeddings), B (embedding_dim, r)   (PEFT's lora_embedding_A/B)

``scale`` is PEFT's: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. ``delta()`` computes the
update the way PEFT's ``get_delta_weight`` does, then puts it in the base layout
(``kinds.layout``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from loratool.kinds import layout
from loratool.kinds.base import (
    AdapterModule,
    LowRank,
    Magnitudes,
    Problem,
    TensorSource,
    dtype_of,
    float_values,
    load_tensor,
    register_kind,
    shape_of,
)
from loratool.kinds.layout import LayerKind
from loratool.safetensors_io import host_tensor, st_dtype, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import torch


def factor_problem(a: TensorSource, b: TensorSource, names: tuple[str, str] = ("lora_A", "lora_B"),
                   embedding: bool = False) -> str | None:
    """What makes a pair of factors unusable, or None: the readers of every format call this and
    record the answer as a problem of the module (validate reports it; other commands refuse)."""
    from loratool.safetensors_io import FLOAT_DTYPES

    sa, sb = shape_of(a), shape_of(b)
    na, nb = names
    if len(sa) != len(sb) or len(sa) not in (2, 4) or (embedding and len(sa) != 2):
        return (f"factor dimensions fit no layer: {na} {list(sa)} and {nb} {list(sb)} (expected two 2-D "
                "factors, or two 4-D conv factors)")
    if sa[0] != sb[1]:
        return f"A/B rank mismatch: {na} has rank {sa[0]} (shape {list(sa)}) but {nb} has {sb[1]} (shape {list(sb)})"
    if sa[0] == 0:
        return f"rank 0: {na} {list(sa)} and {nb} {list(sb)} hold no component"
    if len(sb) == 4 and tuple(sb[2:]) != (1, 1):
        return f"factor dimensions fit no layer: conv {nb} must be 1×1, found kernel {list(sb[2:])}"
    bad = [f"{n} is {dtype_of(t)}" for n, t in ((na, a), (nb, b)) if dtype_of(t) not in FLOAT_DTYPES]
    if bad:
        return f"factors must be floating point: {', '.join(bad)}"
    return None


def _abs_max(x, axis=None):
    import numpy as np

    return np.abs(x).max(axis=axis, initial=0).astype(np.float64)


@register_kind
@dataclass
class LoraModule(AdapterModule):
    module_kind: ClassVar[str] = "lora"
    required: ClassVar[frozenset[str]] = frozenset({"lora_A", "lora_B"})
    magnitude = None  # a DoraModule's field (kinds/dora.py); not annotated, so not a field here

    name: str
    kind: LayerKind
    lora_A: TensorSource
    lora_B: TensorSource
    alpha: float
    use_rslora: bool = False
    lora_B_bias: TensorSource | None = None  # PEFT lora_bias=True
    # The rank and alpha the source's config asks for (PEFT: r/rank_pattern, lora_alpha/
    # alpha_pattern), when it has a config; validate compares them with the tensors.
    config_rank: int | None = None
    config_alpha: float | None = None
    # Keys of the source file that this module was read from (for error messages and reports).
    source_keys: dict[str, str] = field(default_factory=dict)

    # -- shapes -------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return shape_of(self.lora_A)[0]

    @property
    def use_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def in_features(self) -> int:
        """Input size (num_embeddings for an embedding, in_channels for a conv)."""
        return shape_of(self.lora_A)[1]

    @property
    def out_features(self) -> int:
        return shape_of(self.lora_B)[0]

    @property
    def base_weight_shape(self) -> tuple[int, ...]:
        a = shape_of(self.lora_A)
        return layout.base_shape(self.kind, self.out_features, a[1], a[2:])

    def tensors(self) -> dict[str, TensorSource]:
        out: dict[str, TensorSource] = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.lora_B_bias is not None:
            out["lora_B_bias"] = self.lora_B_bias
        return out

    def delta_dtypes(self) -> list[str]:
        return [dtype_of(self.lora_A), dtype_of(self.lora_B)]

    def shapes_text(self) -> str:
        return f"lora_A {list(shape_of(self.lora_A))}, lora_B {list(shape_of(self.lora_B))}"

    def structure_problems(self) -> list[Problem]:
        out = []
        why = layout.factor_layout_problem(self.kind, shape_of(self.lora_A), shape_of(self.lora_B))
        if why:
            out.append(Problem("LT106", why))
        if self.lora_B_bias is not None and shape_of(self.lora_B_bias) != (self.out_features,):
            out.append(Problem("LT109", f"lora_B bias has shape {list(shape_of(self.lora_B_bias))}, expected "
                                        f"[{self.out_features}] (one per output feature)"))
        return out

    # -- values -------------------------------------------------------------------------------
    def A(self) -> "torch.Tensor":
        return load_tensor(self.lora_A)

    def B(self) -> "torch.Tensor":
        return load_tensor(self.lora_B)

    def factors_2d(self, dtype=None, loaded: "dict[str, numpy.ndarray] | None" = None):
        """(B2, A2) with B2 (out, r), A2 (r, in·kh·kw): delta_2d = scale · B2 @ A2 (before any
        transpose/reshape into the base layout). Without ``dtype``: numpy arrays of the exact
        values (``float_values``, no torch); with a torch ``dtype`` (the merge, ``delta``): torch
        tensors in it. ``loaded``: this module's tensors as ``load()`` returned them, so that they
        are not read again."""
        if dtype is None:
            a, b = (float_values(loaded["lora_A"]), float_values(loaded["lora_B"])) if loaded is not None \
                else (float_values(self.lora_A), float_values(self.lora_B))
        else:
            a, b = (load_tensor(loaded["lora_A"]), load_tensor(loaded["lora_B"])) if loaded is not None \
                else (self.A(), self.B())
            a, b = a.to(dtype), b.to(dtype)
        return b.reshape(b.shape[0], b.shape[1]), a.reshape(a.shape[0], -1)

    def low_rank(self, dtype=None, loaded: "dict[str, numpy.ndarray] | None" = None) -> LowRank:
        return LowRank(*self.factors_2d(dtype, loaded), self.scale)

    def factors_like(self, B2, A2, dtype=None):
        """2-D factors B2 (out, k), A2 (k, in·kh·kw) in this module's layout (conv: A keeps the
        kernel, B is 1×1), as (B, A) in ``dtype`` (a torch dtype or a safetensors name; default:
        each factor's own dtype). numpy factors give ``HostTensor``s, rounded as torch rounds
        (``safetensors_io.host_tensor``: no torch); torch factors give torch tensors."""
        k = A2.shape[0]
        a_shape, b_shape = shape_of(self.lora_A), shape_of(self.lora_B)
        a_shape, b_shape = (k, *a_shape[1:]), (b_shape[0], k, *b_shape[2:])
        if dtype is not None and not isinstance(dtype, str):
            dtype = st_dtype(dtype)
        a_dtype, b_dtype = (dtype, dtype) if dtype is not None else (dtype_of(self.lora_A), dtype_of(self.lora_B))
        if not hasattr(A2, "detach"):  # numpy
            return host_tensor(B2.reshape(b_shape), b_dtype), host_tensor(A2.reshape(a_shape), a_dtype)
        A = A2.reshape(a_shape).to(torch_dtype(a_dtype)).contiguous()
        B = B2.reshape(b_shape).to(torch_dtype(b_dtype)).contiguous()
        return B, A

    def with_factors(self, B2, A2) -> "LoraModule":
        """This module with new factors of rank k = A2.shape[0] (in its layout and dtypes; numpy
        factors give ``HostTensor``s, torch factors torch tensors), alpha kept, so its scale
        becomes PEFT's for rank k; a lora_B bias is multiplied by scale_old / scale_new so that its
        contribution, scale · bias, is unchanged. The config follows the tensors (config_rank k),
        and no source keys remain."""
        B, A = self.factors_like(B2, A2)
        new = dataclasses.replace(self, lora_A=A, lora_B=B, config_rank=A2.shape[0], config_alpha=self.alpha,
                                  source_keys={})
        if self.lora_B_bias is not None:
            ratio = self.scale / new.scale
            if not hasattr(A2, "detach"):
                new.lora_B_bias = host_tensor(float_values(self.lora_B_bias).astype("f8") * ratio,
                                              dtype_of(self.lora_B_bias))
            else:
                import torch

                t = load_tensor(self.lora_B_bias)
                new.lora_B_bias = (t.to(torch.float64) * ratio).to(t.dtype)
        return new

    def delta(self, dtype=None) -> "torch.Tensor":
        """The scaled update ``scale · B @ A`` in the base weight's layout.

        ``dtype`` defaults to float32 (PEFT merges in the factors' dtype upcast to float32 on the
        CPU when they are half precision). DoRA's rescaling needs the base: it is the merge's.
        """
        import torch

        b2, a2 = self.factors_2d(dtype or torch.float32)
        return layout.to_base(self.kind, (b2 @ a2) * self.scale, self.base_weight_shape)

    def delta_rows(self, i: int, j: int, dtype=None) -> "torch.Tensor":
        """Rows [i, j) of ``delta``, from the factors' rows (or columns) that make them."""
        import torch

        if not layout.row_blocked(self.kind):
            return self.delta(dtype)[i:j]
        b2, a2 = self.factors_2d(dtype or torch.float32)
        return layout.block_delta(self.kind, b2, a2, i, j) * self.scale

    def magnitudes(self, loaded: "dict[str, torch.Tensor] | None" = None) -> Magnitudes:
        """``Magnitudes``: products = Σ_k max|B[:, k]| · max|A[k, :]| (cheap: one pass over each
        factor, and at most r times the largest element of |B| @ |A|). Its tensors must be
        finite."""
        import numpy as np

        srcs = loaded if loaded is not None else self.tensors()
        vals = {role: float_values(src) for role, src in srcs.items()}
        b, a = vals["lora_B"], vals["lora_A"]
        # explicit trailing sizes: a zero-size factor (rows 0) cannot infer a -1
        b2 = b.reshape(b.shape[0], int(np.prod(b.shape[1:], dtype=np.int64)))
        a2 = a.reshape(a.shape[0], int(np.prod(a.shape[1:], dtype=np.int64)))
        col_b, row_a = _abs_max(b2, axis=0), _abs_max(a2, axis=1)
        with np.errstate(over="ignore"):  # inf is the answer then
            products = float(np.dot(col_b, row_a))
        largest = {"lora_B": float(_abs_max(col_b)), "lora_A": float(_abs_max(row_a))}
        largest.update({role: float(_abs_max(v)) for role, v in vals.items() if role not in largest})
        role = max(largest, key=largest.__getitem__)
        return Magnitudes(products, largest[role], role, largest.get("magnitude", 0.0),
                          largest.get("lora_B_bias", 0.0))
