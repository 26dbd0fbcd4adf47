"""What the LyCORIS kinds share (LoCon+Tucker, LoHa, LoKr, full; kinds/loha.py, kinds/lokr.py,
kinds/lycoris_misc.py): the forward-pass scale, the DoRA scale (``dora_scale``), the delta and
its torch/numpy forms, and the Tucker rebuild.

The scale is the one LyCORIS's *forward pass* applies (``get_weight``), once: alpha / dim, with
dim the factors' rank (LoKr: 1 when both Kronecker factors are full matrices). LyCORIS 4.1.3's
``get_diff_weight``/``merge_to`` multiply LoHa and LoKr deltas by the scale a second time; that is
a known difference, and nothing here reproduces it (issue 15).

Every kind computes its unscaled 2-D delta ``(out, in·kh·kw)`` in numpy (``_d2``) and, where it
has one, an exact low-rank form ``(B2, A2)`` with ``B2 @ A2`` that delta (``exact_factors``).
torch is imported only when a torch dtype is asked for (the merge).

The DoRA scale of LyCORIS (``weight_decompose``, DoRA/DoHa/DoKr): W' = m · V / ‖V‖ with
V = W + ΔW and the norm per output row (``wd_on_out=True``, m shaped (out, 1, …)), which is PEFT's
DoRA rescaling (``kinds/dora.py``); a scale on the input axis (``wd_on_out=False``, m shaped
(1, in, …)) the merge refuses with the reason (InvokeAI PR #9517: the two index different axes).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from loratool.kinds import layout
from loratool.kinds.base import AdapterModule, LowRank, Magnitudes, Problem, TensorSource, float_values, shape_of
from loratool.kinds.layout import LayerKind

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import torch


def np_dtype(dtype):
    """The numpy dtype to compute in for a torch ``dtype`` (float64 for float64, else float32)."""
    import numpy as np

    return np.float64 if dtype is not None and str(dtype) == "torch.float64" else np.float32


def abs_max(x) -> float:
    import numpy as np

    return float(np.abs(x).max(initial=0))


def pair_bound(b, a) -> float:
    """Σ_k max|B[:, k]| · max|A[k, :]|: bounds every element (and partial sum) of B @ A."""
    import numpy as np

    b2 = np.abs(b.reshape(b.shape[0], -1)) if b.ndim > 1 else np.abs(b)[:, None]
    a2 = np.abs(a.reshape(a.shape[0], -1))
    with np.errstate(over="ignore"):
        return float(np.dot(b2.max(axis=0, initial=0).astype(np.float64), a2.max(axis=1, initial=0).astype(np.float64)))


def tucker_rebuild(t, wa, wb):
    """LyCORIS's ``rebuild_tucker``: W[p, q, …] = Σ_ij t[i, j, …] · wa[i, p] · wb[j, q], with the core
    t (r1, r2, kh, kw), wa (r1, out), wb (r2, in): (out, in, kh, kw)."""
    import numpy as np

    return np.einsum("ij...,ip,jq->pq...", t, wa, wb)


def tucker_factors(t, wa, wb):
    """The Tucker form as exact 2-D factors: B2 = waᵀ (out, r1), A2[i, (q, k)] = Σ_j t[i, j, k]·wb[j, q]
    (r1, in·kh·kw), so B2 @ A2 is ``tucker_rebuild`` flattened."""
    import numpy as np

    a2 = np.einsum("ij...,jq->iq...", t, wb)
    return np.ascontiguousarray(wa.T), a2.reshape(a2.shape[0], -1)


def tucker_problem(name: str, t: tuple[int, ...], wa: tuple[int, ...], wb: tuple[int, ...],
                   names: tuple[str, str, str]) -> str | None:
    """Why a Tucker core ``t`` with its mode factors wa (r1, out), wb (r2, in) cannot be rebuilt."""
    nt, na, nb = names
    if len(t) != 4 or len(wa) != 2 or len(wb) != 2:
        return (f"{name}: Tucker core {nt} {list(t)} with {na} {list(wa)} and {nb} {list(wb)}: expected a 4-D "
                "core (r, r, kh, kw) and 2-D mode factors (r, out), (r, in)")
    if t[0] != wa[0] or t[1] != wb[0]:
        return (f"{name}: Tucker core {nt} has shape {list(t)}, expected [{wa[0]}, {wb[0]}, kh, kw] (the ranks "
                f"of {na} {list(wa)} and {nb} {list(wb)})")
    return None


class LycorisModule(AdapterModule):
    """The shared part of the LyCORIS kinds. Subclasses are dataclasses with the fields ``name``,
    ``kind``, ``alpha``, ``use_rslora``, ``config_rank``, ``config_alpha``, ``source_keys`` and
    ``dora_scale`` (optional), and implement ``dim``, ``out_in``, ``_d2`` and the rest of
    ``AdapterModule``."""

    algorithm: ClassVar[str] = ""  # the name in reports: "LoHa", "LoKr", …
    lora_B_bias = None  # the full kind's bias delta (diff_b); not a field of the others
    # Why the layer was read as it was, where the file does not say it (flattened LoHa/LoKr factors
    # of SD's proj_in with no SD family in the file: 1×1 Conv2d or Linear); a field of LoHa and LoKr,
    # None once a base has said it (``kernel_fit``).
    layer_note: str | None = None

    # -- the scale ----------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        """The rank the scale divides alpha by (None: the scale is 1)."""
        return self.rank

    @property
    def scale(self) -> float:
        d = self.dim
        if d is None or d <= 0:
            return 1.0
        return self.alpha / math.sqrt(d) if self.use_rslora else self.alpha / d

    @property
    def scale_rule(self) -> str:
        d = self.dim
        if d is None:
            return "1"
        return f"alpha/sqrt({d})" if self.use_rslora else f"alpha/{d}"

    # -- shapes -------------------------------------------------------------------------------
    def out_in(self) -> tuple[int, int, tuple[int, ...]]:
        """(out, in, kernel) of the base weight (kernel () for Linear)."""
        raise NotImplementedError

    @property
    def base_weight_shape(self) -> tuple[int, ...]:
        out, in_, k = self.out_in()
        return layout.base_shape(self.kind, out, in_, k)

    @property
    def equivalent_lora_params(self) -> int:
        """The parameter count of a plain LoRA that holds this delta exactly (rank ``exact_rank``)."""
        out, in_, k = self.out_in()
        return self.exact_rank * (out + in_ * math.prod(k))

    @property
    def exact_rank(self) -> int:
        """The rank of the exact low-rank form (``exact_factors``), or min(out, in·kh·kw)."""
        out, in_, k = self.out_in()
        return min(out, in_ * math.prod(k))

    def fit(self, found, target=None):
        return kernel_fit(self, found, target, super().fit(found, target))

    def with_factors(self, B2, A2):
        """A plain LoRA (or DoRA, with this module's DoRA scale) module with the low-rank form
        B2 (out, k) @ A2 (k, in·kh·kw) at this module's scale (alpha = scale · k)."""
        from loratool.kinds.base import dtype_of, module_of

        import numpy as np

        k = A2.shape[0]
        dtype = dtype_of(next(iter(self.tensors().values())))
        if hasattr(A2, "detach"):
            B2, A2 = B2.detach().cpu().double().numpy(), A2.detach().cpu().double().numpy()
        b, a = to_lora_factors(self, np.asarray(B2), np.asarray(A2), dtype)
        mag = None
        if self.use_dora:
            from loratool.safetensors_io import host_tensor

            ds = getattr(self, "dora_scale")
            mag = host_tensor(float_values(ds).reshape(-1), "F32")
        bias = self.lora_B_bias
        alpha = self.scale * k if not self.use_rslora else self.scale * math.sqrt(k)
        return module_of(name=self.name, kind=self.kind, lora_A=a, lora_B=b, alpha=alpha,
                         use_rslora=self.use_rslora, magnitude=mag, lora_B_bias=bias,
                         config_rank=k, config_alpha=alpha)

    # -- DoRA scale ---------------------------------------------------------------------------
    @property
    def use_dora(self) -> bool:
        return getattr(self, "dora_scale", None) is not None and self.dora_axis() == "out"

    @property
    def magnitude(self) -> TensorSource | None:
        """The DoRA magnitude the merge engine rescales output rows with (``kinds/dora.py``)."""
        return self.dora_scale if self.use_dora else None

    def dora_axis(self) -> str | None:
        """"out" (m per output row, LyCORIS wd_on_out=True, PEFT's axis), "in" (per input column)
        or None (neither fits)."""
        ds = getattr(self, "dora_scale", None)
        if ds is None:
            return None
        out, in_, _ = self.out_in()
        shape = tuple(shape_of(ds))
        if shape and shape[0] == out and all(d == 1 for d in shape[1:]):
            return "out"
        if len(shape) >= 2 and shape[0] == 1 and shape[1] == in_ and all(d == 1 for d in shape[2:]):
            return "in"
        return None

    def dora_problems(self) -> list[Problem]:
        ds = getattr(self, "dora_scale", None)
        if ds is None or self.dora_axis() is not None:
            return []
        out, in_, k = self.out_in()
        return [Problem("LT108", f"DoRA scale (dora_scale) has shape {list(shape_of(ds))}, expected "
                                 f"[{out}, {', '.join(['1'] * (1 + len(k)))}] (one per output row) or "
                                 f"[1, {in_}{', 1' * len(k)}] (one per input column, wd_on_out=False)")]

    def merge_problem(self, weight: float, sign: int) -> str | None:
        if getattr(self, "dora_scale", None) is None:
            return None
        if self.dora_axis() == "in":
            return ("its DoRA scale is per input column (LyCORIS wd_on_out=False), which the merge does not apply "
                    "(it rescales output rows, as PEFT's DoRA does)")
        if sign < 0:
            return ("DoRA scale: its merge rescales each row by m / ‖W + ΔW‖, which cannot be undone without the "
                    "base; unmerge refuses DoRA adapters")
        if weight != 1.0:
            return f"DoRA scale at weight {weight:g}: give it weight 1.0"
        return None

    # -- values -------------------------------------------------------------------------------
    def _d2(self, dt, loaded: "dict[str, numpy.ndarray] | None" = None) -> "numpy.ndarray":
        """The unscaled 2-D delta (out, in·kh·kw) in numpy dtype ``dt``."""
        raise NotImplementedError

    def exact_factors(self, loaded: "dict[str, numpy.ndarray] | None" = None):
        """(B2, A2), float64 numpy, with B2 @ A2 the unscaled 2-D delta exactly (in exact arithmetic),
        or None for a kind with no low-rank form."""
        return None

    def vals(self, loaded: "dict[str, numpy.ndarray] | None", dt=None) -> "dict[str, numpy.ndarray]":
        """The module's tensors as numpy arrays (``dt``: converted to it)."""
        import numpy as np

        srcs = loaded if loaded is not None else self.tensors()
        out = {role: float_values(src) for role, src in srcs.items()}
        if dt is not None:
            out = {role: np.asarray(v, dtype=dt) for role, v in out.items()}
        return out

    def delta(self, dtype=None) -> "torch.Tensor":
        """The scaled update in the base layout (float32 unless ``dtype``), computed in numpy."""
        import torch

        dtype = dtype or torch.float32
        d2 = self._d2(np_dtype(dtype))
        d2 = d2 * d2.dtype.type(self.scale)
        return layout.to_base(self.kind, torch.from_numpy(d2).to(dtype), self.base_weight_shape)

    def low_rank(self, dtype=None, loaded: "dict[str, numpy.ndarray] | None" = None) -> LowRank | None:
        """The exact low-rank form when it is low (k·(out + in) < out·in): numpy without ``dtype``,
        torch tensors of a torch ``dtype``; None otherwise (the merge then takes ``delta_rows``)."""
        out, in_, k = self.out_in()
        cols = in_ * math.prod(k)
        if self.exact_rank * (out + cols) >= out * cols:
            return None
        f = self.exact_factors(loaded)
        if f is None:
            return None
        b2, a2 = f
        if dtype is None:
            return LowRank(b2, a2, self.scale)
        import torch

        return LowRank(torch.from_numpy(b2).to(dtype), torch.from_numpy(a2).to(dtype), self.scale)

    # the merge engine's Conv2d path (a kind with a low-rank form): A (k, in, kh, kw), B (out, k, 1, 1)
    def A(self) -> "torch.Tensor":
        import torch

        out, in_, k = self.out_in()
        a2 = self.exact_factors()[1]
        return torch.from_numpy(a2.reshape(a2.shape[0], in_, *k))

    def B(self) -> "torch.Tensor":
        import torch

        b2 = self.exact_factors()[0]
        return torch.from_numpy(b2.reshape(*b2.shape, *([1, 1] if self.kind is LayerKind.CONV2D else [])))

    def singular_values(self, low_rank: LowRank | None = None) -> "numpy.ndarray":
        import numpy as np

        from loratool.lowrank import singular_values

        f = self.exact_factors()
        if f is not None:
            return singular_values(f[0], f[1], abs(self.scale))
        d = self._d2(np.float64) * abs(self.scale)
        return np.linalg.svd(d, compute_uv=False)

    def magnitudes(self, loaded: "dict[str, numpy.ndarray] | None" = None) -> Magnitudes:
        vals = self.vals(loaded)
        largest = {role: abs_max(v) for role, v in vals.items()}
        role = max(largest, key=largest.__getitem__)
        ds = largest.get("dora_scale", 0.0)
        return Magnitudes(self.bound(vals), largest[role], role, ds, largest.get("lora_B_bias", 0.0))

    def bound(self, vals: "dict[str, numpy.ndarray]") -> float:
        """A bound on every element of the unscaled delta (and the partial sums computing it)."""
        import numpy as np

        return abs_max(self._d2(np.float64, vals)) * 1.0000001

    def shapes_text(self) -> str:
        return ", ".join(f"{role} {list(shape_of(t))}" for role, t in self.tensors().items())

    def delta_dtypes(self) -> list[str]:
        from loratool.kinds.base import dtype_of

        return [dtype_of(t) for role, t in self.tensors().items() if role not in ("dora_scale", "lora_B_bias")]


def kernel_fit(module: "LycorisModule", found, target, fit):
    """A 2-D delta of a module whose factors do not say the kernel (LoHa/LoKr with flattened conv
    factors: (r, in·kh·kw)) fits a 4-D base (out, in, kh, kw) with in·kh·kw columns: the base says
    the kernel, as LyCORIS's loader takes it from the model's layer. The module is made Conv2d with
    that kernel (it is the one module of that name), and the fit is returned."""
    from loratool.kinds.base import Fit

    if fit.check is None and module.layer_note:
        module.layer_note = None  # the base says the layer is what the module was read as
    if fit.check != "LT302" or found is None or len(found) != 4 or module.kind is LayerKind.CONV2D:
        return fit
    out, in_, k = module.out_in()
    if found[0] == out and math.prod(found[1:]) == in_ * math.prod(k):
        module.kernel = tuple(found[2:])
        module.kind = LayerKind.CONV2D
        module.layer_note = None
        return Fit(module.name, None, target, tuple(found), tuple(found), LayerKind.CONV2D)
    return fit


def to_lora_factors(module: "LycorisModule", b2, a2, dtype: str):
    """2-D factors B2 (out, k), A2 (k, in·kh·kw) as a LoRA's lora_B, lora_A in the module's layer
    layout (Conv2d: A (k, in, kh, kw), B (out, k, 1, 1)), as ``HostTensor``s of ``dtype``."""
    from loratool.safetensors_io import host_tensor

    out, in_, k = module.out_in()
    if module.kind is LayerKind.CONV2D:
        return host_tensor(b2.reshape(out, b2.shape[1], 1, 1), dtype), host_tensor(a2.reshape(a2.shape[0], in_, *k), dtype)
    return host_tensor(b2, dtype), host_tensor(a2, dtype)
