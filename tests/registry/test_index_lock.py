"""A lock held on the registry index (issue 11): readers wait a few seconds, then fail with one
line naming the index file; writers wait longer, and end the same way. In WAL mode a plain
writer never blocks a reader at all."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loratool.registry.index import READ_WAIT_S, Index, IndexLockedError


def _registry_list(home: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, LORATOOL_HOME=str(home))
    env.pop("LORATOOL_DEBUG", None)
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "loratool", "registry", "list"], capture_output=True, text=True,
                       env=env, timeout=timeout)
    return p, time.monotonic() - start


@contextlib.contextmanager
def held(db: Path, how: str):
    """Another connection holding the index: ``exclusive`` (locking_mode EXCLUSIVE, BEGIN
    EXCLUSIVE: nobody may even read), ``rollback`` (the index switched to a rollback journal,
    BEGIN EXCLUSIVE), ``writer`` (WAL, a write transaction in progress: readers go on)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        if how == "exclusive":
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            conn.execute("BEGIN EXCLUSIVE")
        elif how == "rollback":
            conn.execute("PRAGMA journal_mode = DELETE")
            conn.execute("BEGIN EXCLUSIVE")
        else:
            conn.execute("BEGIN EXCLUSIVE")
            conn.execute("UPDATE names SET next_version = next_version")
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.fixture
def registry(reg, make_adapter, home) -> Path:
    reg.add(make_adapter("a"), "llama")
    reg.close()
    return home / "registry.db"


@pytest.mark.parametrize("how", ["exclusive", "rollback"])
def test_list_gives_up_on_a_held_lock_with_one_line(registry, home, how):
    with held(registry, how):
        p, took = _registry_list(home)
    assert p.returncode == 2, p.stdout + p.stderr
    assert READ_WAIT_S - 1 < took < 10
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"loratool: error: {registry}: the registry index is locked by another process")
    assert "fuser" in lines[0] and "try again" in lines[0]
    # once the lock is gone, everything works again (and the index is back in WAL mode)
    p, _ = _registry_list(home)
    assert p.returncode == 0 and "llama@1" in p.stdout, p.stderr
    with Index(registry) as idx:
        assert idx.one("PRAGMA journal_mode")[0] == "wal"


def test_readers_do_not_wait_for_a_writer(registry, home):
    with held(registry, "writer"):
        p, took = _registry_list(home)
    assert p.returncode == 0 and "llama@1" in p.stdout, p.stderr
    assert took < READ_WAIT_S


@pytest.mark.parametrize("how", ["exclusive", "rollback"])
def test_opening_the_index_is_bounded(registry, how):
    with held(registry, how):
        start = time.monotonic()
        with pytest.raises(IndexLockedError, match="locked by another process") as e:
            Index(registry, read_wait_s=0.3)
        assert time.monotonic() - start < 3
    assert str(e.value).startswith(f"{registry}: ") and "waited 0.3 s" in str(e.value) and "\n" not in str(e.value)


def test_a_writer_waits_for_another_writer_then_ends_with_one_line(registry):
    with Index(registry, write_wait_s=0.5) as idx, held(registry, "writer"):
        start = time.monotonic()
        with pytest.raises(IndexLockedError) as e:
            idx.write(lambda c: c.execute("INSERT INTO names (name, next_version) VALUES ('x', 1)"))
        took = time.monotonic() - start
        assert 0.4 < took < 3
        assert str(e.value).startswith(f"{registry}: the registry index is locked") and "\n" not in str(e.value)
        assert idx.query("SELECT name FROM names WHERE name = 'x'") == []  # still readable meanwhile


def test_a_writer_gets_the_lock_when_it_is_released_in_time(registry):
    conn = sqlite3.connect(registry, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    with Index(registry, write_wait_s=10) as idx:
        threading.Timer(0.5, lambda: conn.execute("COMMIT")).start()
        idx.write(lambda c: c.execute("INSERT INTO names (name, next_version) VALUES ('x', 1)"))
        assert idx.one("SELECT next_version FROM names WHERE name = 'x'")[0] == 1
    conn.close()
