"""Canonical JSON: the one serialization whose sha256 is a digest (issue 12, "one of each").

Config digests (``loratool.fingerprint.config_digest``) and registry trees (the sha256 of a
tree's canonical JSON is the adapter's ``sha256:`` digest, ``loratool.schemas.registry.Tree``)
both hash this text, so equal values give equal digests whatever their insertion or hash order:

* keys sorted, no whitespace (``separators=(",", ":")``);
* text as UTF-8, not ``\\uXXXX`` escapes (``ensure_ascii=False``, as RFC 8785 does);
* integral floats as ints (PEFT writes ``lora_alpha`` as 16 or 16.0: the same config);
* sets, and the lists PEFT keeps as sets (``SET_VALUED_KEYS``), sorted.

A leaf: imports nothing of loratool.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# PEFT turns these list fields into Python sets (LoraConfig.__post_init__) and writes them back in
# set iteration order, which changes with PYTHONHASHSEED; their order carries no meaning.
SET_VALUED_KEYS = frozenset({"target_modules", "exclude_modules", "modules_to_save"})


def _sort_key(v: Any) -> tuple:
    """Numbers by value, then strings, then anything else by its JSON text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v, "")
    if isinstance(v, str):
        return (1, 0, v)
    return (2, 0, json.dumps(v, sort_keys=True))


def _canonical(obj: Any, key: str | None = None) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)) or (isinstance(obj, (list, tuple)) and key in SET_VALUED_KEYS):
        return sorted((_canonical(v) for v in obj), key=_sort_key)
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # lora_alpha 16 and 16.0 are the same config
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value") and not isinstance(obj, (str, int, float, bool)):  # enums
        return _canonical(obj.value)
    return obj


def canonical_json(obj: Any) -> str:
    """The canonical text of ``obj`` (see the module docstring): equal values, equal text."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def canonical_bytes(obj: Any) -> bytes:
    """``canonical_json(obj)`` as UTF-8: the bytes a digest is the sha256 of. Text that UTF-8
    cannot hold (a lone surrogate, from a file name that is not UTF-8) raises ``ValueError``
    (``UnicodeEncodeError``); callers name the file."""
    return canonical_json(obj).encode("utf-8")
