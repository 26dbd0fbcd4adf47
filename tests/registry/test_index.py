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


def test_write_runs_again_on_a_version_conflict_then_gives_up(home):
    with Index(home / "registry.db") as idx:
        calls = []

        def conflict_twice(c):
            calls.append(1)
            if len(calls) < 3:  # what a concurrent writer taking name@version looks like
                raise sqlite3.IntegrityError("UNIQUE constraint failed: versions.name, versions.version")
            c.execute("INSERT INTO names (name, next_version) VALUES ('n', 1)")
            return "done"

        assert idx.write(conflict_twice) == "done" and len(calls) == 3

        def always(c):
            calls.append(1)
            raise sqlite3.IntegrityError("UNIQUE")

        calls.clear()
        with pytest.raises(sqlite3.IntegrityError):
            idx.write(always, attempts=2)
        assert len(calls) == 2


def test_waits_are_set_per_operation(home):
    """Reads wait READ_WAIT_S for a lock; a write raises the wait while it runs, then lowers it."""
    Index(home / "registry.db").close()  # created: the next open finds the schema in place
    with Index(home / "registry.db", read_wait_s=2, write_wait_s=30) as idx:
        assert idx.one("PRAGMA busy_timeout")[0] == 2000
        seen = idx.write(lambda c: c.execute("PRAGMA busy_timeout").fetchone()[0])
        assert 25_000 < seen <= 30_000
        assert idx.one("PRAGMA busy_timeout")[0] == 2000


def test_a_broken_query_is_one_line(home):
    with Index(home / "registry.db") as idx, pytest.raises(InputError, match="registry index cannot be read"):
        idx.query("SELECT nothing FROM nowhere")
