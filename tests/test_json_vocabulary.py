"""One JSON vocabulary across commands (issue 14): a key means one kind of value in every exported
schema. Counts are ``num_*`` (``num_errors``, ``num_merged``), lists and objects keep plural nouns
(``warnings`` is always a list of messages), value→count tables are ``*_counts``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"

# Keys whose type differs on purpose, and why:
DIFFERENT = {
    # the persisted manifest (loratool.json, schema_version 1) records a base's fingerprint and
    # per-adapter rank/alpha summaries (min/max/per-module); command results name the base as given
    # and a module's own rank and alpha
    "base": "a path as given in command results; a fingerprint object in manifests",
    "rank": "a module's rank; a summary object in the persisted manifest",
    "alpha": "a module's alpha; a summary object in the persisted manifest",
}


def _type(prop: dict) -> str:
    if "$ref" in prop:
        return "object"
    if "anyOf" in prop:
        kinds = {_type(p) for p in prop["anyOf"]} - {"null"}
        return "|".join(sorted(kinds))
    t = prop.get("type", "any")
    return "object" if t == "object" else t


def _properties():
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        models = [("", schema), *schema.get("$defs", {}).items()]
        for name, model in models:
            for key, prop in model.get("properties", {}).items():
                yield key, _type(prop), f"{path.name}{'#' + name if name else ''}"


def test_a_key_has_one_type_everywhere():
    seen: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key, kind, where in _properties():
        seen[key][kind].append(where)
    clashes = {k: dict(v) for k, v in seen.items() if len(v) > 1 and k not in DIFFERENT}
    assert not clashes, clashes


def test_counts_are_num_and_warnings_are_lists():
    for key, kind, where in _properties():
        if key in ("warnings", "errors", "problems", "notes"):
            assert kind == "array", (key, kind, where)
        if key.startswith("num_"):
            assert kind == "integer", (key, kind, where)
