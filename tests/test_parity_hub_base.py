"""`parity --base hf://owner/name[@rev]`: the base comes from the Hugging Face cache, as for merge
and validate (tests run offline against a cache laid out as huggingface_hub lays it out)."""

from __future__ import annotations

import shutil

from loratool.merge import check_parity, merge
from tests.hubcache import hub_base, use_cache


def test_parity_takes_a_hub_base(fixtures_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    use_cache(monkeypatch, cache)
    hub_base(fixtures_dir, cache)
    adapter = str(fixtures_dir / "llama_r8")
    merge(fixtures_dir / "base_llama", adapter, tmp_path / "merged", device="cpu")
    report = check_parity("hf://tiny-org/tiny-llama@main", tmp_path / "merged", adapter)
    assert report.ok and report.layers and report.untouched
    assert report.base == "hf://tiny-org/tiny-llama@main"
    # another base behind the same name fails: the hub base is the one that is read
    other = hub_base(fixtures_dir, tmp_path / "hf2")
    shutil.rmtree(other)
    shutil.copytree(fixtures_dir / "base_llama_other", other)
    use_cache(monkeypatch, tmp_path / "hf2")
    assert not check_parity("hf://tiny-org/tiny-llama", tmp_path / "merged", adapter,
                            allow_base_mismatch=True).ok
