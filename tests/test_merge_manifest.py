"""merge and parity enforce the base an adapter's manifest records (issue 4), and the merged
checkpoint records its lineage."""

import hashlib
import json
import shutil

import jsonschema

from tinybase import base_with_one_changed_tensor
from loratool.manifest import record_manifest
from loratool.schemas.export import SCHEMA_DIR


def _tree_digest(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_merge_refuses_a_changed_base_and_records_an_allowed_one(cli, fixtures_dir, tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(fixtures_dir / "llama_r8", adapter)
    record_manifest(adapter, base=fixtures_dir / "base_llama")
    good = tmp_path / "merged"
    p = cli("merge", "--base", fixtures_dir / "base_llama", "--adapters", adapter, "-o", good)
    assert p.returncode == 0, p.stderr
    manifest = json.loads((good / "loratool.json").read_text())
    jsonschema.validate(manifest, json.loads((SCHEMA_DIR / "merged-manifest.schema.json").read_text()))
    assert manifest["lineage"][0]["operation"] == "merged" and manifest["lineage"][0]["base_mismatch"] is None
    assert {i["kind"] for i in manifest["lineage"][0]["inputs"]} == {"base", "adapter"}

    other = base_with_one_changed_tensor(fixtures_dir / "base_llama", tmp_path / "other")
    before = _tree_digest(other), _tree_digest(adapter)
    out = tmp_path / "m2"
    p = cli("merge", "--base", other, "--adapters", adapter, "-o", out)
    assert p.returncode == 3
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "model-00004-of-00004.safetensors" in lines[0] and "--allow-base-mismatch" in lines[0]
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["a", "merged", "other"]
    p = cli("parity", "--base", other, "--merged", good, "--adapters", adapter)
    assert p.returncode == 3

    p = cli("merge", "--base", other, "--adapters", adapter, "-o", out, "--allow-base-mismatch")
    assert p.returncode == 0, p.stderr
    entry = json.loads((out / "loratool.json").read_text())["lineage"][0]
    assert "model-00004-of-00004.safetensors" in entry["base_mismatch"]
    assert (_tree_digest(other), _tree_digest(adapter)) == before  # inputs untouched


def test_require_manifest(cli, fixtures_dir, tmp_path):
    p = cli("merge", "--base", fixtures_dir / "base_llama", "--adapters", fixtures_dir / "llama_r8",
            "-o", tmp_path / "out", "--require-manifest")
    assert p.returncode == 3 and not (tmp_path / "out").exists()
