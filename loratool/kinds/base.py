"""What every module kind provides (``AdapterModule``), the one fit check against a base weight
(``Fit``), the registry of kinds, and the tensor-source helpers they share.

The idea is PEFT's LyCORIS layer (peft/tuners/lycoris_utils.py): each kind owns its tensors and
its delta; everything else (merge, parity, validation, inspection, resize, compose) is written once
on top of ``AdapterModule``. A kind is a dataclass that subclasses ``AdapterModule``, implements
its abstract members and registers itself with ``register_kind``; only it and the format readers
that build it know its tensors.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Union

from loratool.kinds.layout import LayerKind, transposed, transposed_hint
from loratool.safetensors_io import DTYPES, HostTensor, TensorRef, st_dtype

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import torch

# A tensor in a file (read on demand), in memory as safetensors bytes (what resize and compose
# build, without torch), or a torch tensor (numpy arrays are accepted too).
TensorSource = Union[TensorRef, HostTensor, "torch.Tensor"]
_RAW = (TensorRef, HostTensor)  # sources with a safetensors dtype string and raw bytes

# The largest finite value of each float dtype (safetensors names), and its name in messages.
DTYPE_MAX = {"F64": 1.7976931348623157e308, "F32": 3.4028234663852886e38, "BF16": 3.3895313892515355e38,
             "F16": 65504.0, "F8_E4M3": 448.0, "F8_E5M2": 57344.0}
DTYPE_NAMES = {d: DTYPES[d][1] for d in DTYPE_MAX}
F32_MAX = DTYPE_MAX["F32"]  # PEFT's arithmetic (and the merge's): factors are upcast to float32


# -- tensor sources -----------------------------------------------------------------------------

def load_tensor(src: TensorSource) -> "torch.Tensor":
    """A source as a torch tensor (imports torch; the numpy paths use ``float_values``)."""
    if isinstance(src, _RAW):
        return src.load()
    if not hasattr(src, "detach"):  # numpy
        import torch

        return torch.from_numpy(src)
    return src


def shape_of(src: TensorSource) -> tuple[int, ...]:
    return tuple(src.shape)


def dtype_of(src: TensorSource) -> str:
    """The safetensors dtype string ("BF16", "F32", ...) of a tensor source."""
    return src.dtype if isinstance(src, _RAW) else st_dtype(src.dtype)


def nbytes_of(src: TensorSource) -> int:
    if isinstance(src, _RAW) or not hasattr(src, "detach"):
        return int(src.nbytes)
    return src.numel() * src.element_size()


def float_values(src: TensorSource) -> "numpy.ndarray":
    """A tensor's values as a numpy array, exactly: float64 for F64, float16 for F16, float32
    otherwise (integers converted). Tensors in a file or in memory are decoded from their raw
    bytes and numpy arrays kept (no torch import: ``merge`` checks factors before it imports
    torch, if it imports it at all; inspect, validate, resize and compose never do for LoRA)."""
    import numpy as np

    if isinstance(src, _RAW) and src.dtype in ("F64", "F32", "F16", "BF16"):
        raw = src.array if isinstance(src, HostTensor) else np.frombuffer(src.raw(), "u1")
        if src.dtype == "BF16":  # bfloat16 is the top half of a float32
            bits = np.left_shift(raw.reshape(-1).view("<u2").astype(np.uint32), 16)
            return bits.view(np.float32).reshape(src.shape)
        return raw.reshape(-1).view({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[src.dtype]).reshape(src.shape)
    if not isinstance(src, _RAW) and not hasattr(src, "detach"):  # numpy
        a = np.asarray(src)
        return a if a.dtype in (np.float64, np.float32, np.float16) else a.astype(np.float32)
    import torch

    t = load_tensor(src).detach().cpu()
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).numpy()


def peft_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA (peft/tuners/lora/layer.py)."""
    if rank <= 0:
        return 0.0
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class Magnitudes:
    """How large a module's values can make what is computed from them (issue 11), in float64.

    ``products`` bounds every element of the unscaled delta and every partial sum computing it
    (LoRA: Σ_k max|B[:, k]| · max|A[k, :]|, which bounds B @ A and its FMA chain), so
    scale · products bounds the delta."""

    products: float
    largest: float  # the largest |value| of any of the module's tensors
    largest_role: str  # the tensor that holds it: "lora_A", "lora_B", "magnitude", "lora_B_bias", …
    magnitude: float  # max |m| (DoRA), else 0
    bias: float  # max |lora_B bias|, else 0


class LowRank(NamedTuple):
    """A delta as a product: delta_2d = scale · B2 @ A2, B2 (out, r), A2 (r, in·kh·kw), before it
    is put into the base layout (``layout.to_base``): numpy arrays or torch tensors."""

    B2: "numpy.ndarray | torch.Tensor"
    A2: "numpy.ndarray | torch.Tensor"
    scale: float


class Problem(NamedTuple):
    """A structural problem of a module: the ``validate`` check id and one clause."""

    check: str
    message: str


# -- the fit check ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fit:
    """How a module fits the base: ``check`` None (it fits), LT301 (no base tensor), LT302 (the
    shapes differ) or LT303 (it fits transposed: Linear <-> Conv1D, which PEFT merges as the other
    layer type, ``layer``). ``message`` is one clause (found vs expected, and a hint) that callers
    prefix with the file and module."""

    module: str
    check: str | None
    target: str | None  # the base tensor's name
    found: tuple[int, ...] | None
    expected: tuple[int, ...] | None
    layer: LayerKind  # the layer type to merge with
    message: str = ""
    # rows [lo, hi) of ``target`` that the module's delta is added to (``checkpoint.Target``: q, k or
    # v fused by rows into one base tensor); None: the whole tensor. ``found`` is then those rows' shape.
    rows: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.check is None

    @property
    def mergeable(self) -> bool:
        """A merge can apply the delta: it fits, or fits transposed (merged as ``layer``)."""
        return self.check in (None, "LT303")


# -- the kinds ----------------------------------------------------------------------------------

class AdapterModule(ABC):
    """One module of an adapter, of one kind. Concrete kinds are dataclasses with at least these
    attributes, and implement the abstract members below."""

    module_kind: ClassVar[str]  # the registry's key: "lora", "dora", …
    # The tensor roles (dataclass fields) a module of this kind must have: ``module_of`` picks
    # the kind from the tensors a reader found.
    required: ClassVar[frozenset[str]]
    use_dora: ClassVar[bool] = False  # DoRA's per-row rescaling applies (see kinds/dora.py)
    algorithm: ClassVar[str] = "LoRA"  # the name reports show: "LoRA", "DoRA", "LoHa", "LoKr", …
    # The delta depends on the base weight W (LyCORIS OFT, IA3, GLoRA): ``delta()`` refuses, and the
    # merge engines call ``delta_from_base`` with the base rows of each block.
    needs_base: ClassVar[bool] = False

    name: str
    kind: LayerKind
    alpha: float
    use_rslora: bool
    # The rank and alpha the source's config asks for, when it has one; validate compares them.
    config_rank: int | None
    config_alpha: float | None
    source_keys: dict[str, str]  # role -> key of the source file, for messages

    # -- what a kind must say -----------------------------------------------------------------
    @abstractmethod
    def tensors(self) -> dict[str, TensorSource]:
        """Every tensor of the module by role ("lora_A", "magnitude", …), in a stable order."""

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def base_weight_shape(self) -> tuple[int, ...]:
        """The shape of the base weight this module's delta is added to."""

    @abstractmethod
    def structure_problems(self) -> list[Problem]:
        """What makes the module's tensors unusable for its layer type, ordered by check id."""

    @abstractmethod
    def delta(self, dtype=None) -> "torch.Tensor":
        """The scaled update in the base weight's layout (float32 unless ``dtype``)."""

    @abstractmethod
    def magnitudes(self, loaded: "dict[str, numpy.ndarray] | None" = None) -> Magnitudes:
        """Bounds on what the module's values can grow to; ``loaded``: its tensors, as ``load()``
        returned them."""

    # -- what every kind gets -----------------------------------------------------------------
    @property
    def scale(self) -> float:
        return peft_scale(self.alpha, self.rank, self.use_rslora)

    @property
    def scale_is_valid(self) -> bool:
        """alpha and scale are positive finite numbers (else any arithmetic on the module is void)."""
        return math.isfinite(self.alpha) and self.alpha > 0 and math.isfinite(self.scale)

    def low_rank(self, dtype=None, loaded: "dict[str, numpy.ndarray] | None" = None) -> LowRank | None:
        """The delta as scale · B2 @ A2, or None for a kind that has no such form: numpy values
        without ``dtype``, torch tensors of a torch ``dtype``."""
        return None

    def with_factors(self, B2: "numpy.ndarray | torch.Tensor", A2: "numpy.ndarray | torch.Tensor") -> "AdapterModule":
        """This module with the low-rank form B2 (out, k) @ A2 (k, in·kh·kw) at the scale its alpha
        gives rank k (resize and compose build modules this way); for kinds with a low-rank form."""
        raise NotImplementedError(f"a {self.module_kind} module has no low-rank form")

    def singular_values(self, low_rank: LowRank | None = None) -> "numpy.ndarray":
        """The singular values of the scaled delta, descending, float64 numpy: from the r×r core
        of the low-rank form where there is one (``low_rank``, if the caller has it already; no
        torch), else from the dense delta (torch)."""
        from loratool.lowrank import singular_values

        lr = low_rank if low_rank is not None else self.low_rank()
        if lr is not None:
            return singular_values(lr.B2, lr.A2, lr.scale)
        import torch

        d = self.delta(torch.float64)
        return torch.linalg.svdvals(d.reshape(d.shape[0], -1)).numpy()

    def delta_rows(self, i: int, j: int, dtype=None) -> "torch.Tensor":
        """Rows [i, j) of ``delta`` (a kind with a cheaper blockwise form overrides this)."""
        return self.delta(dtype)[i:j]

    def delta_from_base(self, W_rows: "numpy.ndarray", i: int, j: int) -> "numpy.ndarray":
        """For a kind that ``needs_base``: rows [i, j) of the scaled delta, in the base layout and in
        W_rows' dtype (float32 or float64 numpy), given those rows of the base weight, W_rows. A kind
        whose rows mix (OFT) says which row blocks it takes (``row_quantum``)."""
        raise NotImplementedError(f"a {self.module_kind} module's delta does not depend on the base")

    def merge_problem(self, weight: float, sign: int) -> str | None:
        """Why this module cannot be merged at ``weight`` (``sign`` -1: unmerged), or None."""
        return None

    def shapes_text(self) -> str:
        """The module's tensor shapes, for messages: "lora_A [8, 64], lora_B [96, 8]"."""
        return ", ".join(f"{role} {list(shape_of(t))}" for role, t in self.tensors().items())

    def fit(self, found: tuple[int, ...] | None, target: str | None = None) -> Fit:
        """How the module fits a base weight of shape ``found`` (None: the base has no tensor
        ``target``). The one fit check: validate, the manifest's base check and the merge plan
        all call it (through ``fit_in``, which says where the target is rows of a tensor)."""
        layer = self.kind
        if found is None:
            return Fit(self.name, "LT301", None, None, None, layer, f"the base has no tensor {self.name}.weight")
        found, expected = tuple(found), tuple(self.base_weight_shape)
        if found == expected:
            return Fit(self.name, None, target, found, expected, layer)
        where = f"base tensor {target or self.name + '.weight'} has shape {list(found)}, the adapter's " \
                f"{layer.value} delta has {list(expected)}"
        other = transposed(layer)
        if other is not None and len(found) == 2 and found == expected[::-1]:
            # PEFT decides Linear vs Conv1D per layer from the base module's type and flips
            # fan_in_fan_out itself (peft/tuners/lora/layer.py, dispatch_default)
            return Fit(self.name, "LT303", target, found, expected, other, f"{where}: {transposed_hint(layer)}")
        hint = ""
        if self.name.rsplit(".", 1)[-1] in ("k_proj", "v_proj") and len(found) == 2 and len(expected) == 2 \
                and found[1] == expected[1]:
            hint = " (k/v projections: do the base's num_key_value_heads match the adapter's?)"
        return Fit(self.name, "LT302", target, found, expected, layer, f"{where} ({self.shapes_text()}){hint}")

    def fit_in(self, base: Any) -> Fit:
        """``fit`` against a base checkpoint (``loratool.checkpoint.BaseCheckpoint``: headers only):
        against the tensor, or the rows of one, that the one name rule finds
        (``BaseCheckpoint.target``)."""
        find = getattr(base, "weight_target", None)
        if find is not None:
            t = find(self.name)
            target, rows = (t.tensor, t.rows) if t is not None else (None, None)
            found = base.target_shape(t) if t is not None else None
        else:  # a base that knows whole tensors only
            target, rows = base.weight_name(self.name), None
            found = None if target is None else tuple(base.shape(target))
        fit = self.fit(found, target)
        if rows is not None:  # the module's delta goes into rows [lo, hi) of ``target``; ``found`` is theirs
            head, msg = f"base tensor {target} has shape", fit.message
            if msg.startswith(head):
                msg = f"rows [{rows[0]}, {rows[1]}) of base tensor {target} have shape{msg[len(head):]}"
            fit = dataclasses.replace(fit, rows=rows, message=msg)
        if target is None and hasattr(base, "missing"):  # why: e.g. an ambiguous or unmappable name
            fit = dataclasses.replace(fit, message=base.missing(f"{self.name}.weight"))
        return fit

    # -- sizes --------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return sum(math.prod(shape_of(t)) for t in self.tensors().values())

    @property
    def nbytes(self) -> int:
        return sum(nbytes_of(t) for t in self.tensors().values())

    def dtypes(self) -> set[str]:
        return {dtype_of(t) for t in self.tensors().values()}

    def delta_dtypes(self) -> list[str]:
        """The dtypes of the tensors the delta is computed from, in role order (LoRA: A and B, not
        a bias or a magnitude)."""
        return [dtype_of(t) for t in self.tensors().values()]

    def load(self) -> "dict[str, numpy.ndarray]":
        """Every tensor of the module, read once, as numpy values (``float_values``: exact, no
        torch for float16, bfloat16, float32 and float64)."""
        return {role: float_values(src) for role, src in self.tensors().items()}

    # -- overflow (issue 11) ------------------------------------------------------------------
    def overflow(self, limit: float, dtype: str, scale: float | None = None, mags: Magnitudes | None = None,
                 effect: str = "applying it gives Inf") -> str | None:
        """Why applying this module (``scale`` · its unscaled delta in float32, PEFT's arithmetic)
        overflows ``dtype`` (a safetensors dtype whose largest value is ``limit``), or None: a
        scale past the limit by itself, a value past float32's range, or the scale times the
        delta's bound (``Magnitudes.products``) past the limit. One clause: found vs. expected,
        ``effect``, the fix; the caller prefixes the file and module."""
        scale = abs(self.scale if scale is None else scale)
        why = self.scale_overflow(limit, dtype, scale, effect)
        if why:
            return why
        mags = mags or self.magnitudes()
        if mags.largest > F32_MAX:
            key = self.source_keys.get(mags.largest_role, mags.largest_role)
            return (f"{key} holds {mags.largest:.3g}, past float32's largest value {F32_MAX:.3g} (PEFT computes "
                    f"in float32, where it is Inf); {effect}; re-save the adapter with values in float32's range")
        if mags.products > F32_MAX:
            return (f"lora_B @ lora_A reaches {mags.products:.3g} (Σ_k max|B[:,k]|·max|A[k,:]|), past float32's "
                    f"largest value {F32_MAX:.3g}; {effect}; the factors are broken (retrain or re-export them)")
        if scale * mags.products > limit:
            return (f"scale {scale:.3g} × factors overflows {DTYPE_NAMES.get(dtype, dtype)} (max {limit:.3g}): "
                    f"|B|·|A| reaches {mags.products:.3g}, {scale * mags.products:.3g} once scaled; {effect}; "
                    f"{self._scale_fix()}")
        return None

    def scale_overflow(self, limit: float, dtype: str, scale: float | None = None,
                       effect: str = "applying it gives Inf") -> str | None:
        """The part of ``overflow`` that needs no values: a scale that is not finite or is past
        ``limit`` by itself (float32(scale) is Inf, and Inf · 0 = NaN where the delta is zero)."""
        scale = abs(self.scale if scale is None else scale)
        if math.isfinite(scale) and scale <= limit:
            return None
        return (f"scale {scale:.3g} overflows {DTYPE_NAMES.get(dtype, dtype)} (max {limit:.3g}) by itself; "
                f"{effect}; {self._scale_fix()}")

    def _scale_fix(self) -> str:
        return (f"fix lora_alpha / alpha_pattern (alpha {self.alpha:g} at rank {self.rank}"
                f"{', rsLoRA' if self.use_rslora else ''}) or the factors")


# -- the registry -------------------------------------------------------------------------------

KINDS: dict[str, type[AdapterModule]] = {}


def register_kind(cls: type[AdapterModule]) -> type[AdapterModule]:
    """Class decorator: make ``cls`` known by its ``module_kind``."""
    if KINDS.get(cls.module_kind, cls) is not cls:
        raise ValueError(f"module kind {cls.module_kind!r} is already registered by {KINDS[cls.module_kind].__name__}")
    KINDS[cls.module_kind] = cls
    return cls


def module_of(**fields: Any) -> AdapterModule:
    """A module of the registered kind that the given tensors make: the kind whose ``required``
    roles are all given (not None), the most specific if several are (a magnitude vector makes a
    LoRA module DoRA). Fields given as None that the kind does not have are dropped."""
    given = {k for k, v in fields.items() if v is not None}
    kinds = [c for c in KINDS.values() if c.required <= given]
    if not kinds:
        raise ValueError(f"no module kind is made of {sorted(given)}")
    cls = max(kinds, key=lambda c: len(c.required))
    names = {f.name for f in dataclasses.fields(cls)}
    if given - names:
        raise ValueError(f"a {cls.module_kind} module has no {', '.join(sorted(given - names))}")
    return cls(**{k: v for k, v in fields.items() if k in names})
