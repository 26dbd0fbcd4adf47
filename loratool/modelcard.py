"""The model card (README.md) of a merged checkpoint.

The Hub reads a model's lineage from its card's YAML front matter: ``base_model`` (repo ids) and
``base_model_relation`` (``merge`` here: the weights are the base's with adapters folded in). A
merged output gets its own card rather than a copy of the base's, which would describe another
model; the base card's ``license``, ``language`` and ``pipeline_tag`` carry over, since folding in
adapters changes none of them (the adapters' own licenses are the user's to check).

``base_model`` is written only when the base is known by a Hub repo id (``org/name``); a local
path is not one, and the Hub would reject the card's metadata. The body names the base and every
adapter with its weight, and points to ``loratool.json`` for the content hashes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

CARD = "README.md"
MARKER = "<!-- written by loratool merge -->"
CARRIED = ("license", "license_name", "license_link", "language", "pipeline_tag", "library_name")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def repo_id(name: str | None) -> str | None:
    """``name`` when it is a Hub repo id (``org/name``), else None."""
    if not name:
        return None
    name = name.removeprefix("hf://").split("@", 1)[0]
    return name if _REPO_ID.match(name) and ".." not in name else None


def front_matter(text: str) -> dict[str, str]:
    """The simple ``key: value`` lines of a card's YAML front matter (lists and nested values are
    left out: only the scalar keys in ``CARRIED`` are read)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out: dict[str, str] = {}
    for line in lines[1:200]:
        if line.strip() == "---":
            break
        m = re.match(r"^([A-Za-z_]+):\s*(\S.*)$", line)
        if m and m.group(1) in CARRIED:
            out[m.group(1)] = m.group(2).strip()
    return out


def _yaml(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def merge_card(base_name: str | None, adapters: Iterable[tuple[str, float, str | None]],
               base_card: str | None = None, tool_version: str | None = None) -> str:
    """The card: ``adapters`` as (reference, weight, the base model it names); ``base_card``: the
    base's README.md text, whose license and language carry over."""
    adapters = list(adapters)
    carried = front_matter(base_card or "")
    base_id = repo_id(base_name)
    lines = ["---"]
    if base_id:
        lines += ["base_model:", f"- {base_id}", "base_model_relation: merge"]
    for key in CARRIED:
        if key in carried:
            lines.append(f"{key}: {carried[key]}")
    lines += ["tags:", "- lora", "- merge", "- loratool", "---", MARKER, ""]
    title = base_name or "a base model"
    lines += [f"# {title} with {len(adapters)} LoRA adapter{'s' if len(adapters) != 1 else ''} merged", ""]
    lines += [f"The weights of {f'`{base_name}`' if base_name else 'the base'} with these LoRA adapters "
              "folded in (W + Σ weight · scale · B @ A, rounded once to the base's dtype):", ""]
    lines += ["| adapter | weight | trained on |", "|---|---|---|"]
    for ref, weight, trained_on in adapters:
        lines.append(f"| `{ref}` | {weight:g} | {f'`{trained_on}`' if trained_on else '-'} |")
    lines += ["", f"Made by loratool{f' {tool_version}' if tool_version else ''}; `loratool.json` beside "
              "this card records the base's content hashes and the adapters that went in "
              "(`loratool parity` checks the merge against them).", ""]
    return "\n".join(lines)


def is_ours(path: Path) -> bool:
    """Whether the card at ``path`` was written by ``merge`` (an unmerge drops it)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARKER in f.read(4096)
    except OSError:
        return False
