"""Convert an adapter between formats: any two of ``loratool.formats.REGISTRY`` (PEFT, kohya
(sd-scripts), diffusers); LyCORIS modules (LoHa, LoKr, LoCon+Tucker, full) become plain LoRA.

LyCORIS -> LoRA (``to_lora``): exact where the rank allows, the optimal truncation otherwise
(Eckart–Young), with the error reported per module:
  LoKr   the SVD of W1 ⊗ W2 is the Kronecker product of the factors' SVDs: singular values σ1ᵢ·σ2ⱼ,
         vectors u1ᵢ ⊗ u2ⱼ and v1ᵢ ⊗ v2ⱼ; truncation keeps the largest products.
  LoHa, LoCon+Tucker  the exact low-rank form (rank r1·r2 through the face-splitting product; the
         Tucker core folded into A), then its QR-core SVD.
  full   the SVD of ΔW.
  OFT, IA3, GLoRA  ΔW depends on the base weight W (``needs_base``): with ``base`` (``--base``) it is
         computed from the module's base tensor (the one name rule, ``BaseCheckpoint.tensor_name``)
         by the kind's ``delta_from_base`` over the whole tensor, in float64, then its SVD; without
         a base they are refused with the reason.
With a base, every module's layer also comes from it (flattened LoHa/LoKr factors do not say
whether SD 1.5's proj_in is a 1×1 Conv2d or a Linear); without one, a layer is Linear-shaped
unless the kohya reader knows its kernel by name or from the SD family the file says
(``formats/kohya_legacy.py``).
Without --rank/--energy every component above rounding noise is kept (exact).

Reading gives the format-neutral ``Adapter``; the target format's writer lays it out again. Factor
tensors are copied raw, so every conversion is lossless in the tensors; what a target cannot hold
(DoRA or modules_to_save in a kohya file, an LLM adapter in the diffusers or kohya format) is
refused with the reason, never dropped. Metadata (kohya's ss_* training notes) travels along, and
so does the kohya layout that dotted names cannot express (see ``formats/kohya.py``), so kohya ->
PEFT -> kohya and kohya -> diffusers -> kohya give back the original file's keys and bytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loratool.errors import LoratoolError, MisfitError, UsageError
from loratool.formats import FORMATS, as_component
from loratool.schemas.convert import ConvertResult, ModuleConversion

if TYPE_CHECKING:  # pragma: no cover
    import numpy

TARGETS = FORMATS  # every format loratool reads, it writes


def convert(
    src: str | os.PathLike,
    to: str,
    out: str | os.PathLike,
    format: str | None = None,
    overwrite: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    component: str | None = None,
    base: str | os.PathLike | None = None,
) -> ConvertResult:
    """Read the adapter at ``src`` (format detected unless ``format`` is given) and write it to
    ``out`` in the ``to`` format, atomically. LyCORIS modules become LoRA (``to_lora``: at most
    ``rank`` components, or the fewest that hold ``energy`` of ‖ΔW‖²); the result lists each
    converted module with its error. ``component``: the adapter is that part of a diffusers
    pipeline (a UNet adapter PEFT saved, ``unet``), so that kohya and diffusers can name it.
    ``base``: the base checkpoint (a path or hf://owner/name[@rev]) that OFT, IA3 and GLoRA
    modules' ΔW is computed from; those are refused without it."""
    from loratool.formats import write_adapter
    from loratool.resolve import load_adapter

    if to not in TARGETS:
        raise UsageError(f"unknown target format {to!r}; choose one of: {', '.join(TARGETS)}")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy must be in (0, 1], got {energy}")
    adapter = load_adapter(src, format=format)
    if not adapter.modules:
        raise UsageError(f"{src}: holds no LoRA modules; nothing to convert")
    if component is not None:
        adapter = as_component(adapter, component)
    ckpt = None
    if base is not None:
        from loratool.checkpoint import BaseCheckpoint
        from loratool.resolve import resolve_base

        ckpt = BaseCheckpoint(resolve_base(base))
    adapter, conversions = adapter_to_lora(adapter, rank, energy, base=ckpt)
    from loratool.manifest import finish_output, stamp_adapter

    params = {"from": adapter.format, "to": to, **({"base": os.fspath(base)} if base is not None else {})}
    manifest = stamp_adapter(adapter, "converted", [adapter], params)
    # converting carries the source's metadata (ss_* notes, kohya layout) where the target's
    # writer would not by itself, so that a later conversion back can restore them
    path = write_adapter(adapter, out, to, overwrite=overwrite, converting=True)
    finish_output(manifest, path)
    return ConvertResult(
        input=str(src),
        input_format=adapter.format,
        format=to,
        output=Path(path),
        num_modules=len(adapter.modules),
        components=list(adapter.components),
        conversions=[ModuleConversion(**dataclasses.asdict(c)) for c in conversions],
    )


# -- LyCORIS -> LoRA ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraConversion:
    """One module converted to LoRA: the algorithm, the exact rank, the rank kept, and the error
    ‖ΔW − ΔW_k‖_F (absolute and relative to ‖ΔW‖_F), in float64 from the singular values."""

    module: str
    algorithm: str
    exact_rank: int
    rank: int
    error: float
    relative_error: float


def _keep(S, shape, rank: int | None, energy: float | None) -> int:
    from loratool.lowrank import effective_rank, numerical_rank

    k = numerical_rank(S, shape)
    if energy is not None:
        k = min(k, max(1, effective_rank(S, energy)))
    if rank is not None:
        k = min(k, rank)
    return max(k, 1)


def lora_svd(m, rank: int | None = None, energy: float | None = None, delta=None):
    """(U·√S, √S·Vh, S, k): the best rank-k factors of m's scaled 2-D delta (float64), its singular
    values S (descending, all of them) and k (see ``_keep``). ``delta``: that scaled delta, dense
    (out, in·kh·kw), given (a base-dependent kind's, from the base: ``delta_from_base``)."""
    import numpy as np

    from loratool.lowrank import core_svd

    out, in_, kern = m.out_in()
    shape = (out, in_ * math.prod(kern))
    if delta is not None:
        U, S, Vh = np.linalg.svd(np.asarray(delta, np.float64).reshape(shape), full_matrices=False)
        k = _keep(S, shape, rank, energy)
        U, Vh = U[:, :k], Vh[:k]
    elif m.module_kind == "lokr":
        (u1, s1, v1), (u2, s2, v2) = m.factor_svds()
        prod = np.outer(s1, s2).reshape(-1) * abs(m.scale)
        order = np.argsort(-prod, kind="stable")
        S = prod[order]
        k = _keep(S, shape, rank, energy)
        i1, i2 = np.divmod(order[:k], len(s2))
        sign = 1.0 if m.scale >= 0 else -1.0
        U = np.einsum("ak,ck->ack", u1[:, i1], u2[:, i2]).reshape(shape[0], k) * sign
        Vh = np.einsum("kb,kd->kbd", v1[i1], v2[i2]).reshape(k, shape[1])
    else:
        f = m.exact_factors()
        if f is None:
            d = m._d2(np.float64) * m.scale
            U, S, Vh = np.linalg.svd(d, full_matrices=False)
        else:
            U, S, Vh = core_svd(f[0], f[1], m.scale)
        k = _keep(S, shape, rank, energy)
        U, Vh = U[:, :k], Vh[:k]
    root = np.sqrt(S[:k])
    return U * root, root[:, None] * Vh, S, k


def module_to_lora(m, rank: int | None = None, energy: float | None = None, delta=None):
    """A LyCORIS module as a plain LoRA (DoRA with its DoRA scale, a lora_B bias with full's diff_b),
    factors in the module's dtype, scale 1 (alpha = rank), and its ``LoraConversion``. ``delta``:
    its scaled ΔW, dense, where the kind needs the base for it (``base_delta``)."""
    import dataclasses

    import numpy as np

    b, a, S, k = lora_svd(m, rank, energy, delta)
    total = float(np.sqrt((S ** 2).sum()))
    err = float(np.sqrt((S[k:] ** 2).sum()))
    # scale 1 (alpha = k): a loader that ignores alpha still applies it right
    lora = dataclasses.replace(m.with_factors(b, a), alpha=float(k), use_rslora=False, config_rank=k,
                               config_alpha=float(k))
    return lora, LoraConversion(m.name, m.algorithm, m.exact_rank, k, err, err / total if total else 0.0)


def base_problem(m, base=None) -> str:
    """Why a base-dependent module (OFT, IA3, GLoRA) cannot be converted: no base given, or its
    base tensor missing or of another shape; one clause."""
    why = f"LyCORIS {m.algorithm}'s ΔW = {m.formula} depends on the base weight"
    if base is None:
        return (f"{why}; give the base it was trained on with --base BASE to convert it to LoRA "
                "(`loratool merge` applies it to a base)")
    return why


def base_delta(m, base) -> "numpy.ndarray":
    """The scaled ΔW (float64, the base layout) of a base-dependent module ``m`` from its tensor in
    ``base`` (a ``BaseCheckpoint``; the one name rule, ``fit_in``), the whole tensor at once.
    ``m`` takes the dimensions its tensors do not say from the base (``fit``)."""
    import numpy as np

    from loratool.kinds.base import float_values

    fit = m.fit_in(base)
    if not fit.ok:
        raise MisfitError(f"{base_problem(m, base)}, and {fit.message}")
    w = np.asarray(float_values(base.ref(fit.target)), np.float64)
    if fit.rows is not None:  # its rows of a fused tensor (OpenCLIP's q, k or v)
        w = w[fit.rows[0]:fit.rows[1]]
    return m.delta_from_base(w, 0, w.shape[0])


def adapter_to_lora(adapter, rank: int | None = None, energy: float | None = None, base=None):
    """``adapter`` with every LyCORIS module made LoRA (``module_to_lora``), and the conversions;
    LoRA and DoRA modules are kept as they are. A module the conversion cannot keep whole (a DoRA
    scale per input column) is refused with the reason. OFT, IA3 and GLoRA modules need ``base``
    (a ``BaseCheckpoint``): their ΔW is computed from it (``base_delta``); refused without it. With
    ``base`` every LyCORIS module must fit it, and takes from it the kernel its flattened factors do
    not say (``kernel_fit``: LoHa/LoKr on SD 1.5's 1×1 proj_in/proj_out convs, which diffusers
    loads only as Conv2d LoRA); without it they stay Linear-shaped (SDXL's Linear proj_in)."""
    import dataclasses

    from loratool.kinds.lycoris_base import LycorisModule

    lyco = [m for m in adapter.modules.values() if isinstance(m, LycorisModule)]
    if not lyco:
        return adapter, []
    for m in lyco:
        if m.needs_base and base is None:  # OFT, IA3, GLoRA: no delta without the base
            raise UsageError(f"{adapter.path}: module {m.name}: {base_problem(m)}")
        problems = m.structure_problems()
        if problems:
            raise UsageError(f"{adapter.path}: module {m.name}: {problems[0].message}")
        if getattr(m, "dora_scale", None) is not None and m.dora_axis() != "out":
            raise UsageError(f"{adapter.path}: module {m.name}: {m.merge_problem(1.0, 1)}; a LoRA cannot hold it")
    from loratool._threads import map_modules

    def one(m):
        if base is None:
            return module_to_lora(m, rank, energy)
        try:
            if not m.needs_base:
                # the base says what flattened factors do not: a 1×1 Conv2d (SD 1.5's proj_in) or a Linear
                fit = m.fit_in(base)
                if not fit.ok:
                    raise MisfitError(f"the base does not fit it: {fit.message}")
                return module_to_lora(m, rank, energy)
            return module_to_lora(m, rank, energy, base_delta(m, base))
        except LoratoolError as e:
            raise type(e)(f"{adapter.path}: module {m.name}: {e}", e.exit_code) from None

    results = map_modules(one, lyco)
    modules = dict(adapter.modules)
    for lora, conv in results:
        modules[lora.name] = lora
    return dataclasses.replace(adapter, modules=modules), [c for _, c in results]
