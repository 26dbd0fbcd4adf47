"""DoRA: a LoRA module plus a magnitude vector m, one value per output feature
(peft/tuners/lora/dora.py, ``lora_magnitude_vector``).

Its merge (peft/tuners/lora/variants.py, ``DoraLinearVariant.merge_unsafe``) rescales each output
feature of V = W + scale · ΔW to the length m: W' = m / ‖V‖ · V, the norm per output feature of
the base layout (``layout.output_norm``), all in float32. So a DoRA module's effect depends on the
base: it cannot be unmerged without it, and a weighted or combined DoRA merge has no single
meaning (``merge_problem``). ``delta()`` is the LoRA part only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from loratool.kinds import layout
from loratool.kinds.base import Problem, TensorSource, register_kind, shape_of
from loratool.kinds.layout import LayerKind
from loratool.kinds.lora import LoraModule

if TYPE_CHECKING:  # pragma: no cover
    import torch


def magnitude_length(shape: tuple[int, ...]) -> int | None:
    """The length of a DoRA magnitude, one value per output feature: (out,) for Linear, (1, out,
    1, 1) for Conv2d; None when it has more than one non-unit dimension."""
    big = [d for d in shape if d != 1]
    return None if len(big) > 1 else (big[0] if big else 1)


@register_kind
@dataclass
class DoraModule(LoraModule):
    module_kind: ClassVar[str] = "dora"
    algorithm: ClassVar[str] = "DoRA"
    required: ClassVar[frozenset[str]] = frozenset({"lora_A", "lora_B", "magnitude"})

    magnitude: TensorSource | None = None  # lora_magnitude_vector, one value per output feature

    def __post_init__(self) -> None:
        if self.magnitude is None:
            raise ValueError(f"DoRA module {self.name}: no magnitude vector")

    def tensors(self) -> dict[str, TensorSource]:
        out = super().tensors()
        return {"lora_A": out.pop("lora_A"), "lora_B": out.pop("lora_B"), "magnitude": self.magnitude, **out}

    def structure_problems(self) -> list[Problem]:
        out = super().structure_problems()
        shape = shape_of(self.magnitude)
        if magnitude_length(shape) != self.out_features:
            out.append(Problem("LT108", f"DoRA magnitude has shape {list(shape)}, expected [{self.out_features}] "
                                        "(one per output row)"))
        return sorted(out, key=lambda p: p.check)

    def merge_problem(self, weight: float, sign: int) -> str | None:
        if sign < 0:
            return ("DoRA: its merge rescales each row by m / ‖W + ΔW‖, which cannot be undone without the "
                    "base; unmerge refuses DoRA adapters")
        if weight != 1.0:
            return (f"DoRA at weight {weight:g}: the magnitude vector rescales whole rows, so a weighted DoRA "
                    "merge has no single meaning; give it weight 1.0")
        return None


def rescale(layer: LayerKind, magnitude: "torch.Tensor", v: "torch.Tensor", i: int, j: int) -> "torch.Tensor":
    """m / ‖V‖ for rows [i, j) of V = W + ΔW (base layout), shaped to broadcast over them:
    DoRA's merge is V · rescale(...). ``magnitude`` is flat (one value per output feature)."""
    norm = layout.output_norm(layer, v)
    return magnitude[layout.output_slice(layer, i, j)].reshape(norm.shape) / norm
