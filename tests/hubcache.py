"""A base model in a Hugging Face cache laid out as huggingface_hub lays it out
(models--owner--name/{refs/main, snapshots/<commit>/…}), for the ``hf://`` base tests, which run
offline against it."""

from __future__ import annotations

import shutil

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def hub_base(fixtures_dir, cache, repo_id="tiny-org/tiny-llama", pickles=False):
    """The fixtures' base_llama as ``repo_id`` at COMMIT in ``cache`` (``pickles``: its weights
    renamed .bin, a repo without safetensors); returns the snapshot folder."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    shutil.copytree(fixtures_dir / "base_llama", snap)
    if pickles:
        for f in snap.glob("*.safetensors"):
            f.rename(f.with_suffix(".bin"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


def use_cache(monkeypatch, cache) -> None:
    """Point huggingface_hub at ``cache``, offline: it reads its environment once, at import, so
    its constants are patched rather than the environment."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
