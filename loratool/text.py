"""Small pieces of text every part of the library writes the same way (a leaf: imports nothing
of loratool): the Hub prefix, numbers as JSON wants them, UTC timestamps, and lists in messages."""

from __future__ import annotations

import os
import time

HUB_PREFIX = "hf://"  # hf://owner/name[@revision]


def number(x: float) -> int | float:
    """``16.0`` -> ``16``, ``0.5`` -> ``0.5``: how configs and manifests write numbers."""
    return int(x) if float(x).is_integer() else float(x)


def utc_now(environ: dict[str, str] | None = None) -> str:
    """UTC now, or ``SOURCE_DATE_EPOCH`` when set (reproducible output, as in reproducible builds)."""
    env = os.environ if environ is None else environ
    epoch = env.get("SOURCE_DATE_EPOCH")
    t = int(epoch) if epoch and epoch.isdigit() else time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def listed(items: list[str], limit: int = 4, sep: str = "; ") -> str:
    """The first ``limit`` of ``items`` joined by ``sep``, then "(and N more)": one way to keep a
    message with many problems on one readable line."""
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers inside names by value: ``layers.2`` before ``layers.10``
    (a plain sort gives ``layers.1, layers.10, layers.11, …, layers.2``)."""
    import re

    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)
