"""Layer types and every rule about their layouts, in one place.

An adapter's delta is computed as a 2-D matrix ``(out, in·kh·kw)`` (PEFT's ``B @ A``) and then
put into the base weight's layout, which depends on the layer type (peft/tuners/lora/layer.py):

    Linear     W (out, in)           delta = d2
    Conv1D     W (in, out)           delta = d2.T       transformers' Conv1D (GPT-2), fan_in_fan_out
    Embedding  W (num, dim)          delta = d2.T       PEFT's lora_embedding_A (r, num), _B (dim, r)
    Conv2d     W (out, in, kh, kw)   delta = d2.reshape(W.shape)

PEFT decides Linear vs Conv1D per layer from the base module's type and flips ``fan_in_fan_out``
itself, with a warning (``dispatch_default``), so a delta that fits the transposed base is a delta
of the other of the two (``transposed``).

Row blocks (the merge computes a base tensor a block of rows at a time): rows [i, j) of the base
layout's delta are ``left @ right`` of ``block_factors``; Conv2d, and DoRA on anything but Linear,
are computed whole (``row_blocked``). DoRA's norm runs per output feature: per row of W for Linear
and Conv2d, per column for Conv1D and Embedding (``output_norm``).
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


class LayerKind(str, Enum):
    LINEAR = "linear"
    CONV1D = "conv1d"  # transformers' Conv1D (GPT-2), PEFT's fan_in_fan_out=True
    CONV2D = "conv2d"
    EMBEDDING = "embedding"


# The layer types whose base weight is the transpose of the 2-D delta.
TRANSPOSED_LAYOUT = (LayerKind.CONV1D, LayerKind.EMBEDDING)


def base_shape(layer: LayerKind, out: int, in_: int, kernel: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The base weight's shape for a delta with ``out`` output and ``in_`` input features (and a
    conv kernel)."""
    if layer in TRANSPOSED_LAYOUT:
        return (in_, out)
    if layer is LayerKind.CONV2D:
        return (out, in_, *kernel)
    return (out, in_)


def to_base(layer: LayerKind, d2: "torch.Tensor", shape: tuple[int, ...]) -> "torch.Tensor":
    """A 2-D delta ``(out, in·kh·kw)`` in the layout of the base weight of ``shape``."""
    if layer is LayerKind.LINEAR:
        return d2
    if layer in TRANSPOSED_LAYOUT:
        return d2.T
    return d2.reshape(shape)


def transposed(layer: LayerKind) -> LayerKind | None:
    """The layer type whose base weight is this one's transposed (Linear <-> Conv1D), or None."""
    return {LayerKind.LINEAR: LayerKind.CONV1D, LayerKind.CONV1D: LayerKind.LINEAR}.get(layer)


def transposed_hint(layer: LayerKind) -> str:
    """Why a delta of ``layer`` fits the base only transposed, and what to set."""
    if layer is LayerKind.LINEAR:
        return ("the base stores it transposed (transformers Conv1D, as in GPT-2): the adapter needs "
                "fan_in_fan_out=True")
    return "the adapter has fan_in_fan_out=True but the base layer is a plain Linear"


def factor_layout_problem(layer: LayerKind, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> str | None:
    """Why factors of these shapes fit no ``layer`` (2-D factors; Conv2d: A (r, in, kh, kw) and a
    1×1 B (out, r, 1, 1)), or None."""
    if layer is LayerKind.CONV2D:
        if len(a_shape) == 4 and len(b_shape) == 4 and tuple(b_shape[2:]) == (1, 1):
            return None
        expected = "A (r, in, kh, kw) and B (out, r, 1, 1)"
    elif len(a_shape) == 2 and len(b_shape) == 2:
        return None
    else:
        expected = "2-D factors"
    return (f"factors lora_A {list(a_shape)} and lora_B {list(b_shape)} fit no {layer.value} layer "
            f"(expected {expected})")


def row_blocked(layer: LayerKind, dora: bool = False) -> bool:
    """Whether a merge may compute the base tensor a block of rows at a time: not Conv2d (whole,
    as PEFT does) nor DoRA on a layer whose norm spans the rows (Conv1D, Embedding)."""
    return layer is not LayerKind.CONV2D and not (dora and layer is not LayerKind.LINEAR)


def block_delta(layer: LayerKind, b2: "torch.Tensor", a2: "torch.Tensor", i: int, j: int,
                out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Rows [i, j) of the unscaled delta in the base layout, from the 2-D factors B2 (out, r) and
    A2 (r, in), computed as PEFT computes the whole (the same bits): B2[i:j] @ A2 for Linear,
    (B2 @ A2[:, i:j]).T for Conv1D and Embedding. Not for Conv2d (see ``row_blocked``). ``out``:
    a buffer of the product's size to write it into (reused across blocks)."""
    import torch

    if layer is LayerKind.LINEAR:
        return torch.mm(b2[i:j], a2, out=out) if out is not None else b2[i:j] @ a2
    if layer in TRANSPOSED_LAYOUT:
        return (torch.mm(b2, a2[:, i:j], out=out) if out is not None else b2 @ a2[:, i:j]).T
    raise ValueError(f"{layer.value}: computed whole, not in row blocks")


def block_factors(layer: LayerKind, b2: "torch.Tensor", a2: "torch.Tensor", i: int, j: int):
    """(left, right) with rows [i, j) of the base layout's delta = left @ right, for a fused
    ``addmm`` or the Triton kernel: B2[i:j] and A2 for Linear; A2[:, i:j].T and B2.T for Conv1D
    and Embedding (rows of (B @ A).T). Not for Conv2d (see ``row_blocked``)."""
    if layer is LayerKind.LINEAR:
        return b2[i:j], a2
    if layer in TRANSPOSED_LAYOUT:
        return a2[:, i:j].T, b2.T
    raise ValueError(f"{layer.value}: computed whole, not in row blocks")


def output_slice(layer: LayerKind, i: int, j: int) -> slice:
    """The output features (a per-output vector's entries: DoRA's magnitude) of rows [i, j) of the
    base: the same rows for Linear and Conv2d, all of them where outputs are columns."""
    return slice(None) if layer in TRANSPOSED_LAYOUT else slice(i, j)


def output_norm(layer: LayerKind, v: "torch.Tensor") -> "torch.Tensor":
    """‖·‖₂ of each output feature of ``v`` (rows of a base-layout tensor), shaped to broadcast over
    it: per row for Linear, per column for Conv1D and Embedding, over (in, kh, kw) for Conv2d
    (PEFT's DoRA weight norm, peft/tuners/lora/dora.py)."""
    import torch

    if layer is LayerKind.LINEAR:
        return torch.linalg.norm(v, dim=1).view(-1, 1)
    if layer in TRANSPOSED_LAYOUT:
        # PEFT: the norm of transpose(W) + delta.T along dim 1, i.e. per column of W
        return torch.linalg.norm(v.T, dim=1).view(1, -1)
    norm = v.norm(p=2, dim=tuple(range(1, v.dim())), keepdim=True).transpose(1, 0)
    return norm.reshape(-1).view(-1, *([1] * (v.dim() - 1)))
