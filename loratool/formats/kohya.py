"""kohya / sd-scripts LoRA files: one .safetensors with underscore module names.

Key layout (sd-scripts networks/lora.py, ``LoRANetwork`` / ``LoRAModule``):
  lora_unet_<path>.lora_down.weight   A: (r, in) or (r, in, kh, kw)
  lora_unet_<path>.lora_up.weight     B: (out, r) or (out, r, 1, 1)
  lora_unet_<path>.alpha              scalar; scale = alpha / r; absent means alpha = r
with ``<path>`` the module's path in the model, dots replaced by underscores, and the component
in the prefix: ``lora_unet_`` (UNet), ``lora_te_`` (SD 1.x/2.x text encoder), ``lora_te1_`` /
``lora_te2_`` (SDXL's two text encoders), ``lora_te3_`` (SD3's T5), ``lora_transformer_``
(OneTrainer's name for a diffusers transformer). Flux is written as sd-scripts writes it, under
BFL's module names (``lora_unet_double_blocks_0_img_attn_qkv``), which diffusers loads; a BFL
module that holds several diffusers modules (q, k and v) is their exact fusion, split again on
reading (``sdnames.flux_fuse``/``flux_split``); OneTrainer's names are kept for a file that had
them (``KohyaLayout.transformer_names``) and for transformers that are not Flux. Training metadata
(``ss_*``, ``modelspec.*``) lives in the safetensors ``__metadata__`` and is kept as it is.

LyCORIS modules (LoHa ``hada_*``, LoKr ``lokr_*``, LoCon ``lora_mid``, full ``diff``, OFT/IA3/GLoRA)
share the prefixes; a module's algorithm is read from its tensors' suffixes, and what older files
leave unsaid (a flattened conv's kernel, the SD family that makes proj_in a 1×1 conv) from the
module's name and the file (``formats/kohya_legacy.py``).

Reading maps names to dotted diffusers names (``formats/sdnames.py``); SDXL files from sd-scripts
use the original Stability UNet names (``input_blocks_4_1_…``), which are mapped onto
``UNet2DConditionModel`` names too. What cannot be recovered from the dotted names alone — SGM
naming, ``lora_te1_`` without a second text encoder, the alpha dtype when it is not the factors'
dtype, modules written without alpha — is the file's *layout*, a ``KohyaLayout``: the adapter's
config, and when the adapter is written in another format the metadata key ``loratool.kohya_layout``
(``carry_metadata``), so that kohya -> PEFT/diffusers -> kohya gives back the same keys and bytes.

Writing follows sd-scripts: alpha is a scalar in the dtype of the saved weights (sd-scripts casts
every tensor of the state dict to the save dtype, alpha included), unless the layout says
otherwise or the value is not exact in that dtype (then float32, else float64: the scale never
changes). An adapter read from a kohya file that is still there gets its alpha tensors copied raw
when their value is unchanged. rsLoRA modules are written with alpha·sqrt(r), kohya's scale being
alpha/r.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Literal

from loratool.adapter import (Adapter, AdapterModule, LayerKind, LoraModule, TensorSource, dtype_of, float_values,
                              module_of, shape_of)
from loratool.errors import InputError, OutputError, UsageError
from loratool.formats import kohya_legacy, sdnames
from loratool.formats.base import (BAD_ALPHA, BAD_FACTOR, MISSING_FACTOR, Format, FormatConfig, ReadProblem,
                                   pair_problem)
from loratool.boundary import parse_json
from loratool.safetensors_io import (FLOAT_DTYPES, HostTensor, SafetensorsFile, TensorRef, atomic_path, host_tensor,
                                     write_safetensors)

NAME = "kohya"
LAYOUT_KEY = "loratool.kohya_layout"
FUSED_KEY = "loratool.flux_fused"  # {lora_name: {"rows", "ranks", "alphas"}}: how Flux parts were fused
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"

# kohya prefix -> component; lora_te1_ must be tried before lora_te_ is (it is not a prefix of it,
# but keep the specific ones first anyway).
PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("lora_transformer_", "transformer"),
)
COMPONENT_ORDER = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
_ROLES = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
# LyCORIS tensors (lycoris/modules/*.py ``weight_list``) under the same prefixes: the algorithm of a
# module is read from its tensors' suffixes (``_algorithm``).
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_LYCORIS_ROLES = {*_LOHA, *_LOKR, "lora_mid.weight", "dora_scale", "diff", "diff_b", "oft_blocks", "oft_diag",
                  "rescale", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "weight", "on_input",
                  "scalar"}
# Kinds whose ΔW depends on the base weight (LyCORIS OFT's (R − I)·W, IA3's W ∘ w, GLoRA's
# W·a1·a2 + b1·b2; kinds/lycoris_based.py), by the tensor that marks them, and their tensors.
_BASE_DEPENDENT = {
    "oft_blocks": ("oft", {"oft_blocks", "rescale"}),
    "oft_diag": ("oft", {"oft_diag", "rescale"}),
    "on_input": ("ia3", {"weight", "on_input"}),
    "a1.weight": ("glora", {"a1.weight", "a2.weight", "b1.weight", "b2.weight"}),
}
# A LoHa/LoKr conv module with flattened factors (r, in·kh·kw) gets its kernel from its name, or for
# proj_in/proj_out from the SD family the file says (formats/kohya_legacy.py); any other is read
# Linear-shaped, and a merge takes the kernel from the base (kinds/lycoris_base.kernel_fit).


def sniff_keys(keys: list[str]) -> bool:
    prefixes = tuple(p for p, _ in PREFIXES)
    return any(k.startswith(prefixes) and (k.endswith(".lora_down.weight") or k.partition(".")[2] in _LYCORIS_ROLES)
               for k in keys)


def split_prefix(lora_name: str) -> tuple[str, str, str] | None:
    """``lora_te1_text_model_…`` -> ("lora_te1_", "text_encoder", "text_model_…")."""
    for prefix, comp in PREFIXES:
        if lora_name.startswith(prefix):
            return prefix, comp, lora_name[len(prefix):]
    return None


def module_name(lora_name: str) -> tuple[str, bool] | None:
    """kohya module name -> (dotted name with component, whether it used SGM UNet names)."""
    split = split_prefix(lora_name)
    if split is None:
        return None
    _, comp, rest = split
    bfl = sdnames.bfl_from_kohya(rest) if comp == "unet" else None
    if bfl is not None:  # sd-scripts' Flux (BFL names): the pipeline's transformer
        return f"transformer.{bfl}", False
    dotted = sdnames.from_kohya(rest)
    sgm = False
    if comp == "unet" and sdnames.is_sgm(dotted):
        mapped = sdnames.sgm_to_diffusers(dotted)
        sgm = mapped != dotted
        dotted = mapped
    return f"{comp}.{dotted}", sgm


# -- reading ------------------------------------------------------------------------------------

def _file(path: Path) -> Path:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise InputError(f"{path}: a kohya LoRA is one .safetensors file; found {len(files)} here, pass the file")
        return files[0]
    return path


def _scalar(ref: TensorRef) -> float | None:
    """A one-element tensor's value, of any numeric dtype (DyLoRA saves alpha as an integer), without
    torch; None for a dtype that holds no number."""
    import numpy as np

    from loratool.safetensors_io import STORAGE

    if ref.dtype in FLOAT_DTYPES:
        return float(float_values(ref).reshape(-1)[0])
    if ref.dtype not in STORAGE or ref.dtype.startswith("F8") or ref.dtype == "BOOL":
        return None
    return float(np.frombuffer(ref.raw(), STORAGE[ref.dtype]).reshape(-1)[0])


def _algorithm(roles: set[str]) -> str:
    """The network a module's tensor suffixes make: lora, loha, lokr, full, or a base-dependent kind."""
    if roles & set(_LOHA):
        return "loha"
    if roles & set(_LOKR):
        return "lokr"
    if "diff" in roles:
        return "full"
    for marker in _BASE_DEPENDENT:
        if marker in roles:
            return marker
    return "lora"


def _host_reshape(ref: TensorRef, shape: tuple[int, ...]) -> HostTensor:
    import numpy as np

    from loratool.safetensors_io import STORAGE

    return HostTensor(ref.dtype, np.frombuffer(ref.raw(), STORAGE[ref.dtype]).reshape(shape))


def read(path: Path) -> Adapter:
    path = _file(Path(path))
    st = SafetensorsFile(path)
    groups: dict[str, dict[str, str]] = {}
    problems: list[ReadProblem] = []
    for key in st.keys():
        lora_name, _, role = key.partition(".")
        if (role not in _ROLES and role not in _LYCORIS_ROLES) or split_prefix(lora_name) is None:
            why = ("not a kohya/LyCORIS key (expected lora_unet_/lora_te…_<module>.lora_down.weight, .lora_up.weight, "
                   ".alpha, or a LyCORIS tensor: hada_*, lokr_*, lora_mid, dora_scale, diff)")
            problems.append(ReadProblem(BAD_FACTOR, f"{path}: tensor {key!r}: {why}"))
            continue
        groups.setdefault(lora_name, {})[role] = key

    modules: dict[str, AdapterModule] = {}
    origin: dict[str, str] = {}
    sgm = False
    te_prefixes: Counter[str] = Counter()
    alpha_dtypes: Counter[str] = Counter()
    alpha_shapes: Counter[tuple[int, ...]] = Counter()
    mismatched_alpha_dtype = False
    no_alpha: list[str] = []
    onetrainer = False
    family = kohya_legacy.sd_family(st.metadata, groups, lambda k: st.info(k).shape)[0]
    fused = sdnames.fused_record(st.metadata.get(FUSED_KEY))
    for lora_name, keys in sorted(groups.items()):
        label = f"{path}: module {lora_name!r}"
        algo = _algorithm(set(keys))
        name, from_sgm = module_name(lora_name) or (lora_name, False)  # the prefix was checked above
        if name in modules:
            problems.append(ReadProblem(BAD_FACTOR, f"{label}: maps to module {name!r}, like {origin[name]!r}; the "
                                        "file holds the same module twice", lora_name))
            continue
        alpha_key = keys.get("alpha")
        alpha = None
        if alpha_key is not None:
            ref = st.ref(alpha_key)
            if math.prod(ref.shape) != 1:
                problems.append(ReadProblem(BAD_ALPHA, f"{label}: alpha must be one number, found shape "
                                            f"{list(ref.shape)}", lora_name))
                continue
            alpha = _scalar(ref)
            if alpha is None:
                problems.append(ReadProblem(BAD_ALPHA, f"{label}: alpha must be a number, found {ref.dtype}", lora_name))
                continue
            if not math.isfinite(alpha) or alpha <= 0:
                if algo in ("oft_blocks", "oft_diag") and alpha == 0:
                    pass  # OFT: alpha is the constraint, 0 none
                elif algo != "lora" and alpha == 0:
                    alpha = None  # LyCORIS: alpha 0 means alpha = dim
                else:
                    problems.append(ReadProblem(BAD_ALPHA, f"{label}: alpha must be a positive finite number, found "
                                                f"{alpha}", lora_name))
                    continue
        if algo == "lora":
            module = _lora_module(st, path, name, lora_name, keys, alpha, label, problems)
        elif algo in _BASE_DEPENDENT:
            module = _based_module(st, name, lora_name, keys, alpha, algo, label, problems)
        else:
            module = _lycoris_module(st, name, lora_name, keys, alpha, algo, label, problems, family)
        if module is None:
            continue
        parts = [module]
        if name.startswith("transformer.") and algo == "lora" and not keys.keys() & {"lora_mid.weight", "dora_scale"}:
            parts = sdnames.flux_split(module, name.split(".", 1)[1], fused.get(lora_name)) or parts
        again = [p.name for p in parts if p.name in modules]
        if again:
            problems.append(ReadProblem(BAD_FACTOR, f"{label}: maps to module {again[0]!r}, like "
                                        f"{origin[again[0]]!r}; the file holds the same module twice", lora_name))
            continue
        if alpha_key is not None and alpha is not None:
            ref = st.ref(alpha_key)
            alpha_dtypes[ref.dtype] += 1
            alpha_shapes[ref.shape] += 1
            first = next(iter(module.tensors().values()))
            mismatched_alpha_dtype |= ref.dtype != dtype_of(first)
        elif algo == "lora":
            no_alpha.extend(p.name for p in parts)
        sgm |= from_sgm
        onetrainer |= lora_name.startswith("lora_transformer_")
        if lora_name.startswith(("lora_te_", "lora_te1_")):
            te_prefixes[split_prefix(lora_name)[0]] += 1
        for part in parts:
            modules[part.name] = part
            origin[part.name] = lora_name

    te_prefix = None
    if te_prefixes:  # the first text encoder's prefix, where the writer would not guess it
        used = te_prefixes.most_common(1)[0][0]
        if used != default_te_prefix(n.split(".", 1)[0] for n in modules):
            te_prefix = used
    layout = KohyaLayout(
        sgm_unet=sgm,
        te_prefix=te_prefix,
        alpha_dtype=alpha_dtypes.most_common(1)[0][0] if mismatched_alpha_dtype and alpha_dtypes else None,
        alpha_shape=alpha_shapes.most_common(1)[0][0] if alpha_shapes else (),
        no_alpha="all" if no_alpha and len(no_alpha) == len(modules) else tuple(sorted(no_alpha)),
        no_format_metadata="format" not in st.metadata,
        transformer_names="onetrainer" if onetrainer else None,
    )

    present = {n.split(".", 1)[0] for n in modules}
    return Adapter(
        format=NAME,
        modules=dict(sorted(modules.items())),
        path=path,
        files=[path],
        config=layout,
        metadata=dict(st.metadata),
        problems=problems,
        components=tuple(c for c in COMPONENT_ORDER if c in present),
    )


def _lora_module(st, path, name, lora_name, keys, alpha, label, problems) -> AdapterModule | None:
    """A LoRA/LoCon module (lora_down/lora_up), with a Tucker core (lora_mid) or a DoRA scale."""
    a_key, b_key = keys.get("lora_down.weight"), keys.get("lora_up.weight")
    a, b = (st.ref(k) if k is not None else None for k in (a_key, b_key))
    if a is not None and b is not None and len(a.shape) == 4 and len(b.shape) == 2 and "lora_mid.weight" not in keys:
        b = _host_reshape(b, (*b.shape, 1, 1))  # DyLoRA conv: a 2-D lora_up under a 4-D lora_down
    mid_key = keys.get("lora_mid.weight")
    found = str(sorted(keys.values()))
    if mid_key is None:
        problem = pair_problem(a, b, label, lora_name, ("lora_down", "lora_up"), found,
                               missing=("lora_down.weight", "lora_up.weight"))
        if problem:
            problems.append(problem)
            return None
    elif a is None or b is None:
        which = "lora_down.weight" if a is None else "lora_up.weight"
        problems.append(ReadProblem(MISSING_FACTOR, f"{label}: {which} is missing (only {found})", lora_name))
        return None
    rank = a.shape[0]
    source_keys = {"lora_A": a_key, "lora_B": b_key}
    for role, k in (("alpha", "alpha"), ("lora_mid", "lora_mid.weight"), ("dora_scale", "dora_scale")):
        if k in keys:
            source_keys[role] = keys[k]
    fields: dict[str, Any] = {}
    if mid_key is not None:
        fields["lora_mid"] = st.ref(mid_key)
        if "dora_scale" in keys:
            fields["dora_scale"] = st.ref(keys["dora_scale"])
    elif "dora_scale" in keys:  # LyCORIS DoRA on a LoRA: PEFT's magnitude (wd_on_out=True), flat
        ds = st.ref(keys["dora_scale"])
        out = b.shape[0]
        if tuple(d for d in ds.shape if d != 1) not in ((out,), ()) or (ds.shape and ds.shape[0] != out):
            problems.append(ReadProblem(BAD_FACTOR, f"{label}: DoRA scale (dora_scale) has shape {list(ds.shape)}, "
                                        f"expected [{out}, 1…] (one per output row; a per-input-column scale, "
                                        "wd_on_out=False, is not merged)", lora_name))
            return None
        fields["magnitude"] = _host_reshape(ds, (out,))
    m = module_of(name=name, kind=LayerKind.CONV2D if len(a.shape) == 4 else LayerKind.LINEAR, lora_A=a, lora_B=b,
                  alpha=float(rank) if alpha is None else alpha, source_keys=source_keys, **fields)
    return m


_LYCORIS_KIND = {"loha": "LohaModule", "lokr": "LokrModule", "full": "FullModule"}


def _lycoris_module(st, name, lora_name, keys, alpha, algo, label, problems,
                    family: str | None = None) -> AdapterModule | None:
    """A LoHa, LoKr or full module: its tensors by role, dimensions from their shapes (a flattened
    conv's kernel from its name, or the file's SD ``family``: ``kohya_legacy.kernel_of``)."""
    from loratool import kinds

    refs = {role: st.ref(k) for role, k in keys.items() if role != "alpha"}
    source_keys = {role: k for role, k in keys.items()}
    if algo == "full":
        diff = refs["diff"]
        kind = LayerKind.CONV2D if len(diff.shape) == 4 else LayerKind.LINEAR
        m = kinds.FullModule(name=name, kind=kind, diff=diff, lora_B_bias=refs.get("diff_b"),
                             source_keys={"diff": keys["diff"], **({"lora_B_bias": keys["diff_b"]} if "diff_b" in keys else {})})
    else:
        cls = getattr(kinds, _LYCORIS_KIND[algo])
        roles = set(_LOHA if algo == "loha" else _LOKR) | {"dora_scale"}
        extra = sorted(set(refs) - roles)
        if extra:
            problems.append(ReadProblem(BAD_FACTOR, f"{label}: {', '.join(extra)} do not belong to a LyCORIS "
                                        f"{cls.algorithm} module", lora_name))
            return None
        if algo == "loha":
            missing = [r for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if r not in refs]
            if missing:
                problems.append(ReadProblem(MISSING_FACTOR, f"{label}: LyCORIS LoHa without {', '.join(missing)} "
                                            f"(found {sorted(keys)})", lora_name))
                return None
        four_d = any(len(r.shape) == 4 for role, r in refs.items() if role != "dora_scale")
        fields = {role: refs[role] for role in refs}
        if algo == "lokr" and alpha is None and "lokr_w1_b" not in refs and "lokr_w2_b" not in refs:
            alpha = 1.0  # both factors full: scale 1 whatever alpha says
        flat = "hada_w1_b" if algo == "loha" else "lokr_w2_b"
        kernel, note = (), None
        if not four_d and flat in refs and len(refs[flat].shape) == 2:
            shape = list(refs[flat].shape)
            kernel, note = kohya_legacy.kernel_of(name, shape[1], family, f"{flat} {shape}")
        kind = LayerKind.CONV2D if four_d or kernel else LayerKind.LINEAR
        try:
            m = cls(name=name, kind=kind, alpha=1.0, kernel=kernel, source_keys=source_keys, layer_note=note, **fields)
        except TypeError as e:  # pragma: no cover - the roles were checked above
            problems.append(ReadProblem(BAD_FACTOR, f"{label}: {e}", lora_name))
            return None
        if algo == "lokr":
            why = [p for p in m.structure_problems() if p.check in ("LT101", "LT102")]
            if why:
                problems.append(ReadProblem(why[0].check, f"{label}: {why[0].message}", lora_name))
                return None
        m.alpha = float(m.dim) if alpha is None and m.dim is not None else (1.0 if alpha is None else alpha)
    return m


def _based_module(st, name, lora_name, keys, alpha, marker, label, problems) -> AdapterModule | None:
    """An OFT, IA3 or GLoRA module (kinds/lycoris_based.py): its ΔW depends on the base weight."""
    from loratool import kinds

    algo, roles = _BASE_DEPENDENT[marker]
    refs = {role: st.ref(k) for role, k in keys.items() if role != "alpha"}
    extra = sorted(set(refs) - roles)
    if extra:
        what = {"oft": "OFT", "ia3": "IA3", "glora": "GLoRA"}[algo]
        why = " (GLoRA with a Tucker core, bm, is not read)" if "bm.weight" in extra else ""
        problems.append(ReadProblem(BAD_FACTOR, f"{label}: {', '.join(extra)} do not belong to a LyCORIS {what} "
                                    f"module{why}", lora_name))
        return None
    missing = sorted(roles - set(refs) - {"rescale", "oft_diag", "oft_blocks"})
    if missing:
        problems.append(ReadProblem(MISSING_FACTOR, f"{label}: LyCORIS {algo} module without {', '.join(missing)} "
                                    f"(found {sorted(keys)})", lora_name))
        return None
    source_keys = dict(keys)
    if algo == "oft":
        blocks = refs.get("oft_blocks", refs.get("oft_diag"))
        rescale = refs.get("rescale")
        kind = LayerKind.CONV2D if rescale is not None and len(rescale.shape) == 4 else LayerKind.LINEAR
        source_keys["oft_blocks"] = keys[marker]
        m = kinds.OftModule(name=name, kind=kind, oft_blocks=blocks, rescale=rescale, is_r=marker == "oft_diag",
                            alpha=0.0 if alpha is None or marker == "oft_diag" else alpha, source_keys=source_keys)
    elif algo == "ia3":
        on_input = _scalar(refs["on_input"]) if math.prod(refs["on_input"].shape) == 1 else None
        if on_input not in (0.0, 1.0):
            problems.append(ReadProblem(BAD_FACTOR, f"{label}: IA3 on_input must be 0 or 1, found "
                                        f"{on_input if on_input is not None else list(refs['on_input'].shape)}",
                                        lora_name))
            return None
        w = refs["weight"]
        kind = LayerKind.CONV2D if len(w.shape) == 4 else LayerKind.LINEAR
        m = kinds.Ia3Module(name=name, kind=kind, weight=w, on_input=bool(on_input), source_keys=source_keys)
    else:
        f = {r.split(".")[0]: refs[r] for r in roles}
        m = kinds.GloraModule(name=name, kind=LayerKind.CONV2D if len(f["b2"].shape) == 4 else LayerKind.LINEAR,
                              alpha=1.0, source_keys={r.split(".")[0]: k for r, k in keys.items()}, **f)
    why = m.structure_problems()
    if why:
        problems.append(ReadProblem(BAD_FACTOR, f"{label}: {why[0].message}", lora_name))
        return None
    if algo == "glora":
        m.alpha = float(m.rank) if alpha is None else alpha  # LyCORIS: alpha 0 or none means alpha = dim
    return m


# -- layout that survives other formats ----------------------------------------------------------

@dataclass(frozen=True)
class KohyaLayout(FormatConfig):
    """A kohya adapter's config: what its file says that dotted module names cannot (see the
    module docstring), so that writing it back gives the same keys and bytes."""

    sgm_unet: bool = False  # SDXL UNet modules under Stability's names (input_blocks_4_1_…)
    te_prefix: str | None = None  # the first text encoder's prefix, where the writer would not guess it
    alpha_dtype: str | None = None  # the alphas' dtype, where it is not the factors'
    alpha_shape: tuple[int, ...] = ()  # the alphas' shape: (1,) instead of a 0-d scalar
    no_alpha: tuple[str, ...] | Literal["all"] = ()  # modules written without alpha ("all": every one)
    no_format_metadata: bool = False  # the file's __metadata__ has no "format" entry
    transformer_names: str | None = None  # "onetrainer": Flux as lora_transformer_… (default: sd-scripts')

    def as_json(self) -> dict[str, Any]:
        """The layout as JSON: the ``loratool.kohya_layout`` metadata note, and the config digest."""
        out: dict[str, Any] = {}
        if self.sgm_unet:
            out["unet_names"] = "sgm"
        if self.te_prefix:
            out["te_prefix"] = self.te_prefix
        if self.alpha_dtype:
            out["alpha_dtype"] = self.alpha_dtype
        if self.alpha_shape:
            out["alpha_shape"] = list(self.alpha_shape)
        if self.no_alpha:
            out["no_alpha"] = self.no_alpha if self.no_alpha == "all" else list(self.no_alpha)
        if self.no_format_metadata:
            out["no_format_metadata"] = True
        if self.transformer_names:
            out["transformer_names"] = self.transformer_names
        return out

    @classmethod
    def from_json(cls, note: Any) -> "KohyaLayout":
        """A layout from a ``loratool.kohya_layout`` note; a field of another type than ours reads
        as the plain layout's."""
        if not isinstance(note, dict):
            return cls()

        def text(key):
            return note.get(key) if isinstance(note.get(key), str) else None

        shape, no_alpha = note.get("alpha_shape"), note.get("no_alpha")
        ints = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        names = isinstance(no_alpha, list) and all(isinstance(n, str) for n in no_alpha)
        return cls(sgm_unet=note.get("unet_names") == "sgm", te_prefix=text("te_prefix"),
                   alpha_dtype=text("alpha_dtype"), alpha_shape=tuple(shape) if ints else (),
                   no_alpha="all" if no_alpha == "all" else tuple(no_alpha) if names else (),
                   no_format_metadata=bool(note.get("no_format_metadata")),
                   transformer_names="onetrainer" if note.get("transformer_names") == "onetrainer" else None)

    def document(self, ignored: Collection[str] = ()) -> dict[str, Any]:
        return {"kohya_layout": self.as_json()}

    def __bool__(self) -> bool:  # a kohya adapter always has a layout, if only the plain one
        return True


def layout_of(adapter: Adapter) -> KohyaLayout:
    """The kohya layout of an adapter: its own when read from kohya, else the one a kohya source
    left in the metadata of the file it was converted to (``carry_metadata``), else the plain one."""
    if isinstance(adapter.config, KohyaLayout):
        return adapter.config
    raw = adapter.metadata.get(LAYOUT_KEY)
    if raw:
        try:
            return KohyaLayout.from_json(parse_json(raw, f"metadata {LAYOUT_KEY!r}"))
        except InputError:
            pass  # a layout note we cannot read: the plain kohya layout
    return KohyaLayout()


def carry_metadata(adapter: Adapter) -> dict[str, str]:
    """Metadata to write when ``adapter`` goes into another format: its own (ss_* and the like),
    without keys that describe the old file only, plus the kohya layout when there is one."""
    md = {k: v for k, v in adapter.metadata.items() if k not in (LAYOUT_KEY, DIFFUSERS_METADATA_KEY, FUSED_KEY)}
    layout = layout_of(adapter).as_json()
    if layout:
        md[LAYOUT_KEY] = json.dumps(layout, sort_keys=True, separators=(",", ":"))
    return md


# sd-scripts' training metadata on the network's size; resize_lora.py writes "Dynamic" when the
# ranks (and so, with its alpha policy, the alphas) differ from module to module.
NETWORK_DIM, NETWORK_ALPHA, NETWORK_ARGS = "ss_network_dim", "ss_network_alpha", "ss_network_args"
DYNAMIC = "Dynamic"


def _same(old: str | None, new: str) -> bool:
    if old == new:
        return True
    try:
        return old is not None and new != DYNAMIC and float(old) == float(new)
    except ValueError:
        return False


def network_metadata(metadata: dict[str, str], modules) -> dict[str, str]:
    """``metadata`` with sd-scripts' ``ss_network_dim``/``ss_network_alpha`` and the ``conv_dim``/
    ``conv_alpha`` of ``ss_network_args`` made true of ``modules`` (Conv2d modules with a kernel
    above 1×1 are the conv ones, the rest the network's): the common rank or alpha, or "Dynamic"
    when they differ. Only keys already there are touched, and one whose value is already true
    keeps its text; the alpha is kohya's (alpha·√r for rsLoRA)."""

    def values(conv: bool) -> tuple[str, str] | None:
        mods = [m for m in modules if is_conv_kernel(m) == conv]
        if not mods:
            return None
        ranks = {m.rank for m in mods}
        alphas = {m.alpha * math.sqrt(m.rank) if m.use_rslora else m.alpha for m in mods}
        return (str(ranks.pop()) if len(ranks) == 1 else DYNAMIC,
                str(float(alphas.pop())) if len(alphas) == 1 else DYNAMIC)

    modules = list(modules)
    md = dict(metadata)
    net = values(False)
    if net is not None:
        for key, value in zip((NETWORK_DIM, NETWORK_ALPHA), net):
            if key in md and not _same(md[key], value):
                md[key] = value
    conv, raw = values(True), md.get(NETWORK_ARGS)
    if conv is not None and raw:
        try:
            args = json.loads(raw)
        except ValueError:
            return md  # not ours to repair
        if isinstance(args, dict):
            changed = False
            for key, value in zip(("conv_dim", "conv_alpha"), conv):
                if key in args and not _same(str(args[key]), value):
                    args[key], changed = value, True
            if changed:
                md[NETWORK_ARGS] = json.dumps(args)
    return md


def is_conv_kernel(m) -> bool:
    """A Conv2d module with a kernel above 1×1: sd-scripts' conv_dim/conv_alpha apply to it."""
    shape = tuple(m.base_weight_shape)
    return len(shape) == 4 and shape[2] * shape[3] > 1


# -- writing ------------------------------------------------------------------------------------

def default_te_prefix(components) -> str:
    """sd-scripts: ``lora_te_`` for one text encoder, ``lora_te1_``/``lora_te2_`` for SDXL's two."""
    return "lora_te1_" if "text_encoder_2" in set(components) else "lora_te_"


def _refuse(adapter: Adapter, what: str) -> None:
    where = f"{adapter.path}: " if adapter.path else ""
    raise UsageError(f"{where}cannot write as kohya: {what}")


def check_writable(adapter: Adapter) -> None:
    if not adapter.components:
        _refuse(adapter, "the adapter has no model components (unet, text_encoder); kohya keys name the "
                         "component of each module (lora_unet_, lora_te_), so only Stable Diffusion-style "
                         "adapters can be written; for one part of a pipeline (a UNet that PEFT saved) pass "
                         "--component unet (or text_encoder, ...), else use --to peft")
    unknown = [c for c in adapter.components if c not in COMPONENT_ORDER]
    if unknown:
        _refuse(adapter, f"component {unknown[0]!r} has no kohya prefix (known: {', '.join(COMPONENT_ORDER)})")
    orphans = [n for n in adapter.modules if n.split(".", 1)[0] not in adapter.components or "." not in n]
    if orphans:
        _refuse(adapter, f"module {orphans[0]!r} belongs to no component of {list(adapter.components)}")
    for m in adapter.modules.values():
        if m.module_kind not in ("lora", "dora"):
            _refuse(adapter, f"module {m.name!r} is {getattr(m, 'algorithm', m.module_kind)}, not LoRA; `loratool convert "
                             "--to kohya` writes it as a LoRA (exactly, or at --rank/--energy)")
        if m.use_dora:
            _refuse(adapter, f"module {m.name!r} is DoRA (magnitude vector); a kohya LoRA file has no place for it")
        if m.lora_B_bias is not None:
            _refuse(adapter, f"module {m.name!r} has a lora_B bias (lora_bias=True); a kohya LoRA file has no "
                             "place for it")
        if m.kind not in (LayerKind.LINEAR, LayerKind.CONV2D):
            _refuse(adapter, f"module {m.name!r} is a {m.kind.value} layer; kohya LoRA holds Linear and Conv2d "
                             "layers only")
    extra = list(adapter.modules_to_save) + list(adapter.extra_tensors)
    if extra:
        _refuse(adapter, f"{len(extra)} tensors that are not LoRA factors (modules_to_save/extra, e.g. "
                         f"{extra[0]!r}) have no place in a kohya file")


def _alpha_tensor(value: float, dtype: str) -> HostTensor:
    """A scalar holding exactly ``value``: in ``dtype`` if it can (a float dtype), else in
    float32/float64 (numpy, no torch)."""
    for d in (dtype, "F32", "F64"):
        if d not in FLOAT_DTYPES:
            continue
        t = host_tensor(value, d)
        if float(float_values(t)) == value:
            return t
    return host_tensor(value, "F64")


def write(adapter: Adapter, out: Path, overwrite: bool = False) -> Path:
    """Write one kohya .safetensors file (atomically). Factors are copied raw, byte for byte."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; a kohya LoRA is one file: give a path ending in .safetensors")
    check_writable(adapter)
    layout = layout_of(adapter)
    sgm = layout.sgm_unet
    te_prefix = layout.te_prefix or default_te_prefix(adapter.components)
    prefix_of = {"unet": "lora_unet_", "text_encoder": te_prefix, "text_encoder_2": "lora_te2_",
                 "text_encoder_3": "lora_te3_", "transformer": "lora_transformer_"}
    no_alpha, alpha_dtype, alpha_shape = layout.no_alpha, layout.alpha_dtype, layout.alpha_shape
    up_attn = {int(n.split(".")[2]) for n in adapter.modules
               if n.startswith("unet.up_blocks.") and ".attentions." in n}
    if not any(".attentions." in n for n in adapter.modules if n.startswith("unet.")):
        up_attn = None  # no attention modules at all: assume SDXL's up blocks

    # Raw alpha tensors of the kohya file the adapter was read from, when it is still there.
    source: SafetensorsFile | None = None
    if adapter.format == NAME and adapter.path is not None and Path(adapter.path).is_file():
        try:
            source = SafetensorsFile(adapter.path)
        except InputError:
            source = None

    items: list[tuple[str, TensorSource]] = []
    written: dict[str, str] = {}
    flux = layout.transformer_names != "onetrainer" and sdnames.is_flux(
        (n.split(".", 1)[1], m.in_features) for n, m in adapter.modules.items()
        if n.startswith("transformer.") and m.kind == LayerKind.LINEAR)
    groups: dict[str, list[LoraModule | None]] = {}
    for name, m in adapter.modules.items():
        comp, path = name.split(".", 1)
        bfl = sdnames.flux_to_bfl(path) if comp == "transformer" and flux else None
        if bfl is not None:  # sd-scripts' names; the parts of a BFL module are fused
            groups.setdefault(bfl[0], [None] * len(sdnames.flux_from_bfl(bfl[0])))[bfl[1]] = m
            continue
        if comp == "unet" and sgm:
            path = sdnames.diffusers_to_sgm(path, up_attn)
        elif comp.startswith("text_encoder"):
            path = sdnames.canonical_text_encoder_path(path)  # lora_te_text_model_…, whatever transformers made it
        lora_name = ("lora_unet_" if comp == "transformer" and flux else prefix_of[comp]) + sdnames.to_kohya(path)
        if lora_name in written:
            raise OutputError(f"{out}: modules {written[lora_name]!r} and {name!r} both become {lora_name!r} "
                              "in kohya naming")
        written[lora_name] = name
        items.append((f"{lora_name}.lora_down.weight", m.lora_A))
        items.append((f"{lora_name}.lora_up.weight", m.lora_B))
        alpha = m.alpha * math.sqrt(m.rank) if m.use_rslora else m.alpha  # kohya's scale is alpha/r
        if (no_alpha == "all" or name in no_alpha) and alpha == m.rank:
            continue
        ref = _source_alpha(source, m, alpha)
        if ref is None:
            ref = _alpha_tensor(alpha, alpha_dtype or dtype_of(m.lora_A)).reshape(alpha_shape)
        items.append((f"{lora_name}.alpha", ref))
    records = {}
    for bfl, parts in groups.items():
        lora_name = "lora_unet_" + sdnames.to_kohya(bfl)
        names = [m.name for m in parts if m is not None]
        if lora_name in written:
            raise OutputError(f"{out}: modules {written[lora_name]!r} and {names[0]!r} both become {lora_name!r}")
        written[lora_name] = names[0]
        a, b, alpha, records[lora_name] = sdnames.flux_fuse(bfl, parts, fold_final=adapter.format != NAME)
        items += [(f"{lora_name}.lora_down.weight", a), (f"{lora_name}.lora_up.weight", b)]
        if not ((no_alpha == "all" or set(names) <= set(no_alpha)) and alpha == shape_of(a)[0]):
            ref = _source_alpha(source, next(m for m in parts if m is not None), alpha)
            if ref is None:
                ref = _alpha_tensor(alpha, alpha_dtype or dtype_of(a)).reshape(alpha_shape)
            items.append((f"{lora_name}.alpha", ref))

    metadata = {k: v for k, v in adapter.metadata.items() if k not in (LAYOUT_KEY, DIFFUSERS_METADATA_KEY, FUSED_KEY)}
    records = {k: v for k, v in records.items() if v}
    if records:  # the parts' ranks and alphas, so that reading gives them back
        metadata[FUSED_KEY] = json.dumps(records, sort_keys=True, separators=(",", ":"))
    if layout.no_format_metadata:
        metadata.pop("format", None)
    with atomic_path(out, overwrite=overwrite) as tmp:
        write_safetensors(tmp, sorted(items, key=lambda kv: kv[0]), metadata or None)
    return out


def _source_alpha(source: SafetensorsFile | None, m: LoraModule, alpha: float) -> TensorRef | None:
    key = m.source_keys.get("alpha")
    if source is None or key is None or key not in source:
        return None
    ref = source.ref(key)
    if math.prod(ref.shape) != 1 or float(float_values(ref).reshape(-1)[0]) != alpha:
        return None
    return ref


FORMAT = Format(
    name=NAME,
    title="kohya",
    read=read,
    write=write,
    sniff_keys=sniff_keys,
    sniff_order=0,
    key_example="lora_unet_….lora_down.weight",
    writes_directory=False,
    writes_file=True,
    check_writable=check_writable,
)
