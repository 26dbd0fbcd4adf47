"""The format-neutral adapter model.

An ``Adapter`` maps module names to modules of one kind or another (``loratool.kinds``: LoRA,
DoRA). Readers in ``loratool.formats`` build it, writers consume it, and the math (``lowrank``),
validation and merge work only on it: no format-specific branches outside ``formats/``.

``name`` is the module's path in the model that the adapter is applied to, exactly the prefix of
the base tensor: ``model.layers.0.self_attn.q_proj`` -> base tensor
``model.layers.0.self_attn.q_proj.weight``. Multi-component adapters (Stable Diffusion) prefix the
component: ``unet.down_blocks.0.attentions.0.proj_in``, ``text_encoder.text_model...``. How factors
are stored and what ``delta()`` computes is the kind's (``loratool.kinds.lora``); layer layouts
are ``loratool.kinds.layout``'s.

Tensors are ``TensorRef``s (header known, data read on demand), ``HostTensor``s (in memory as
safetensors bytes: what resize and compose build) or torch tensors, so a large adapter can be
inspected without being loaded, and the LoRA paths of inspect, validate, resize and compose never
import torch (issue 14).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# Module kinds (LoRA, DoRA, …), layer layouts and tensor-source helpers live in loratool.kinds;
# they are re-exported here, where readers, writers and tests have always imported them.
from loratool.kinds import AdapterModule, DoraModule, Fit, LowRank, Problem, module_of  # noqa: F401
from loratool.kinds.base import (  # noqa: F401
    DTYPE_MAX,
    DTYPE_NAMES,
    F32_MAX,
    Magnitudes,
    TensorSource,
    dtype_of,
    float_values,
    load_tensor,
    nbytes_of,
    peft_scale,
    shape_of,
)
from loratool.kinds.layout import LayerKind  # noqa: F401
from loratool.kinds.lora import LoraModule, factor_problem  # noqa: F401
from loratool.safetensors_io import FLOAT_DTYPES, HostTensor, TensorRef

if TYPE_CHECKING:  # pragma: no cover
    import numpy

    from loratool.formats.base import FormatConfig, ReadProblem  # a leaf: no cycle


@dataclass
class Adapter:
    """A whole adapter: its modules plus adapter-level facts."""

    format: str  # "peft" | "kohya" | "diffusers"
    modules: dict[str, AdapterModule]
    path: Path | None = None
    files: list[Path] = field(default_factory=list)
    base_model: str | None = None
    base_revision: str | None = None
    task_type: str | None = None
    # The source's config, typed by its format (loratool.formats: a PEFT LoraConfig, one per
    # component, a kohya layout), kept so that writers keep every field they do not change; None
    # when there is none. Read its typed fields, never raw keys.
    config: FormatConfig | None = None
    # safetensors __metadata__ of the source weights (kohya ss_* keys live here).
    metadata: dict[str, str] = field(default_factory=dict)
    # modules_to_save: full replacement tensors, keyed by the base tensor name ("lm_head.weight").
    modules_to_save: dict[str, TensorSource] = field(default_factory=dict)
    # Other tensors a format carries that are not LoRA factors (e.g. PEFT's saved embedding base
    # layers "model.embed_tokens.base_layer.weight"), keyed by name without the format's prefix.
    extra_tensors: dict[str, TensorSource] = field(default_factory=dict)
    # Structural problems found while reading (a factor missing, an A/B rank mismatch), each with
    # validate's check id and one line naming the file and the module. ``load_adapter`` raises on
    # the first unless tolerant.
    problems: list[ReadProblem] = field(default_factory=list)
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
        return any("lora_B_bias" in m.tensors() for m in self.modules.values())

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


def count_nonfinite(t: "TensorSource | numpy.ndarray") -> tuple[int, int]:
    """(NaN count, Inf count) of a tensor (a source, or values as ``load()`` gives them); (0, 0)
    for integer tensors. numpy, so no torch import unless ``t`` is a torch tensor."""
    import numpy as np

    if hasattr(t, "detach"):  # a torch tensor (torch is loaded)
        if not t.is_floating_point():
            return 0, 0
        t = t.detach().cpu()
        if t.element_size() == 1:  # float8: isnan/isinf are not implemented for it
            t = t.float()
        return int(t.isnan().sum()), int(t.isinf().sum())
    if isinstance(t, (TensorRef, HostTensor)):
        if t.dtype not in FLOAT_DTYPES:
            return 0, 0
        t = float_values(t)
    t = np.asarray(t)
    if t.dtype.kind != "f":
        return 0, 0
    return int(np.isnan(t).sum()), int(np.isinf(t).sum())


# dtype -> (unsigned little-endian view, exponent mask): all exponent bits set is NaN or Inf
_EXPONENT_MASKS = {"F64": ("<u8", 0x7FF0_0000_0000_0000), "F32": ("<u4", 0x7F80_0000),
                   "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def has_nonfinite(src: TensorSource) -> bool:
    """Whether a tensor holds NaN or Inf. Tensors in a file are checked on their raw bytes with
    numpy (no torch import: ``merge`` starts writing while torch is imported, see loratool/merge/executor.py)."""
    if isinstance(src, (TensorRef, HostTensor)) and src.dtype in _EXPONENT_MASKS:
        import numpy as np

        if src.dtype != "BF16":  # numpy's own float type: one pass
            floats = np.frombuffer(src.raw(), dtype={"F64": "<f8", "F32": "<f4", "F16": "<f2"}[src.dtype])
            return not bool(np.isfinite(floats).all())
        view, mask = _EXPONENT_MASKS[src.dtype]
        bits = np.frombuffer(src.raw(), dtype=view)
        return bool(np.any(np.bitwise_and(bits, mask) == mask))
    return any(count_nonfinite(src))


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
