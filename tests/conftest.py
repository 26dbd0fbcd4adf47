"""Shared test fixtures.

`fixtures_dir` is the tree that `fixtures/generate.py` writes (seeded, made with transformers and
PEFT). `make test` generates it into fixtures/build first; when that is missing (running pytest
directly on a fresh checkout) it is generated once per session into a temporary directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `import fixtures`


@pytest.fixture(autouse=True)
def _fresh_inputs():
    """Each test starts with no recorded inputs (``loratool.boundary.note_input`` protects what a
    process has read from its outputs; one pytest process runs many unrelated commands)."""
    from loratool.boundary import fresh_inputs

    with fresh_inputs():
        yield


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    env = os.environ.get("LORATOOL_FIXTURES")
    if env:
        return Path(env)
    built = ROOT / "fixtures" / "build"
    if (built / ".done").exists():
        return built
    out = tmp_path_factory.mktemp("fixtures") / "build"
    from fixtures.generate import generate

    generate(out)
    return out


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `loratool` in a subprocess, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("LORATOOL_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "loratool", *map(str, args)], capture_output=True,
                          text=True, env=full_env)


@pytest.fixture
def cli():
    return run_cli

