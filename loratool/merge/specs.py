"""Which adapters, at which weights: ``--adapters`` parsed into ``AdapterSpec``s (the grammar every
command shares, in ``loratool.adapter_specs``) and read into ``LoadedAdapter``s (refused when
merging them would leave something out), and the values of ``--dtype`` and ``--max-shard-size``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from loratool.adapter import Adapter, require_usable
from loratool.adapter_specs import AdapterSpec, parse_adapter_specs
from loratool.errors import InputError, UsageError
from loratool.formats.loraconfig import lora_config

DTYPE_CHOICES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32",
                 "bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def parse_size(text: str | int | None) -> int | None:
    """``200KB``, ``5GB``, ``1GiB`` or a byte count (transformers' convention: KB = 1000 bytes)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d{1,20}(?:\.\d{1,20})?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-shard-size: cannot read {text!r}; expected e.g. 200KB, 500MB, 5GB or bytes")
    num, unit = float(m.group(1)), m.group(2).upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(num * mult)
    if size <= 0:
        raise UsageError(f"--max-shard-size: {text!r} is not a positive size")
    return size


def parse_dtype(dtype: str | None) -> str | None:
    """``keep``/None -> None, else the safetensors dtype (``bf16`` -> ``BF16``)."""
    if dtype is None:
        return None
    key = str(dtype).lower()
    if key not in DTYPE_CHOICES:
        raise UsageError(f"--dtype: unknown dtype {dtype!r}; choose keep, bf16, fp16 or fp32")
    return DTYPE_CHOICES[key]


@dataclass
class LoadedAdapter:
    """An ``AdapterSpec`` and the adapter read from it (``load_adapters``)."""

    spec: AdapterSpec
    adapter: Adapter


def _specs(adapters) -> list[AdapterSpec]:
    """``"a:0.7,b:0.3"``, or a list of such strings, paths and ``AdapterSpec``s (``adapter_specs``)."""
    return parse_adapter_specs(adapters)


def load_adapters(specs: Sequence[AdapterSpec], format: str | None = None) -> list[LoadedAdapter]:
    """Read each adapter (a path, or a registry or Hub reference: ``loratool.resolve``) lazily,
    as ``format`` when given (detected otherwise), refusing one that holds nothing to merge,
    non-finite values, or tensors the merge would leave out."""
    from loratool.resolve import load_adapter

    loaded = []
    for spec in specs:
        adapter = load_adapter(spec.path, format=format)
        if not adapter.modules and not adapter.modules_to_save:
            raise InputError(f"{spec.path}: holds no LoRA modules and no modules_to_save; nothing to merge")
        # NaN/Inf or a non-finite scale would be written into the model: refuse before anything is
        require_usable(adapter)
        # A tensor we cannot place (a modules_to_save entry missing from the config, trainable
        # tokens…) would silently be left out of the merge: refuse instead.
        config = lora_config(adapter)
        if config:
            skipped = [n for n in adapter.modules if config.targeted(n) is False]
            if skipped:
                raise InputError(f"{spec.path}: module {skipped[0]} (and {len(skipped) - 1} more) has weights but the "
                                 "config's target_modules/exclude_modules leave it out, so PEFT would not apply it; "
                                 "fix adapter_config.json so that the merge and PEFT agree")
        unknown = sorted(n for n in adapter.extra_tensors if not n.endswith(".base_layer.weight"))
        if unknown:
            raise InputError(f"{spec.path}: holds tensors that are neither LoRA factors nor modules_to_save of its "
                             f"config ({', '.join(unknown[:3])}{' …' if len(unknown) > 3 else ''}); merging would "
                             "leave them out (add them to modules_to_save in the config if they replace base tensors)")
        loaded.append(LoadedAdapter(spec, adapter))
    return loaded
