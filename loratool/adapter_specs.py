"""The one ``--adapters`` grammar, shared by compose, merge, parity and unmerge (issue 12).

    --adapters ENTRY[,ENTRY...]      (the option may be repeated)
    ENTRY = REF[:WEIGHT]

``REF`` is a path or a registry/Hub reference (``loratool.registry.refs``); ``WEIGHT`` is the last
``:number`` of the entry, 1.0 when absent, so ``name:prod:0.5`` is the tag ``prod`` of ``name`` at
weight 0.5 and ``dir:with:colons`` is a path. An existing path is never split, and
``sha256:1234`` is a digest prefix, not ``sha256`` at weight 1234 (``split_weight``).

Refused, each in one line naming the entry: an empty entry (``a:0.7,,b:0.3``, a trailing comma),
a weight with no reference (``:0.5``), a weight that is not finite (``a:1e999``), no entry at all.

This module imports nothing heavy: ``loratool.compose`` uses it without loading the merge package.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from loratool.errors import UsageError
from loratool.registry.refs import split_weight

GRAMMAR = "PATH[:WEIGHT][,PATH[:WEIGHT]...]"


@dataclass(frozen=True)
class AdapterSpec:
    """One ``REF[:WEIGHT]`` entry of ``--adapters``."""

    path: Path
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.weight:g}"


def parse_adapter_spec(entry: str, option: str = "--adapters") -> AdapterSpec:
    """One entry (already split at commas): ``name:prod:0.5`` -> ``AdapterSpec("name:prod", 0.5)``."""
    item = entry.strip()
    if not item:
        raise UsageError(f"{option}: empty entry; expected {GRAMMAR}")
    # ':0.5' names no adapter (an existing file called ':0.5' still does: split_weight keeps it whole)
    if item.startswith(":") and not os.path.exists(item):
        raise UsageError(f"{option}: entry {item!r} has no path or reference before ':'; expected {GRAMMAR}")
    ref, weight = split_weight(item)
    if weight is None:
        weight = 1.0
    elif not math.isfinite(weight):
        raise UsageError(f"{option}: entry {item!r} has weight {weight}; expected a finite number")
    return AdapterSpec(Path(ref), weight)


def parse_adapter_specs(values: str | os.PathLike | Iterable[str | os.PathLike | AdapterSpec | tuple],
                        option: str = "--adapters") -> list[AdapterSpec]:
    """``"a:0.7,b:0.3"`` (or several such strings, paths, ``AdapterSpec``s, ``(path, weight)``
    pairs) -> ``AdapterSpec``s."""
    if isinstance(values, (str, os.PathLike)):
        values = [values]
    specs: list[AdapterSpec] = []
    for value in values:
        if isinstance(value, AdapterSpec):
            specs.append(value)
            continue
        if isinstance(value, tuple):  # (path, weight) from Python callers: no text to parse
            path, weight = value
            if not math.isfinite(float(weight)):
                raise UsageError(f"{option}: weight of {os.fspath(path)} is {weight}; expected a finite number")
            specs.append(AdapterSpec(Path(os.fspath(path)), float(weight)))
            continue
        text = os.fspath(value)
        if os.path.exists(text):  # an existing path is one entry, commas and colons included
            specs.append(AdapterSpec(Path(text)))
            continue
        entries = text.split(",")
        for i, entry in enumerate(entries):
            if not entry.strip():
                where = f"entry {i + 1} of {text!r}" if len(entries) > 1 else repr(text)
                raise UsageError(f"{option}: {where} is empty; expected {GRAMMAR}")
            specs.append(parse_adapter_spec(entry, option))
    if not specs:
        raise UsageError(f"{option}: no adapter given; expected {GRAMMAR}")
    return specs
