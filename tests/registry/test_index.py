"""The SQLite index: schema, migrations, transactions."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from loratool.errors import InputError
from loratool.registry.index import SCHEMA_VERSION, Index


def test_index_schema(home):
    with Index(home / "registry.db") as idx:
        assert idx.user_version() == SCHEMA_VERSION
        assert idx.one("PRAGMA journal_mode")[0] == "wal"
        assert idx.one("PRAGMA foreign_keys")[0] == 1
        tables = {r[0] for r in idx.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"adapters", "files", "lineage", "names", "versions", "tags"} <= tables
    with Index(home / "registry.db") as idx:  # reopening migrates nothing
        assert idx.user_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(home):
    home.mkdir()
    conn = sqlite3.connect(home / "registry.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(InputError, match="newer than this loratool understands"):
        Index(home / "registry.db")


def test_transaction_rolls_back_on_error(home):
    with Index(home / "registry.db") as idx:
        with pytest.raises(RuntimeError):
            with idx.transaction() as c:
                c.execute("INSERT INTO names (name, next_version) VALUES ('x', 1)")
                raise RuntimeError("boom")
        assert idx.one("SELECT count(*) FROM names")[0] == 0


def test_foreign_keys_are_enforced(home):
    with Index(home / "registry.db") as idx, pytest.raises(sqlite3.IntegrityError):
        with idx.transaction() as c:
            c.execute("INSERT INTO versions (name, version, digest, source_kind, source, added_at) "
                      "VALUES ('x', 1, ?, 'path', '/x', 't')", ("0" * 64,))


def test_writers_in_threads_do_not_lose_updates(home):
    Index(home / "registry.db").close()
    with Index(home / "registry.db") as idx:
        idx.write(lambda c: c.execute("INSERT INTO names (name, next_version) VALUES ('n', 1)"))

    def bump():
        with Index(home / "registry.db") as own:
            for _ in range(20):
                own.write(lambda c: c.execute("UPDATE names SET next_version = next_version + 1"))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Index(home / "registry.db") as idx:
        assert idx.one("SELECT next_version FROM names")[0] == 81
