"""diffusers LoRA files: ``pytorch_lora_weights.safetensors`` (or any one .safetensors file).

Keys carry the pipeline component as prefix (``unet.``, ``text_encoder.``, ``text_encoder_2.``,
``transformer.``) followed by the module's path in that component; a model's own save
(``ModelMixin.save_lora_adapter``, once ``unet.save_attn_procs``) has no prefix. Detection: a
component prefix with any factor name below, diffusers' own older factor names with or without
one, or PEFT's names without a prefix plus ``lora_adapter_metadata``. Three generations exist:

  PEFT-style (diffusers >= 0.22)    unet.<module>.lora_A.weight / .lora_B.weight
                                    (+ .lora_magnitude_vector, .lora_B.bias, lora_embedding_A/B)
  LoRACompatibleLinear (0.19-0.21)  unet.<module>.lora.down.weight / .lora.up.weight
                                    text_encoder.<module>.lora_linear_layer.down.weight / .up.weight
  attention processors (<= 0.18)    unet.<…>.attn1.processor.to_q_lora.down.weight / .up.weight
                                    (to_out_lora means to_out.0 in the UNet, out_proj in CLIP;
                                    diffusers' UNET_TO_DIFFUSERS / DIFFUSERS_OLD_TO_PEFT tables)

All are read; the PEFT-style one is written.

Alpha. diffusers' training scripts save no alpha: without more information its loader builds a
``LoraConfig`` with lora_alpha = r per module (scale 1; utils/peft_utils.py ``get_peft_kwargs``).
Since diffusers 0.34 the file may carry the LoraConfig of each component in the safetensors
metadata: key ``lora_adapter_metadata``, a JSON object whose keys are ``<component>.<LoraConfig
field>`` (``"unet.r"``, ``"unet.lora_alpha"``, ``"unet.alpha_pattern"``; loaders/lora_base.py
``_pack_dict_with_prefix``); the loader strips the prefix and calls ``LoraConfig(**fields)``
instead of guessing. A model-level save (``ModelMixin.save_lora_adapter``) has no prefixes, in
keys or metadata. We read alpha from that metadata (one ``LoraConfig`` per component: the
adapter's config, ``ComponentConfigs``), else from ``<module>.alpha`` tensors where a converter
left them, else alpha = r; and we always write the metadata (r, lora_alpha,
rank_pattern, alpha_pattern, target_modules for every component), so diffusers applies exactly
our scale.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LayerKind, LoraModule, float_values, module_of
from loratool.text import number
from loratool.errors import FormatError, InputError, OutputError, UsageError
from loratool.formats import kohya, sdnames
from loratool.formats.base import BAD_FACTOR, Format, ReadProblem, pair_problem
from loratool.formats.loraconfig import ComponentConfigs, LoraConfig, check_config_fields
from loratool.formats.peft import PREFIX as PEFT_PREFIX, build_pattern
from loratool.boundary import parse_json
from loratool.safetensors_io import SafetensorsFile, atomic_dir, atomic_path, write_safetensors

NAME = "diffusers"
WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "transformer_2", "prior")

# suffix -> role, tried in this order (longest first where one ends another)
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "B_bias"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_embedding_A", "emb_A"),
    (".lora_embedding_B", "emb_B"),
    (".lora_linear_layer.down.weight", "A"),
    (".lora_linear_layer.up.weight", "B"),
    (".lora.down.weight", "A"),
    (".lora.up.weight", "B"),
    ("_lora.down.weight", "A"),  # attention processors: to_q_lora.down.weight
    ("_lora.up.weight", "B"),
    (".alpha", "alpha"),
)
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora.down.weight", "_lora.down.weight", ".lora_linear_layer.down.weight",
                    ".lora_embedding_A")
_ROLE_NAMES = {"A": "lora_A", "B": "lora_B", "emb_A": "lora_A", "emb_B": "lora_B", "B_bias": "lora_B_bias"}
# old attention-processor names: last word -> (UNet name, text encoder name)
_PROCESSOR = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
              "to_out": ("to_out.0", "out_proj")}


# factor names only diffusers writes, so they say diffusers with a component prefix or without
# one (``unet.save_attn_procs`` saved the UNet's modules bare: ``down_blocks.….processor.to_q_lora.down.weight``)
_OWN_SUFFIXES = ("_lora.down.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")


def sniff_keys(keys: list[str]) -> bool:
    return any((k.split(".", 1)[0] in COMPONENTS and k.endswith(_FACTOR_SUFFIXES)) or k.endswith(_OWN_SUFFIXES)
               for k in keys)


def sniff_metadata(keys: list[str], metadata: dict[str, str]) -> bool:
    """A model's LoRA saved by diffusers (``ModelMixin.save_lora_adapter``): PEFT's factor names
    with no prefix, the LoraConfig in ``lora_adapter_metadata``."""
    return METADATA_KEY in metadata and any(k.endswith(_FACTOR_SUFFIXES) and not k.startswith(PEFT_PREFIX)
                                            for k in keys)


def _split(key: str) -> tuple[str, str, str] | None:
    """key -> (component or "", module path inside it, role)."""
    head, _, rest = key.partition(".")
    comp, rest = (head, rest) if head in COMPONENTS and rest else ("", key)
    for suffix, role in _SUFFIXES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            processor = suffix.startswith("_lora.")
            module = module.replace(".processor.", ".")
            if processor:
                head_path, _, last = module.rpartition(".")
                names = _PROCESSOR.get(last)
                if names is None:
                    return None
                last = names[1] if comp.startswith("text_encoder") else names[0]
                module = f"{head_path}.{last}" if head_path else last
            return comp, module, role
    return None


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    st = path / WEIGHTS
    if st.exists():
        return st
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    more = f" and {len(files)} other .safetensors files; pass the file" if files else ""
    raise InputError(f"{path}: no {WEIGHTS} here{more}")


def parse_metadata(md: dict[str, str], where: Path) -> dict[str, LoraConfig]:
    """``lora_adapter_metadata`` -> {component: LoraConfig} ("" for unprefixed fields)."""
    raw = md.get(METADATA_KEY)
    if not raw:
        return {}
    flat = parse_json(raw, f"{where}: metadata {METADATA_KEY!r}", "a LoraConfig")
    if not isinstance(flat, dict):
        raise FormatError(f"{where}: metadata {METADATA_KEY!r} must be a JSON object, found {type(flat).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        if comp in COMPONENTS and field:
            out.setdefault(comp, {})[field] = value
        else:
            out.setdefault("", {})[key] = value
    for comp, cfg in out.items():
        check_config_fields(cfg, f"{where}: metadata {METADATA_KEY!r}" + (f" ({comp})" if comp else ""))
    return {comp: LoraConfig(cfg, where) for comp, cfg in out.items()}


def read(path: Path) -> Adapter:
    path = Path(path)
    weights = _weights_file(path)
    st = SafetensorsFile(weights)
    configs = parse_metadata(st.metadata, weights)

    roles: dict[tuple[str, str], dict[str, str]] = {}
    problems: list[ReadProblem] = []
    for key in st.keys():
        split = _split(key)
        if split is None or not split[1]:
            problems.append(ReadProblem(BAD_FACTOR, f"{weights}: tensor {key!r} is not a LoRA factor (expected "
                                        "<component>.<module>.lora_A.weight / .lora_B.weight, or the older "
                                        ".lora.down/.lora.up names)"))
            continue
        comp, module, role = split
        if comp.startswith("text_encoder"):
            module = sdnames.canonical_text_encoder_path(module)
        slot = roles.setdefault((comp, module), {})
        if role in slot:
            name = (comp + "." if comp else "") + module
            problems.append(ReadProblem(BAD_FACTOR, f"{weights}: tensors {slot[role]!r} and {key!r} are the same "
                                        f"factor of module {name!r}", name))
            continue
        slot[role] = key

    modules: dict[str, LoraModule] = {}
    for (comp, module), keys in sorted(roles.items()):
        name = f"{comp}.{module}" if comp else module
        label = f"{weights}: module {name!r}"
        emb = "emb_A" in keys or "emb_B" in keys
        a_key, b_key = keys.get("emb_A" if emb else "A"), keys.get("emb_B" if emb else "B")
        a, b = (st.ref(k) if k is not None else None for k in (a_key, b_key))
        problem = pair_problem(a, b, label, name, ("lora_A", "lora_B"), str(sorted(keys.values())), emb)
        if problem:
            problems.append(problem)
            continue
        sa = a.shape
        cfg = configs.get(comp)
        config_rank = config_alpha = None
        use_rslora = False
        if cfg:
            config_rank, alpha = cfg.rank_alpha(module)
            config_alpha = alpha
            use_rslora = cfg.use_rslora
        elif "alpha" in keys:
            alpha = float(float_values(st.ref(keys["alpha"])).reshape(-1)[0])
        else:
            alpha = float(sa[0])  # diffusers' default: lora_alpha = r per module
        if emb:
            kind = LayerKind.EMBEDDING
        elif len(sa) == 4:
            kind = LayerKind.CONV2D
        elif cfg and cfg.fan_in_fan_out:
            kind = LayerKind.CONV1D
        else:
            kind = LayerKind.LINEAR
        source_keys = {_ROLE_NAMES.get(r, r): k for r, k in keys.items()}
        modules[name] = module_of(  # LoRA, or DoRA with a magnitude vector
            name=name,
            kind=kind,
            lora_A=a,
            lora_B=b,
            alpha=alpha,
            use_rslora=use_rslora,
            magnitude=st.ref(keys["magnitude"]) if "magnitude" in keys else None,
            lora_B_bias=st.ref(keys["B_bias"]) if "B_bias" in keys else None,
            config_rank=config_rank,
            config_alpha=config_alpha,
            source_keys=source_keys,
        )

    present = {comp for comp, _ in roles}
    components = tuple(c for c in COMPONENTS if c in present)
    if components and "" in present:
        bare = sorted(m for c, m in roles if c == "")[0]
        problems.append(ReadProblem(BAD_FACTOR, f"{weights}: module {bare!r} has no component prefix while others "
                                    f"have one ({', '.join(components)}); cannot tell which model it belongs to",
                                    bare))
        modules = {n: m for n, m in modules.items() if n.split(".", 1)[0] in components}
    return Adapter(
        format=NAME,
        modules=dict(sorted(modules.items())),
        path=path,
        files=[weights],
        config=ComponentConfigs(configs) if configs else None,
        metadata=dict(st.metadata),
        problems=problems,
        components=components,
    )


# -- writing ------------------------------------------------------------------------------------

def component_config(modules: dict[str, LoraModule], strip: str) -> dict[str, Any]:
    """The LoraConfig fields diffusers needs to rebuild these modules with their exact scale:
    the most common rank/alpha, the others as patterns keyed by full module name (PEFT anchors a
    pattern at a dot boundary and the end of the name, so a full name matches that module only).

    Text encoder names lose their leading ``text_model.``: PEFT then finds them both in a
    transformers 4 CLIPTextModel (``text_model.encoder…``) and in a transformers 5 one, whose
    modules are ``encoder…`` (the tensors keep ``text_model.`` in their keys; transformers maps
    those on load)."""
    key = sdnames.version_neutral_text_encoder_target if strip.startswith("text_encoder") else (lambda n: n)
    ranks = {key(n[len(strip):]): m.rank for n, m in modules.items()}
    alphas = {key(n[len(strip):]): m.alpha for n, m in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    cfg: dict[str, Any] = {
        "r": r,
        "lora_alpha": number(alpha),
        "rank_pattern": build_pattern(ranks, r),
        "alpha_pattern": {n: number(v) for n, v in build_pattern(alphas, alpha).items()},
        "target_modules": sorted(ranks),
    }
    # Only fields that differ from LoraConfig's defaults, so that older PEFT versions load it too.
    if any(m.use_rslora for m in modules.values()):
        cfg["use_rslora"] = True
    if any(m.use_dora for m in modules.values()):
        cfg["use_dora"] = True
    if any(m.lora_B_bias is not None for m in modules.values()):
        cfg["lora_bias"] = True
    if any(m.kind is LayerKind.CONV1D for m in modules.values()):
        cfg["fan_in_fan_out"] = True
    return cfg


def check_writable(adapter: Adapter) -> None:
    where = f"{adapter.path}: " if adapter.path else ""
    if not adapter.components:
        raise UsageError(f"{where}cannot write as diffusers: the adapter has no pipeline components (unet, "
                         "text_encoder, transformer); diffusers keys start with the component each module "
                         "belongs to, so only adapters of diffusers pipelines can be written; for one part of "
                         "a pipeline (a UNet that PEFT saved) pass --component unet (or text_encoder, ...), else "
                         "use --to peft")
    unknown = [c for c in adapter.components if c not in COMPONENTS]
    if unknown:
        raise UsageError(f"{where}cannot write as diffusers: component {unknown[0]!r} is not a diffusers "
                         f"LoRA component (known: {', '.join(COMPONENTS)})")
    orphans = [n for n in adapter.modules if n.split(".", 1)[0] not in adapter.components or "." not in n]
    if orphans:
        raise UsageError(f"{where}cannot write as diffusers: module {orphans[0]!r} belongs to no component of "
                         f"{list(adapter.components)}")
    extra = list(adapter.modules_to_save) + list(adapter.extra_tensors)
    if extra:
        raise UsageError(f"{where}cannot write as diffusers: {len(extra)} tensors that are not LoRA factors "
                         f"(modules_to_save/extra, e.g. {extra[0]!r}) have no place in a diffusers LoRA file")
    rslora = {m.use_rslora for m in adapter.modules.values()}
    if len(rslora) > 1:
        raise UsageError(f"{where}cannot write as diffusers: some modules use rsLoRA scaling and some do not; "
                         "one LoraConfig per component cannot say that")


def tensors(adapter: Adapter):
    for name, m in adapter.modules.items():
        comp, _, path = name.partition(".")
        if comp.startswith("text_encoder"):  # checkpoint naming (text_model.…) loads under transformers 4 and 5
            name = f"{comp}.{sdnames.canonical_text_encoder_path(path)}"
        if m.kind is LayerKind.EMBEDDING:
            yield f"{name}.lora_embedding_A", m.lora_A
            yield f"{name}.lora_embedding_B", m.lora_B
        else:
            yield f"{name}.lora_A.weight", m.lora_A
            yield f"{name}.lora_B.weight", m.lora_B
        if m.lora_B_bias is not None:
            yield f"{name}.lora_B.bias", m.lora_B_bias
        if m.magnitude is not None:
            yield f"{name}.lora_magnitude_vector", m.magnitude


def write(adapter: Adapter, out: Path, overwrite: bool = False) -> Path:
    """Write ``out/pytorch_lora_weights.safetensors`` (or the file ``out`` itself when it ends in
    .safetensors), atomically. Tensors keep their dtype; raw tensors are copied byte for byte."""
    out = Path(out)
    check_writable(adapter)
    flat: dict[str, Any] = {}
    for comp in adapter.components:
        mods = {n: m for n, m in adapter.modules.items() if n.startswith(comp + ".")}
        if mods:
            for field, value in component_config(mods, comp + ".").items():
                flat[f"{comp}.{field}"] = value
    metadata = {"format": "pt", **kohya.carry_metadata(adapter)}
    metadata[METADATA_KEY] = json.dumps(flat, indent=2, sort_keys=True)
    items = list(tensors(adapter))
    if out.suffix == ".safetensors":
        if out.is_dir():
            raise OutputError(f"{out}: is a directory; give a new file name or a directory name without .safetensors")
        with atomic_path(out, overwrite=overwrite) as tmp:
            write_safetensors(tmp, items, metadata)
    else:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_safetensors(tmp / WEIGHTS, items, metadata)
    return out


FORMAT = Format(
    name=NAME,
    title="diffusers",
    read=read,
    write=write,
    sniff_keys=sniff_keys,
    sniff_metadata=sniff_metadata,
    sniff_order=1,  # before PEFT: both name factors lora_A/lora_B
    key_example=f"unet.….lora_A.weight, or no prefix with {METADATA_KEY!r} metadata, or …processor.to_q_lora.down.weight",
    writes_directory=True,
    writes_file=True,
    marker=WEIGHTS,
    check_writable=check_writable,
)
