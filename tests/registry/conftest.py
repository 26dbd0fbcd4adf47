"""Helpers for the registry tests: tiny PEFT adapters (tests/tinybase.py), a registry in tmp."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `import tinybase`

from tinybase import save_adapter  # noqa: E402

from loratool.registry.core import Registry  # noqa: E402


@pytest.fixture
def home(tmp_path) -> Path:
    """$LORATOOL_HOME of one test (passed as ``home=``, never set globally)."""
    return tmp_path / "home"


@pytest.fixture
def reg(home):
    with Registry(home) as r:
        yield r


@pytest.fixture
def make_adapter(tmp_path):
    """``make_adapter(name, seed=…, r=…)``: a PEFT directory under tmp_path/adapters."""

    def make(name: str, seed: int = 1, r: int = 4, **kw) -> Path:
        return save_adapter(tmp_path / "adapters" / name, r=r, seed=seed, **kw)

    return make


@pytest.fixture
def kohya_file(tmp_path, fixtures_dir):
    """``kohya_file(name)``: a copy of the SD 1.5 kohya fixture at tmp_path/adapters/<name>."""

    def make(name: str = "style.safetensors") -> Path:
        dest = tmp_path / "adapters" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((fixtures_dir / "kohya_sd.safetensors").read_bytes())
        return dest

    return make


@pytest.fixture
def blobs(home):
    """``blobs()``: the blob files on disk, sorted."""

    def files() -> list[Path]:
        root = home / "blobs" / "sha256"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    return files
