"""``--base hf://owner/name[@rev]`` wherever a base is taken: the base's safetensors and small
files come from the Hugging Face cache (tests run offline against a cache laid out as
huggingface_hub lays it out), the merge equals the merge of the same local base, and the lineage
and model card name the repo and commit."""

from __future__ import annotations

import json

import pytest

from loratool.errors import InputError
from loratool.merge import merge, unmerge
from loratool.resolve import resolve_base
from tests.hubcache import hub_base, use_cache


def test_merge_from_a_hub_base_equals_the_local_merge(fixtures_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    use_cache(monkeypatch, cache)
    hub_base(fixtures_dir, cache)
    adapter = str(fixtures_dir / "llama_r8")
    merge("hf://tiny-org/tiny-llama", adapter, tmp_path / "hub", device="cpu")
    merge(fixtures_dir / "base_llama", adapter, tmp_path / "local", device="cpu")
    for f in sorted((tmp_path / "local").glob("*.safetensors")):
        assert (tmp_path / "hub" / f.name).read_bytes() == f.read_bytes()
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "base_model:\n- tiny-org/tiny-llama\nbase_model_relation: merge" in card
    unmerge(tmp_path / "hub", adapter, tmp_path / "back", base="hf://tiny-org/tiny-llama@main", device="cpu")
    assert (tmp_path / "back" / "config.json").exists()


def test_cli_validate_and_merge_take_hf_bases(fixtures_dir, tmp_path, cli):
    cache = tmp_path / "hf"
    hub_base(fixtures_dir, cache)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    p = cli("validate", fixtures_dir / "llama_r8", "--base", "hf://tiny-org/tiny-llama", "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["base"] == "hf://tiny-org/tiny-llama"
    p = cli("merge", "--base", "hf://tiny-org/tiny-llama", "--adapters", fixtures_dir / "llama_r8", "-o",
            tmp_path / "m", "--quiet", env=env)
    assert p.returncode == 0, p.stderr
    p = cli("merge", "--base", "hf://tiny-org/absent", "--adapters", fixtures_dir / "llama_r8", "-o",
            tmp_path / "n", env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "hf://tiny-org/absent: cannot download the base" in p.stderr
    assert not (tmp_path / "n").exists()


def test_a_hub_base_without_safetensors_is_refused(fixtures_dir, tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "hf")
    hub_base(fixtures_dir, tmp_path / "hf", pickles=True)
    with pytest.raises(InputError, match="no safetensors weights"):
        resolve_base("hf://tiny-org/tiny-llama", cache_dir=tmp_path / "hf")
    assert resolve_base("not/a/path") .as_posix() == "not/a/path"  # BaseCheckpoint names it
