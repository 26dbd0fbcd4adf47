"""`parity --base hf://owner/name[@rev]`: the base comes from the Hugging Face cache, as for merge
and validate (tests run offline against a cache laid out as huggingface_hub lays it out)."""

from __future__ import annotations

import shutil

from loratool.merge import check_parity, merge

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def hub_base(fixtures_dir, cache, repo_id="tiny-org/tiny-llama"):
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    shutil.copytree(fixtures_dir / "base_llama", snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


def test_parity_takes_a_hub_base(fixtures_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    # huggingface_hub reads its environment once, at import: point its constants at the cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
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
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf2"))
    assert not check_parity("hf://tiny-org/tiny-llama", tmp_path / "merged", adapter,
                            allow_base_mismatch=True).ok
