"""PEFT adapters: a directory with adapter_config.json and adapter_model.safetensors.

Key layout written by PEFT's ``save_pretrained`` (adapter name removed):
  base_model.model.<module>.lora_A.weight / .lora_B.weight   Linear, Conv1D, Conv2d
  base_model.model.<module>.lora_B.bias                       lora_bias=True
  base_model.model.<module>.lora_magnitude_vector             DoRA (older PEFT: ...vector.weight)
  base_model.model.<module>.lora_embedding_A / _B             Embedding
  base_model.model.<module>.weight                            modules_to_save (replacement)
  base_model.model.<module>.base_layer.weight                 embedding layers saved beside
                                                              (save_embedding_layers)
  base_model.model.<module>.hada_w1_a / …                     peft_type LOHA (tuners/loha)
  base_model.model.<module>.lokr_w1 / lokr_w2_a / …           peft_type LOKR (tuners/lokr)
A multi-component adapter (diffusers pipelines: unet + text_encoder) is a directory holding one
PEFT directory per component; module names then carry the component as prefix.

adapter_config.json becomes a typed ``LoraConfig`` (``formats/loraconfig.py``; one per component,
``ComponentConfigs``, for a multi-component adapter); the writer keeps every field it does not set.

PEFT's LyCORIS types (issue 15) are read as the kinds ``kinds/loha.py`` and ``kinds/lokr.py``; their
config (``LycorisConfig``) names alpha ``alpha``, not ``lora_alpha``. PEFT stores the factors in
LyCORIS's orientation (hada_w1_a (out, r), hada_w1_b (r, in); Tucker hada_t (r, r, kh, kw) with
hada_w_a (r, out), hada_w_b (r, in); lokr_w1 (a, b), lokr_w2 (c, d): ΔW = W1 ⊗ W2). Its scale is
alpha / r for both (``update_layer``), with r the config's (``r``/``rank_pattern``): for LoHa that is
the factors' rank, for LoKr it holds whatever the factors are (full W1 and W2 included), where
LyCORIS's forward pass uses 1 (``LokrModule.peft_rank``). These adapters are merged, inspected and
converted (to LoRA); PEFT LoHa/LoKr files are not written (``convert`` makes them LoRA first).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LayerKind, LoraModule, TensorSource, module_of, shape_of
from loratool.boundary import read_json
from loratool.text import number
from loratool.errors import FormatError, InputError, UsageError
from loratool.formats import kohya
from loratool.formats.base import BAD_FACTOR, MISSING_FACTOR, RANK_MISMATCH, Format, ReadProblem, pair_problem
from loratool.formats.loraconfig import ComponentConfigs, LoraConfig, _number_problem, check_config_fields, selects
from loratool.patterns import key_table
from loratool.safetensors_io import (
    PICKLE_SUFFIXES,
    SafetensorsFile,
    atomic_dir,
    refuse_pickle,
    write_safetensors,
)

NAME = "peft"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_B.bias": "lora_B_bias",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
}
# PEFT's LyCORIS tensors (LoHaLayer/LoKrLayer.adapter_layer_names), saved without ".weight"
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LYCORIS_TYPES = {"LOHA": ("LoHa", LOHA_ROLES), "LOKR": ("LoKr", LOKR_ROLES)}
_SUFFIXES.update({f".{role}": role for role in (*LOHA_ROLES, *LOKR_ROLES)})
_LYCORIS_NAMED = re.compile(r"\.(" + "|".join((*LOHA_ROLES, *LOKR_ROLES)) + r")\.[^.]+$")
# LoHaConfig/LoKrConfig fields a LoraConfig has no use for (dropped when one is written as LoRA)
_LYCORIS_FIELDS = ("alpha", "rank_dropout", "module_dropout", "init_weights", "use_effective_conv2d",
                   "decompose_both", "decompose_factor", "rank_dropout_scale")


def sniff_keys(keys: list[str]) -> bool:
    return any(k.startswith(PREFIX) and (".lora_A." in k or ".lora_embedding_A" in k
                                         or k.endswith((".hada_w1_a", ".lokr_w1", ".lokr_w1_a"))) for k in keys)


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """PEFT's rule (peft/utils/other.py) for rank_pattern/alpha_pattern: the first key, taken as a
    regex, that matches the end of the module name at a dot boundary; the name itself when none
    does. Evaluated with bounded cost (``loratool.patterns``): module-name keys without a regex
    engine, other keys by RE2; the table of keys is built once and cached."""
    key = key_table(tuple(pattern_keys)).first(key_to_match)
    return key_to_match if key is None else key


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _strip_adapter_name(key: str) -> str:
    """Tolerate files saved with the adapter name left in (``…lora_A.default.weight``)."""
    key = re.sub(r"\.(lora_A|lora_B)\.(?!weight$|bias$)[^.]+\.(weight|bias)$", r".\1.\2", key)
    key = re.sub(r"\.lora_magnitude_vector\.(?!weight$)[^.]+(\.weight)?$", ".lora_magnitude_vector", key)
    key = _LYCORIS_NAMED.sub(r".\1", key)
    return re.sub(r"\.(lora_embedding_A|lora_embedding_B)\.[^.]+$", r".\1", key)


@dataclass(eq=False)
class LycorisConfig(LoraConfig):
    """A LoHaConfig or LoKrConfig (peft_type LOHA/LOKR): a ``LoraConfig`` whose alpha is the field
    ``alpha`` (PEFT's default 8, like lora_alpha's), with no rsLoRA, DoRA or fan_in_fan_out."""

    @property
    def peft_type(self) -> str:
        return str(self.fields.get("peft_type")).upper()

    @property
    def lora_alpha(self) -> float | None:
        return float(self.fields["alpha"]) if "alpha" in self.fields else None

    @property
    def use_rslora(self) -> bool:
        return False

    @property
    def use_dora(self) -> bool:
        return False

    @property
    def fan_in_fan_out(self) -> bool:
        return False

    def lora_fields(self) -> dict[str, Any]:
        """The fields a LoraConfig of the same modules keeps (what a LoRA written from it starts from)."""
        return {k: v for k, v in self.fields.items() if k not in _LYCORIS_FIELDS and k != "peft_type"}

    def composed(self, same_modules: bool) -> LoraConfig:
        return LoraConfig(self.lora_fields()).composed(same_modules)


def read_config(path: Path) -> LoraConfig:
    """The adapter_config.json of a PEFT directory, read within bounds (a regular file, size,
    depth, digits, valid Unicode: ``loratool.boundary.read_json``) and type-checked field by
    field before any value is used. peft_type LORA gives a ``LoraConfig``, LOHA and LOKR a
    ``LycorisConfig``; any other type is refused with its name."""
    cfg_path = path / CONFIG
    config = read_json(cfg_path, what="adapter config")
    if not isinstance(config, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object, found a JSON {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type is not None and not isinstance(peft_type, str):
        raise FormatError(f"{cfg_path}: peft_type must be a string such as \"LORA\", found {peft_type!r}")
    peft_type = str(peft_type).upper()
    if peft_type != "LORA" and peft_type not in LYCORIS_TYPES:
        raise FormatError(f"{cfg_path}: peft_type is {peft_type[:40]!r}, not LORA, LOHA or LOKR; loratool reads "
                          "PEFT's LoRA, LoHa and LoKr adapters")
    check_config_fields(config, str(cfg_path))
    if peft_type == "LORA":
        return LoraConfig(config, cfg_path)
    why = _number_problem(config["alpha"], False) if "alpha" in config else None
    if why:
        raise FormatError(f"{cfg_path}: alpha {why}")
    return LycorisConfig(config, cfg_path)


def _weights_file(path: Path) -> Path:
    st = path / WEIGHTS
    if st.exists():
        return st
    if os.path.lexists(st):
        raise InputError(f"{st}: broken symbolic link (its target is missing, or links loop)")
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise refuse_pickle(pickles[0])
    raise InputError(f"{path}: config without weights: {CONFIG} is here but {WEIGHTS} is missing")


def read(path: Path, component: str = "") -> Adapter:
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / CONFIG).exists():
        subdirs = [p for p in sorted(path.iterdir()) if p.is_dir() and (p / CONFIG).exists()]
        if subdirs:
            return _read_multi(path, subdirs)
        raise InputError(f"{path}: not a PEFT adapter: {CONFIG} is missing")
    config = read_config(path)
    weights = _weights_file(path)
    st = SafetensorsFile(weights)
    prefix = f"{component}." if component else ""

    roles: dict[str, dict[str, TensorSource]] = {}
    keys_of: dict[str, dict[str, str]] = {}
    others: dict[str, TensorSource] = {}
    for key in st.keys():
        k = _strip_adapter_name(key)
        k = k[len(PREFIX):] if k.startswith(PREFIX) else k
        split = _split_key(k)
        if split is None:
            others[k] = st.ref(key)
            continue
        module, role = split
        roles.setdefault(module, {})[role] = st.ref(key)
        keys_of.setdefault(module, {})[role] = key

    modules: dict[str, LoraModule] = {}
    problems: list[ReadProblem] = []
    lycoris_type = config.peft_type if isinstance(config, LycorisConfig) else None
    for module, parts in roles.items():
        if lycoris_type or any(r in _LYCORIS_ROLE_SET for r in parts):
            m = _lycoris_module(config, lycoris_type, prefix + module, module, parts, keys_of[module],
                                f"{weights}: module {module!r}", problems)
            if m is not None:
                modules[m.name] = m
            continue
        emb = "emb_A" in parts or "emb_B" in parts
        a = parts.get("emb_A" if emb else "lora_A")
        b = parts.get("emb_B" if emb else "lora_B")
        label = f"{weights}: module {module!r}"
        problem = pair_problem(a, b, label, module, ("lora_embedding_A", "lora_embedding_B") if emb else
                               ("lora_A", "lora_B"), repr(sorted(keys_of[module].values())[0]), emb,
                               missing=("lora_A", "lora_B"))
        if problem:
            problems.append(problem)
            continue
        sa = shape_of(a)
        if emb:
            kind = LayerKind.EMBEDDING
        elif len(sa) == 4:
            kind = LayerKind.CONV2D
        elif config.fan_in_fan_out:
            kind = LayerKind.CONV1D
        else:
            kind = LayerKind.LINEAR
        r, alpha = config.rank_alpha(module)
        modules[prefix + module] = module_of(  # LoRA, or DoRA with a magnitude vector
            name=prefix + module,
            kind=kind,
            lora_A=a,
            lora_B=b,
            alpha=alpha,
            use_rslora=config.use_rslora,
            magnitude=parts.get("magnitude"),
            lora_B_bias=parts.get("lora_B_bias"),
            source_keys=keys_of[module],
            config_rank=r,
            config_alpha=alpha,
        )

    mts_patterns = config.saved_modules  # the config's, plus the head of its task type
    modules_to_save: dict[str, TensorSource] = {}
    extra: dict[str, TensorSource] = {}
    for k, ref in others.items():
        k2 = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)
        # PEFT's rule (_set_trainable): a module whose name ends with the entry (no dot boundary)
        # is saved whole, so a tensor is saved when its module or one above it matches
        # (RoBERTa's head ``classifier`` saves ``classifier.dense.weight``)
        owners = k2.split(".")[:-1]
        paths = [".".join(owners[:i]) for i in range(1, len(owners) + 1)]
        if any(m.endswith(p) for m in paths for p in mts_patterns) and ".base_layer." not in k2:
            modules_to_save[prefix + k2] = ref
        else:
            extra[prefix + k2] = ref

    return Adapter(
        format=NAME,
        modules=dict(sorted(modules.items())),
        path=path,
        files=[path / CONFIG, weights],
        base_model=config.base_model_name_or_path,
        base_revision=config.revision,
        task_type=config.task_type,
        config=config,
        metadata=dict(st.metadata),
        modules_to_save=modules_to_save,
        extra_tensors=extra,
        problems=problems,
    )


_LYCORIS_ROLE_SET = frozenset((*LOHA_ROLES, *LOKR_ROLES))


def _lycoris_module(config: LoraConfig, peft_type: str | None, name: str, module: str,
                    parts: dict[str, TensorSource], keys: dict[str, str], label: str, problems: list[ReadProblem]):
    """A LoHa or LoKr module of a PEFT LOHA/LOKR adapter (or None, with the problem added): its
    tensors by role, the kind from their shapes, rank and alpha from the config (PEFT's scale
    alpha / r)."""
    from loratool import kinds

    found = sorted(parts)
    algo = "LOHA" if any(r in LOHA_ROLES for r in parts) else "LOKR" if any(r in LOKR_ROLES for r in parts) else None
    if peft_type is None or algo != peft_type:
        what = f"{LYCORIS_TYPES[algo][0]} tensors ({', '.join(found)})" if algo else f"LoRA tensors ({', '.join(found)})"
        problems.append(ReadProblem(BAD_FACTOR, f"{label}: {what} in an adapter whose {CONFIG} says peft_type "
                                    f"{peft_type or 'LORA'}; PEFT would not load them", module))
        return None
    title, own = LYCORIS_TYPES[algo]
    extra = [r for r in found if r not in own]
    if extra:
        problems.append(ReadProblem(BAD_FACTOR, f"{label}: {', '.join(extra)} do not belong to a PEFT {title} module "
                                    f"(found {', '.join(found)})", module))
        return None
    r, alpha = config.rank_alpha(module)
    kind = LayerKind.CONV2D if any(len(shape_of(t)) == 4 for t in parts.values()) else LayerKind.LINEAR
    common = dict(name=name, kind=kind, alpha=alpha, config_rank=r, config_alpha=alpha, source_keys=dict(keys))
    if algo == "LOHA":
        missing = [x for x in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if x not in parts]
        if missing:
            problems.append(ReadProblem(MISSING_FACTOR, f"{label}: PEFT LoHa without {', '.join(missing)} (found "
                                        f"{', '.join(found)})", module))
            return None
        return kinds.LohaModule(**common, **parts)
    m = kinds.LokrModule(**common, peft_rank=r, **parts)  # PEFT: alpha / r, whatever the factors are
    why = [p for p in m.structure_problems() if p.check in (RANK_MISMATCH, MISSING_FACTOR)]
    if why:
        problems.append(ReadProblem(why[0].check, f"{label}: {why[0].message}", module))
        return None
    return m


def _read_multi(path: Path, subdirs: list[Path]) -> Adapter:
    parts = [read(d, component=d.name) for d in subdirs]
    first = parts[0]
    adapter = Adapter(
        format=NAME,
        modules={},
        path=path,
        base_model=first.base_model,
        base_revision=first.base_revision,
        task_type=first.task_type,
        config=ComponentConfigs({d.name: p.config for d, p in zip(subdirs, parts)}),
        metadata=first.metadata,
        components=tuple(d.name for d in subdirs),
    )
    for p in parts:
        adapter.modules.update(p.modules)
        adapter.modules_to_save.update(p.modules_to_save)
        adapter.extra_tensors.update(p.extra_tensors)
        adapter.files.extend(p.files)
        adapter.problems.extend(p.problems)
    return adapter


# -- writing ------------------------------------------------------------------------------------

def build_pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """rank_pattern/alpha_pattern entries, keyed by full module name, such that PEFT's matcher
    (first key, in order, that matches the end of a name at a dot boundary) gives every module of
    ``values`` its own value: keys longest first, so that a module's own key is tried before a
    shorter key that is a dot-suffix of it (``model.layers.0.mlp`` inside
    ``vision.model.layers.0.mlp``), plus explicit entries for default-valued modules that such a
    shorter key would otherwise catch."""
    pattern = {n: v for n, v in values.items() if v != default}
    while True:
        caught = {n: v for n, v in values.items()
                  if n not in pattern and get_pattern_key(list(pattern), n) in pattern}
        if not caught:
            break
        pattern.update(caught)
    ordered = dict(sorted(pattern.items(), key=lambda kv: (-len(kv[0]), kv[0])))
    for n, v in values.items():  # what PEFT will compute, module by module
        got = ordered.get(get_pattern_key(list(ordered), n), default)
        if got != v:  # pragma: no cover - a bug of ours, never a user's input
            raise FormatError(f"internal: pattern for module {n!r} gives {got!r}, expected {v!r}")
    return ordered


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def build_config(adapter: Adapter, modules: dict[str, LoraModule], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """An adapter_config.json for ``modules``: the most common rank/alpha as r/lora_alpha, the rest
    as rank_pattern/alpha_pattern keyed by full module name (PEFT's matcher anchors a pattern at a
    dot boundary and the end of the name, so a full name matches that module only)."""
    config: dict[str, Any] = dict(base or {})
    for flag, on in (("use_rslora", [m.use_rslora for m in modules.values()]),
                     ("use_dora", [m.use_dora for m in modules.values()])):
        if any(on) and not all(on):
            example = next(n for n, x in zip(modules, on) if not x)
            raise FormatError(f"{adapter.path or 'adapter'}: {flag} is set for some modules but not for others "
                              f"(e.g. {example!r}); a PEFT config applies it to every module")
    ranks = {n: m.rank for n, m in modules.items()}
    alphas = {n: m.alpha for n, m in modules.items()}
    r = _most_common(ranks.values()) if ranks else 8
    alpha = _most_common(alphas.values()) if alphas else 8
    old_targets = config.get("target_modules")
    config.update(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": number(alpha),
            "rank_pattern": build_pattern(ranks, r),
            "alpha_pattern": {n: number(v) for n, v in build_pattern(alphas, alpha).items()},
            "use_rslora": any(m.use_rslora for m in modules.values()),
            "use_dora": any(m.use_dora for m in modules.values()),
            "lora_bias": any(m.lora_B_bias is not None for m in modules.values()),
            "fan_in_fan_out": any(m.kind is LayerKind.CONV1D for m in modules.values()),
            "base_model_name_or_path": adapter.base_model,
            "revision": adapter.base_revision,
            "task_type": adapter.task_type,
            "inference_mode": True,
        }
    )
    names = sorted(modules)
    if not _targets_cover(old_targets, names):
        config["target_modules"] = names
    config.setdefault("bias", "none")
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("init_lora_weights", True)
    mts = sorted({k.rsplit(".", 1)[0] for k in adapter.modules_to_save})
    config["modules_to_save"] = mts or config.get("modules_to_save") or None
    return config


def _targets_cover(targets, names: list[str]) -> bool:
    """Whether a config's target_modules selects exactly ``names`` (PEFT's rule, ``selects``), as
    far as we can tell without the base: each name must be selected and every full name listed
    exists."""
    if not targets or not names or targets == "all-linear":
        return False
    if not all(selects(targets, n) for n in names):
        return False
    return isinstance(targets, str) or all(t in names for t in targets if "." in t)


def peft_tensors(adapter: Adapter, modules: dict[str, LoraModule], component: str = ""):
    strip = f"{component}." if component else ""

    def key(name: str) -> str:
        return PREFIX + (name[len(strip):] if strip and name.startswith(strip) else name)

    for name, m in modules.items():
        if m.kind is LayerKind.EMBEDDING:
            yield key(name) + ".lora_embedding_A", m.lora_A
            yield key(name) + ".lora_embedding_B", m.lora_B
        else:
            yield key(name) + ".lora_A.weight", m.lora_A
            yield key(name) + ".lora_B.weight", m.lora_B
        if m.lora_B_bias is not None:
            yield key(name) + ".lora_B.bias", m.lora_B_bias
        if m.magnitude is not None:
            yield key(name) + ".lora_magnitude_vector", m.magnitude
    for name, t in adapter.modules_to_save.items():
        if not component or name.startswith(strip):
            yield key(name), t
    for name, t in adapter.extra_tensors.items():
        if not component or name.startswith(strip):
            yield key(name), t


def components(adapter: Adapter) -> dict[str, dict[str, LoraModule]]:
    """Group modules by component for multi-component (Stable Diffusion) adapters; "" otherwise."""
    if not adapter.components:
        return {"": adapter.modules}
    groups: dict[str, dict[str, LoraModule]] = {c: {} for c in adapter.components}
    for name, m in adapter.modules.items():
        comp = name.split(".", 1)[0]
        if comp not in groups:
            raise FormatError(f"module {name!r} belongs to no component of {list(adapter.components)}")
        groups[comp][name] = m
    return {c: mods for c, mods in groups.items() if mods}


def check_writable(adapter: Adapter) -> None:
    """Refuse (one line) an adapter with modules a PEFT LoRA cannot hold (LoHa, LoKr, …): ``convert``
    makes them LoRA first."""
    for m in adapter.modules.values():
        if m.module_kind not in ("lora", "dora"):
            where = f"{adapter.path}: " if adapter.path else ""
            raise UsageError(f"{where}cannot write as PEFT LoRA: module {m.name!r} is {m.algorithm}; `loratool "
                             "convert --to peft` writes it as a LoRA (exactly, or at --rank/--energy)")


def write(adapter: Adapter, out: Path, overwrite: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Write a PEFT directory (atomically). Tensors keep their dtype; raw tensors are copied
    byte for byte."""
    check_writable(adapter)
    groups = components(adapter)
    own = adapter.config if adapter.format == NAME else None  # another format's config is not PEFT's to keep
    base_config = own.fields if isinstance(own, LoraConfig) else {}
    if isinstance(own, LycorisConfig):  # a LoHa/LoKr adapter written as LoRA: LoRA fields only
        base_config = own.lora_fields()
    md = {"format": "pt"}
    if "loratool.manifest" in adapter.metadata:  # the output's own manifest (loratool.manifest)
        md["loratool.manifest"] = adapter.metadata["loratool.manifest"]
    md.update(metadata or {})
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for comp, modules in groups.items():
            d = tmp / comp if comp else tmp
            d.mkdir(exist_ok=True)
            cfg_base = base_config
            if comp and isinstance(own, ComponentConfigs):
                cfg_base = own.components[comp].fields if comp in own.components else {}
            config = build_config(adapter, modules, cfg_base)
            if comp:
                strip = comp + "."
                config["rank_pattern"] = {k[len(strip):]: v for k, v in config["rank_pattern"].items()}
                config["alpha_pattern"] = {k[len(strip):]: v for k, v in config["alpha_pattern"].items()}
                if isinstance(config.get("target_modules"), list):
                    config["target_modules"] = [t[len(strip):] if t.startswith(strip) else t for t in config["target_modules"]]
                if config.get("modules_to_save"):
                    config["modules_to_save"] = [t[len(strip):] if t.startswith(strip) else t for t in config["modules_to_save"]]
            (d / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            write_safetensors(d / WEIGHTS, list(peft_tensors(adapter, modules, comp)), md)
    return out


def write_converted(adapter: Adapter, out: Path, overwrite: bool = False) -> Path:
    """``write`` for ``convert``: this writer keeps only the metadata it is given, so pass the
    source's (kohya's ss_* notes and layout) for a later conversion back to restore them."""
    return write(adapter, out, overwrite=overwrite, metadata=kohya.carry_metadata(adapter))


FORMAT = Format(
    name=NAME,
    title="PEFT",
    read=read,
    write=write,
    write_converted=write_converted,
    sniff_keys=sniff_keys,
    sniff_order=2,  # kohya and diffusers keys are more specific
    key_example=f"{PREFIX}….lora_A.weight, with {CONFIG} beside it",
    writes_directory=True,
    writes_file=False,
    marker=CONFIG,
    component_dirs=True,  # multi-component: one PEFT directory per model component
    needs_marker=(f"PEFT weights without their config: {CONFIG} is missing next to them, so rank patterns "
                  "and alpha are unknown; put the config beside the file"),
    peft_loadable=True,
    library_name="peft",
)
