"""merge and parity enforce the base an adapter's manifest records (issue 4), and the merged
checkpoint records its lineage."""

import hashlib
import json
import shutil

import jsonschema
import pytest

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


# -- the same policy from Python (issue 12): merge(), unmerge() and check_parity() enforce it ------

def test_python_merge_refuses_another_base_and_writes_nothing(fixtures_dir, tmp_path):
    from loratool.errors import BaseMismatchError
    from loratool.merge import check_parity, merge

    adapter = tmp_path / "a"
    shutil.copytree(fixtures_dir / "llama_r8", adapter)
    record_manifest(adapter, base=fixtures_dir / "base_llama")
    other = base_with_one_changed_tensor(fixtures_dir / "base_llama", tmp_path / "other")
    before = _tree_digest(other), _tree_digest(adapter)
    with pytest.raises(BaseMismatchError, match="model-00004-of-00004.safetensors"):
        merge(other, str(adapter), tmp_path / "out", device="cpu")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a", "other"]  # nothing at OUT nor beside it
    with pytest.raises(BaseMismatchError):
        check_parity(other, fixtures_dir / "base_llama", str(adapter))
    assert (_tree_digest(other), _tree_digest(adapter)) == before

    result = merge(other, str(adapter), tmp_path / "out", device="cpu", allow_base_mismatch=True)
    entry = json.loads((tmp_path / "out" / "loratool.json").read_text())["lineage"][0]
    assert "model-00004-of-00004.safetensors" in entry["base_mismatch"]
    assert result.base_warnings[-1] == f"base mismatch allowed: {entry['base_mismatch']}"
    assert "base_warnings" not in json.loads(result.model_dump_json())  # --json is unchanged


def test_python_merge_writes_the_lineage(fixtures_dir, tmp_path):
    from loratool.merge import check_parity, merge, unmerge

    adapter = tmp_path / "a"
    shutil.copytree(fixtures_dir / "llama_r8", adapter)
    record_manifest(adapter, base=fixtures_dir / "base_llama")
    out = tmp_path / "merged"
    result = merge(fixtures_dir / "base_llama", [str(adapter)], out, device="cpu")
    assert result.base_warnings == []
    manifest = json.loads((out / "loratool.json").read_text())
    jsonschema.validate(manifest, json.loads((SCHEMA_DIR / "merged-manifest.schema.json").read_text()))
    entry = manifest["lineage"][0]
    assert entry["operation"] == "merged" and entry["base_mismatch"] is None
    assert {i["kind"] for i in entry["inputs"]} == {"base", "adapter"}
    assert entry["params"] == {"adapters": [str(adapter)], "dtype": "keep", "device": "cpu", "max_shard_size": None}
    assert manifest["base"] is not None
    assert check_parity(fixtures_dir / "base_llama", out, str(adapter)).ok

    unmerge(out, str(adapter), tmp_path / "unmerged", device="cpu")
    entry = json.loads((tmp_path / "unmerged" / "loratool.json").read_text())["lineage"][0]
    assert entry["operation"] == "unmerged" and entry["params"]["adapters"] == [str(adapter)]


def test_python_merge_require_manifest(fixtures_dir, tmp_path):
    from loratool.errors import BaseMismatchError
    from loratool.merge import merge

    with pytest.raises(BaseMismatchError):
        merge(fixtures_dir / "base_llama", str(fixtures_dir / "llama_r8"), tmp_path / "out", require_manifest=True)
    assert list(tmp_path.iterdir()) == []
    result = merge(fixtures_dir / "base_llama", str(fixtures_dir / "llama_r8"), tmp_path / "out")
    assert any("no loratool manifest" in w for w in result.base_warnings)
