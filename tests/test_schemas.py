"""The exported JSON Schema files: up to date, valid, and not vacuous."""

from __future__ import annotations

import json

import jsonschema
import pytest
from tinybase import FakeHubApi, base_tensors, save_adapter, save_base

from loratool.fingerprint import fingerprint_base
from loratool.manifest import build_manifest, lineage_entry
from loratool.schemas.export import SCHEMA_DIR, SCHEMAS, main, render, stale


def test_schema_files_are_up_to_date():
    assert stale() == [], "schemas/ is out of date: run `python -m loratool.schemas.export`"


def test_export_check_and_write(tmp_path):
    assert main(["--out", str(tmp_path), "--check"]) == 1  # missing files
    assert main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SCHEMAS)
    assert main(["--out", str(tmp_path), "--check"]) == 0
    assert stale(tmp_path) == []


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_valid_draft_2020_12(name):
    jsonschema.Draft202012Validator.check_schema(json.loads(render()[name]))


def schema(name: str) -> dict:
    return json.loads((SCHEMA_DIR / name).read_text())


def test_manifests_validate_and_broken_ones_do_not(tmp_path):
    base = save_base(tmp_path / "base", base_tensors())
    adapter = save_adapter(tmp_path / "adapter")
    hub_fp = fingerprint_base("hf://tiny-org/tiny-llama", api=FakeHubApi(base, lfs=False, headers=False))
    local_fp = fingerprint_base(base)
    for fp in (None, local_fp, hub_fp):
        m = build_manifest(adapter, base_fp=fp, lineage=[lineage_entry("created", inputs=[fp] if fp else [])])
        jsonschema.validate(json.loads(m.model_dump_json()), schema("manifest.schema.json"))
    jsonschema.validate(json.loads(hub_fp.model_dump_json()), schema("fingerprint.schema.json"))

    data = json.loads(m.model_dump_json())
    broken = [
        {**data, "lineage": [{**data["lineage"][0], "operation": "blended"}]},
        {**data, "adapter": {**data["adapter"], "tensors_digest": "XYZ"}},
        {**data, "surprise": 1},
        {k: v for k, v in data.items() if k != "adapter"},
    ]
    for bad in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema("manifest.schema.json"))


def _json_commands() -> set[str]:
    """Every command (``registry add`` for a subcommand) that takes ``--json``."""
    import click

    from loratool.cli import cli

    found = set()
    ctx = click.Context(cli)

    def walk(cmd: click.Command, prefix: str) -> None:
        if isinstance(cmd, click.Group):  # the top level loads its commands lazily
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), f"{prefix} {name}".strip())
        elif any("--json" in p.opts for p in cmd.params):
            found.add(prefix)

    walk(cli, "")
    return found


def test_every_json_output_has_an_exported_schema():
    """Issue 12: each command's ``--json`` is a pydantic model whose schema is in schemas/."""
    from loratool.schemas.export import COMMAND_SCHEMAS

    commands = _json_commands()
    assert {"inspect", "convert", "merge", "registry list"} <= commands  # the walk finds them
    assert commands == set(COMMAND_SCHEMAS)
    assert set(COMMAND_SCHEMAS.values()) <= set(SCHEMAS)
