"""The format-neutral adapter model.

An ``Adapter`` maps module names to ``LoraModule``s. Readers in ``loratool.formats`` build it,
writers consume it, and the math (``lowrank``), validation and merge work only on it: no
format-specific branches outside ``formats/``.

Conventions (PEFT's, so that every format maps onto one layout):

* ``name`` is the module's path in the model that the adapter is applied to, exactly the prefix
  of the base tensor: ``model.layers.0.self_attn.q_proj`` -> base tensor
  ``model.layers.0.self_attn.q_proj.weight``. Multi-component adapters (Stable Diffusion) prefix
  the component: ``unet.down_blocks.0.attentions.0.proj_in``, ``text_encoder.text_model...``.
* Factors are stored as PEFT stores them:
    Linear / Conv1D:  A (r, in_features),  B (out_features, r)
    Conv2d:           A (r, in, kh, kw),   B (out, r, 1, 1)
    Embedding:        A (r, num_embeddings), B (embedding_dim, r)   (PEFT's lora_embedding_A/B)
* ``scale`` is PEFT's: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.
* ``delta()`` returns the scaled update in the base weight's layout, computed the way PEFT's
  ``get_delta_weight`` computes it (Conv1D is transposed: its weight is (in, out); an embedding's
  delta is (num_embeddings, embedding_dim)).

Tensors are ``TensorRef``s (header known, data read on demand) or in-memory torch tensors, so a
large adapter can be inspected without being loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from loratool.safetensors_io import DTYPES, TensorRef, st_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

TensorSource = Union[TensorRef, "torch.Tensor"]

# The largest finite value of each float dtype (safetensors names), and its name in messages.
DTYPE_MAX = {"F64": 1.7976931348623157e308, "F32": 3.4028234663852886e38, "BF16": 3.3895313892515355e38,
             "F16": 65504.0, "F8_E4M3": 448.0, "F8_E5M2": 57344.0}
DTYPE_NAMES = {d: DTYPES[d][1] for d in DTYPE_MAX}
F32_MAX = DTYPE_MAX["F32"]  # PEFT's arithmetic (and the merge's): factors are upcast to float32


class LayerKind(str, Enum):
    LINEAR = "linear"
    CONV1D = "conv1d"  # transformers' Conv1D (GPT-2), PEFT's fan_in_fan_out=True
    CONV2D = "conv2d"
    EMBEDDING = "embedding"


def load_tensor(src: TensorSource) -> "torch.Tensor":
    return src.load() if isinstance(src, TensorRef) else src


def shape_of(src: TensorSource) -> tuple[int, ...]:
    return tuple(src.shape)


def dtype_of(src: TensorSource) -> str:
    """The safetensors dtype string ("BF16", "F32", ...) of a tensor source."""
    return src.dtype if isinstance(src, TensorRef) else st_dtype(src.dtype)


def nbytes_of(src: TensorSource) -> int:
    if isinstance(src, TensorRef):
        return src.nbytes
    return src.numel() * src.element_size()


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


def float_values(src: TensorSource):
    """A float tensor's values as a numpy array, exactly: float64 for F64, float16 for F16,
    float32 otherwise. Tensors in a file are decoded from their raw bytes (no torch import:
    ``merge`` checks factors before it imports torch, if it imports it at all)."""
    import numpy as np

    if isinstance(src, TensorRef) and src.dtype in ("F64", "F32", "F16", "BF16"):
        raw = src.raw()
        if src.dtype == "BF16":  # bfloat16 is the top half of a float32
            bits = np.left_shift(np.frombuffer(raw, "<u2").astype(np.uint32), 16)
            return bits.view(np.float32).reshape(src.shape)
        return np.frombuffer(raw, {"F64": "<f8", "F32": "<f4", "F16": "<f2"}[src.dtype]).reshape(src.shape)
    import torch

    t = load_tensor(src).detach().cpu()
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).numpy()


@dataclass(frozen=True)
class Magnitudes:
    """How large a module's values can make what is computed from them (issue 11), in float64.

    ``products`` = Σ_k max|B[:, k]| · max|A[k, :]| bounds every element of B @ A and every partial
    sum of its FMA chain, so scale · products bounds the delta; it is cheap (one pass over each
    factor) and at most r times the largest element of |B| @ |A|."""

    products: float
    largest: float  # the largest |value| of any of the module's tensors
    largest_role: str  # the tensor that holds it: "lora_A", "lora_B", "magnitude" or "lora_B_bias"
    magnitude: float  # max |m| (DoRA), else 0
    bias: float  # max |lora_B bias|, else 0


def _abs_max(x, axis=None):
    import numpy as np

    return np.abs(x).max(axis=axis, initial=0).astype(np.float64)


def peft_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA (peft/tuners/lora/layer.py)."""
    if rank <= 0:
        return 0.0
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class LoraModule:
    name: str
    kind: LayerKind
    lora_A: TensorSource
    lora_B: TensorSource
    alpha: float
    use_rslora: bool = False
    magnitude: TensorSource | None = None  # DoRA: lora_magnitude_vector, one value per output row
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
    def scale(self) -> float:
        return peft_scale(self.alpha, self.rank, self.use_rslora)

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
        """The shape of the base weight this module's delta is added to."""
        a, b = shape_of(self.lora_A), shape_of(self.lora_B)
        if self.kind is LayerKind.LINEAR:
            return (b[0], a[1])
        if self.kind is LayerKind.CONV1D:
            return (a[1], b[0])
        if self.kind is LayerKind.EMBEDDING:
            return (a[1], b[0])
        return (b[0], a[1], *a[2:])  # conv2d

    @property
    def num_params(self) -> int:
        n = 0
        for t in self.tensors().values():
            k = 1
            for d in shape_of(t):
                k *= d
            n += k
        return n

    @property
    def nbytes(self) -> int:
        return sum(nbytes_of(t) for t in self.tensors().values())

    def tensors(self) -> dict[str, TensorSource]:
        out: dict[str, TensorSource] = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        if self.lora_B_bias is not None:
            out["lora_B_bias"] = self.lora_B_bias
        return out

    def dtypes(self) -> set[str]:
        return {dtype_of(t) for t in self.tensors().values()}

    # -- values -------------------------------------------------------------------------------
    def A(self) -> "torch.Tensor":
        return load_tensor(self.lora_A)

    def B(self) -> "torch.Tensor":
        return load_tensor(self.lora_B)

    def factors_2d(self, dtype=None, loaded: "dict[str, torch.Tensor] | None" = None
                   ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(B2, A2) with B2 (out, r), A2 (r, in·kh·kw): delta_2d = scale · B2 @ A2 (before any
        transpose/reshape into the base layout). ``loaded``: this module's tensors as ``load()``
        returned them, so that they are not read again."""
        a, b = (loaded["lora_A"], loaded["lora_B"]) if loaded is not None else (self.A(), self.B())
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return b.reshape(b.shape[0], b.shape[1]), a.reshape(a.shape[0], -1)

    def load(self) -> "dict[str, torch.Tensor]":
        """Every tensor of the module (factors, DoRA magnitude, bias), read once."""
        return {role: load_tensor(src) for role, src in self.tensors().items()}

    def magnitudes(self, loaded: "dict[str, torch.Tensor] | None" = None) -> Magnitudes:
        """Bounds on what this module's values can grow to (``Magnitudes``); its tensors must be
        finite. ``loaded``: as ``factors_2d``."""
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

    def overflow(self, limit: float, dtype: str, scale: float | None = None, mags: Magnitudes | None = None,
                 effect: str = "applying it gives Inf") -> str | None:
        """Why applying this module (``scale`` · B @ A in float32, PEFT's arithmetic) overflows
        ``dtype`` (a safetensors dtype whose largest value is ``limit``), or None: a scale past the
        limit by itself, a value past float32's range, or the scale times the factors' bound
        (``Magnitudes.products``) past the limit. One clause: found vs. expected, ``effect``, the
        fix; the caller prefixes the file and module."""
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
        ``limit`` by itself (float32(scale) is Inf, and Inf · 0 = NaN where B @ A is zero)."""
        scale = abs(self.scale if scale is None else scale)
        if math.isfinite(scale) and scale <= limit:
            return None
        return (f"scale {scale:.3g} overflows {DTYPE_NAMES.get(dtype, dtype)} (max {limit:.3g}) by itself; "
                f"{effect}; {self._scale_fix()}")

    def _scale_fix(self) -> str:
        return (f"fix lora_alpha / alpha_pattern (alpha {self.alpha:g} at rank {self.rank}"
                f"{', rsLoRA' if self.use_rslora else ''}) or the factors")

    @property
    def scale_is_valid(self) -> bool:
        """alpha and scale are positive finite numbers (else any arithmetic on the module is void)."""
        return math.isfinite(self.alpha) and self.alpha > 0 and math.isfinite(self.scale)

    def delta(self, dtype=None) -> "torch.Tensor":
        """The scaled update ``scale · B @ A`` in the base weight's layout.

        ``dtype`` defaults to float32 (PEFT merges in the factors' dtype upcast to float32 on the
        CPU when they are half precision).
        """
        import torch

        dtype = dtype or torch.float32
        b2, a2 = self.factors_2d(dtype)
        d = (b2 @ a2) * self.scale
        if self.kind is LayerKind.LINEAR:
            return d
        if self.kind in (LayerKind.CONV1D, LayerKind.EMBEDDING):
            return d.T
        return d.reshape(self.base_weight_shape)


@dataclass
class Adapter:
    """A whole adapter: its modules plus adapter-level facts."""

    format: str  # "peft" | "kohya" | "diffusers"
    modules: dict[str, LoraModule]
    path: Path | None = None
    files: list[Path] = field(default_factory=list)
    base_model: str | None = None
    base_revision: str | None = None
    task_type: str | None = None
    # The raw PEFT adapter_config.json (or the equivalent we build), kept so that writers keep
    # every field they do not change.
    config: dict[str, Any] = field(default_factory=dict)
    # safetensors __metadata__ of the source weights (kohya ss_* keys live here).
    metadata: dict[str, str] = field(default_factory=dict)
    # modules_to_save: full replacement tensors, keyed by the base tensor name ("lm_head.weight").
    modules_to_save: dict[str, TensorSource] = field(default_factory=dict)
    # Other tensors a format carries that are not LoRA factors (e.g. PEFT's saved embedding base
    # layers "model.embed_tokens.base_layer.weight"), keyed by name without the format's prefix.
    extra_tensors: dict[str, TensorSource] = field(default_factory=dict)
    # Structural problems found while reading (a factor missing, an A/B rank mismatch): one line
    # each, naming the file and the module. ``load_adapter`` raises on them unless tolerant.
    problems: list[str] = field(default_factory=list)
    # Multi-component adapters (Stable Diffusion: "unet", "text_encoder", "text_encoder_2",
    # "transformer"): module names then start with "<component>.". Empty for single models (a
    # GPT-2 module may well start with "transformer." without being a component).
    components: tuple[str, ...] = ()

    # -- summaries ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.modules)

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self.modules.values()]

    @property
    def alphas(self) -> list[float]:
        return [m.alpha for m in self.modules.values()]

    @property
    def use_dora(self) -> bool:
        return any(m.use_dora for m in self.modules.values())

    @property
    def use_rslora(self) -> bool:
        return any(m.use_rslora for m in self.modules.values())

    @property
    def lora_bias(self) -> bool:
        return any(m.lora_B_bias is not None for m in self.modules.values())

    @property
    def num_params(self) -> int:
        n = sum(m.num_params for m in self.modules.values())
        for t in list(self.modules_to_save.values()) + list(self.extra_tensors.values()):
            k = 1
            for d in shape_of(t):
                k *= d
            n += k
        return n

    def dtypes(self) -> dict[str, int]:
        """dtype -> number of tensors of that dtype."""
        out: dict[str, int] = {}
        srcs = [t for m in self.modules.values() for t in m.tensors().values()]
        srcs += list(self.modules_to_save.values()) + list(self.extra_tensors.values())
        for t in srcs:
            d = dtype_of(t)
            out[d] = out.get(d, 0) + 1
        return out

    def target_names(self) -> list[str]:
        """Short target names, sorted: q_proj, v_proj, ... (the last path component, or the last
        two when the last is an index, as in to_out.0 or ff.net.2)."""
        out = set()
        for n in self.modules:
            parts = n.split(".")
            out.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
        return sorted(out)

    def file_size(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.exists())


def count_nonfinite(t: "torch.Tensor") -> tuple[int, int]:
    """(NaN count, Inf count) of a tensor; (0, 0) for integer tensors."""
    import torch

    if not t.is_floating_point():
        return 0, 0
    if t.element_size() == 1:  # float8: isnan/isinf are not implemented for it
        t = t.float()
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


# dtype -> (unsigned little-endian view, exponent mask): all exponent bits set is NaN or Inf
_EXPONENT_MASKS = {"F64": ("<u8", 0x7FF0_0000_0000_0000), "F32": ("<u4", 0x7F80_0000),
                   "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def has_nonfinite(src: TensorSource) -> bool:
    """Whether a tensor holds NaN or Inf. Tensors in a file are checked on their raw bytes with
    numpy (no torch import: ``merge`` starts writing while torch is imported, see loratool/merge/executor.py)."""
    if isinstance(src, TensorRef) and src.dtype in _EXPONENT_MASKS:
        import numpy as np

        view, mask = _EXPONENT_MASKS[src.dtype]
        bits = np.frombuffer(src.raw(), dtype=view)
        return bool(np.any(np.bitwise_and(bits, mask) == mask))
    return any(count_nonfinite(load_tensor(src)))


def require_usable(adapter: "Adapter") -> None:
    """Refuse (one line, naming the module) an adapter whose values would make any arithmetic on
    it meaningless: NaN/Inf in a factor, or a scale that is not a positive finite number.
    ``validate`` reports the same as findings; resize, compose and merge call this first."""
    from loratool.errors import FormatError

    where = adapter.path or "adapter"
    for m in adapter.modules.values():
        if not m.scale_is_valid:
            raise FormatError(f"{where}: module {m.name}: alpha {m.alpha!r} gives scale {m.scale!r}; a LoRA "
                              "scale must be a positive finite number")
        for role, t in m.tensors().items():
            if has_nonfinite(t):
                key = m.source_keys.get(role, role)
                raise FormatError(f"{where}: module {m.name}: {key} holds NaN or Inf values; run "
                                  "`loratool validate` for details")
