"""PEFT's ``LoraConfig``, typed: a PEFT directory's adapter_config.json, or the per-component
configs a diffusers file carries in its metadata (``formats/diffusers.py``).

``LoraConfig`` keeps every field as found (``fields``; writers keep the ones they do not change,
so a config round-trips byte for byte) and gives typed views of those other modules read: the
rank and alpha of each module (``r``/``lora_alpha`` unless a ``rank_pattern``/``alpha_pattern`` key
matches), and which modules PEFT creates a layer for (``target_modules``/``exclude_modules``).
Fields are checked once, when read (``check_config_fields``), before any value is used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection

from loratool.errors import FormatError
from loratool.formats.base import FormatConfig
from loratool.patterns import full_pattern, key_table, name_list

if TYPE_CHECKING:  # pragma: no cover
    from loratool.adapter import Adapter

MAX_RANK = 2**31 - 1  # far beyond any real rank; keeps alpha/r and shapes in range
DEFAULT_R = DEFAULT_ALPHA = 8  # LoraConfig's defaults
# The heads PEFT's task models add to modules_to_save whatever the config says, on creation and on
# loading (peft/peft_model.py: PeftModelForSequenceClassification and ...TokenClassification
# "classifier", "score"; PeftModelForQuestionAnswering "qa_outputs").
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _short(key: str, limit: int = 80) -> str:
    return repr(key) if len(key) <= limit else repr(key[:limit]) + "…"


def _number_problem(x, integer: bool) -> str | None:
    """Why ``x`` (a JSON value) is not a usable rank (``integer``) or alpha; None when it is.
    JSON true/false are refused although Python counts them as ints."""
    kind = "a positive integer" if integer else "a positive finite number"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return f"must be {kind}, found {type(x).__name__} {x!r}" if not isinstance(x, (dict, list)) \
            else f"must be {kind}, found a JSON {'object' if isinstance(x, dict) else 'array'}"
    try:
        value = float(x)
    except OverflowError:
        return f"must be {kind}, found an integer too large for a float"
    if not math.isfinite(value) or value <= 0:
        return f"must be {kind}, found {x!r}"
    if integer and not value.is_integer():
        return f"must be {kind}, found {x!r}"
    if integer and value > MAX_RANK:
        return f"must be {kind} no larger than {MAX_RANK}, found {x!r}"
    return None


def _is_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, str) for t in value)


def check_config_fields(config: dict[str, Any], where: str) -> None:
    """Refuse a config whose LoRA fields PEFT could not use, with one line naming the file and the
    field: types first (JSON true is no rank, 5 is no module list), then values, then every
    pattern compiled once (a key RE2 cannot run, such as a lookbehind, is refused here)."""
    def bad(field, why):
        raise FormatError(f"{where}: {field} {why}")

    def found(value) -> str:
        text = repr(value)
        return text if len(text) <= 80 else text[:80] + "…"

    for field, integer in (("r", True), ("lora_alpha", False)):
        if field in config:
            why = _number_problem(config[field], integer)
            if why:
                bad(field, why)
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(field)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            bad(field, f"must map module-name patterns to numbers, found {found(pattern)}")
        for key, value in pattern.items():
            why = _number_problem(value, integer)
            if why:
                raise FormatError(f"{where}: {field}[{_short(key)}] {why}")
        key_table(tuple(pattern), f"{where}: {field}")
    for field in ("target_modules", "exclude_modules"):
        spec = config.get(field)
        if spec is None:
            continue
        if isinstance(spec, str):
            full_pattern(spec, f"{where}: {field} {_short(spec)}")
        elif not _is_names(spec):
            bad(field, f"must be a module name, a regex string or a list of names, found {found(spec)}")
    mts = config.get("modules_to_save")
    if mts is not None and not _is_names(mts):
        bad("modules_to_save", f"must be a list of module names, found {found(mts)}")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            bad(flag, f"must be true or false, found {found(config[flag])}")
    for field in ("peft_type", "base_model_name_or_path", "revision", "task_type"):
        if config.get(field) is not None and not isinstance(config[field], str):
            bad(field, f"must be a string, found {found(config[field])}")


def selects(spec: str | list[str], name: str) -> bool:
    """PEFT's matching for target_modules/exclude_modules: a string is a regex that must match
    the whole name; a list entry must equal the name or be a dot-suffix of it."""
    if isinstance(spec, str):
        return full_pattern(spec).fullmatch(name)
    return name_list(tuple(spec)).selects(name)


class ConfigRanks:
    """The rank and alpha PEFT gives each module under a (checked) config: ``r``/``lora_alpha``
    unless a ``rank_pattern``/``alpha_pattern`` key matches. The pattern tables are looked up
    once, so module after module costs no more than the match itself."""

    def __init__(self, config: "LoraConfig"):
        self.rank_pattern, self.alpha_pattern = config.rank_pattern, config.alpha_pattern
        self.r = config.r if config.r is not None else DEFAULT_R
        self.alpha = config.lora_alpha if config.lora_alpha is not None else DEFAULT_ALPHA
        self._ranks = key_table(tuple(self.rank_pattern)) if self.rank_pattern else None
        self._alphas = key_table(tuple(self.alpha_pattern)) if self.alpha_pattern else None

    def __call__(self, name: str) -> tuple[int, float]:
        r_key = self._ranks.first(name) if self._ranks else None
        a_key = self._alphas.first(name) if self._alphas else None
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.alpha
        return int(r), float(alpha)


def _str(value) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(eq=False)
class LoraConfig(FormatConfig):
    """One LoraConfig: every field as read (``fields``, checked by ``check_config_fields``) and
    typed views of the ones loratool reads. ``file``: where it was read from, for findings."""

    fields: dict[str, Any]
    file: Path | None = None
    _ranks: ConfigRanks | None = dataclasses.field(default=None, init=False, repr=False)

    # -- typed fields (None where the config leaves a field out) ---------------------------------
    @property
    def r(self) -> int | None:
        return int(self.fields["r"]) if "r" in self.fields else None

    @property
    def lora_alpha(self) -> float | None:
        return float(self.fields["lora_alpha"]) if "lora_alpha" in self.fields else None

    @property
    def rank_pattern(self) -> dict[str, int]:
        return self.fields.get("rank_pattern") or {}

    @property
    def alpha_pattern(self) -> dict[str, float]:
        return self.fields.get("alpha_pattern") or {}

    @property
    def target_modules(self) -> str | list[str] | None:
        return self.fields.get("target_modules")

    @property
    def exclude_modules(self) -> str | list[str] | None:
        return self.fields.get("exclude_modules")

    @property
    def modules_to_save(self) -> list[str]:
        return self.fields.get("modules_to_save") or []

    @property
    def saved_modules(self) -> list[str]:
        """The modules_to_save PEFT loads the adapter with: the config's, plus the head its task
        model adds (``TASK_MODULES_TO_SAVE``; a SEQ_CLS adapter's ``score`` even when the config
        says ``modules_to_save: null``)."""
        own = self.modules_to_save
        task = TASK_MODULES_TO_SAVE.get((self.task_type or "").upper(), ())
        return own + [m for m in task if m not in own]

    @property
    def use_rslora(self) -> bool:
        return bool(self.fields.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.fields.get("use_dora", False))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.fields.get("fan_in_fan_out", False))

    @property
    def base_model_name_or_path(self) -> str | None:
        return _str(self.fields.get("base_model_name_or_path"))

    @property
    def revision(self) -> str | None:
        return _str(self.fields.get("revision"))

    @property
    def task_type(self) -> str | None:
        return _str(self.fields.get("task_type"))

    # -- what PEFT makes of it ---------------------------------------------------------------------
    def rank_alpha(self, name: str) -> tuple[int, float]:
        """The rank and alpha PEFT gives module ``name`` (``ConfigRanks``, built once)."""
        if self._ranks is None:
            self._ranks = ConfigRanks(self)
        return self._ranks(name)

    def targeted(self, name: str) -> bool | None:
        """Whether PEFT creates a LoRA layer for module ``name`` under this config (so that it
        loads the module's weights); None when that cannot be told without the model
        (``all-linear``, no target_modules)."""
        exclude = self.exclude_modules
        if exclude and selects(exclude, name):
            return False
        targets = self.target_modules
        if targets is None or targets == "all-linear":
            return None
        return selects(targets, name)

    def composed(self, same_modules: bool) -> "LoraConfig":
        """The config of an adapter composed from this one and others: the rank and alpha patterns
        go (the writer rebuilds them from the modules), and the layer selection too when the
        modules are not this adapter's own (its selection may not cover the union)."""
        drop = {"rank_pattern", "alpha_pattern"}
        if not same_modules:
            drop |= {"layers_to_transform", "layers_pattern", "exclude_modules"}
        return LoraConfig({k: v for k, v in self.fields.items() if k not in drop})

    def document(self, ignored: Collection[str] = ()) -> dict[str, Any]:
        return {k: v for k, v in self.fields.items() if k not in ignored}


@dataclass(eq=False)
class ComponentConfigs(FormatConfig):
    """One LoraConfig per model component: a multi-component PEFT directory (one sub-directory
    each), or a diffusers file's ``lora_adapter_metadata`` ("" for fields without a component)."""

    components: dict[str, LoraConfig]

    def document(self, ignored: Collection[str] = ()) -> dict[str, Any]:
        return {"components": {c: cfg.document(ignored) for c, cfg in self.components.items()}}

    def __bool__(self) -> bool:
        return bool(self.components)


def lora_config(adapter: "Adapter") -> LoraConfig | None:
    """The one LoraConfig PEFT loads ``adapter`` with (a PEFT directory's adapter_config.json),
    or None: kohya and diffusers files, multi-component PEFT directories (a config per
    component), adapters built in memory."""
    return adapter.config if isinstance(adapter.config, LoraConfig) else None

