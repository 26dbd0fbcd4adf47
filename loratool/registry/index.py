"""The registry's SQLite index (``$LORATOOL_HOME/registry.db``).

WAL mode (readers never wait for a writer), foreign keys on, a busy timeout so that concurrent
processes queue instead of failing, and every change in one ``BEGIN IMMEDIATE`` transaction (the
write lock is taken up front, so a read-then-write such as "next version of this name" cannot
interleave with another writer's). Schema changes are migrations numbered by ``PRAGMA
user_version``: ``MIGRATIONS[i]`` turns version ``i`` into ``i + 1``.

Waiting is bounded (issue 11). In WAL mode only a process holding the database exclusively
(``PRAGMA locking_mode = EXCLUSIVE``, a rollback-journal writer, a recovery) blocks readers;
a reader waits ``READ_WAIT_S`` for it and then fails with one line naming the index file and
what to do (``IndexLockedError``), instead of queueing for minutes. A writer queues behind other
writers for up to ``WRITE_WAIT_S`` in all, retries included, and ends the same way.

Tables:
  adapters   one row per content digest (the sha256 of the adapter's tree blob): format, summary,
             base fingerprints from the manifest
  files      the blobs an adapter is made of, by path inside the adapter
  lineage    edges from an adapter to the tensors digests of the adapters it was made from
  names      one row per name: the next version number (versions are never reused)
  versions   name@version -> digest, with the source it was added from and when
  tags       movable name:tag -> version
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Iterator

from loratool.errors import IndexLockedError, InputError, OutputError

READ_WAIT_S = 5.0    # a reader (list, show, export, lookups, opening the index) waits this long
WRITE_WAIT_S = 60.0  # a writer (add, tag, rm, schema creation) waits this long in all

MIGRATIONS: list[str] = [
    # 0 -> 1
    """
    CREATE TABLE adapters (
        digest          TEXT PRIMARY KEY CHECK (length(digest) = 64),
        format          TEXT NOT NULL,
        entry           TEXT NOT NULL,          -- '.' or the file name load_adapter is given
        size            INTEGER NOT NULL,
        tensors_digest  TEXT,
        config_digest   TEXT,
        num_modules     INTEGER NOT NULL,
        num_params      INTEGER NOT NULL,
        ranks           TEXT NOT NULL,          -- JSON list of distinct ranks
        alphas          TEXT NOT NULL,          -- JSON list of distinct alphas
        targets         TEXT NOT NULL,          -- JSON list of short target names
        base_model      TEXT,                   -- as the adapter's own config names it
        manifest_path   TEXT,                   -- path of loratool.json inside the adapter, if any
        base_name       TEXT,
        base_repo       TEXT,
        base_revision   TEXT,
        base_structure  TEXT,
        base_content    TEXT,
        created_at      TEXT NOT NULL
    );
    CREATE INDEX adapters_base_structure ON adapters(base_structure);
    CREATE INDEX adapters_base_content ON adapters(base_content);
    CREATE INDEX adapters_tensors ON adapters(tensors_digest);
    CREATE TABLE files (
        digest  TEXT NOT NULL REFERENCES adapters(digest) ON DELETE CASCADE,
        path    TEXT NOT NULL,
        blob    TEXT NOT NULL CHECK (length(blob) = 64),
        size    INTEGER NOT NULL,
        PRIMARY KEY (digest, path)
    );
    CREATE INDEX files_blob ON files(blob);
    CREATE TABLE lineage (
        digest     TEXT NOT NULL REFERENCES adapters(digest) ON DELETE CASCADE,
        step       INTEGER NOT NULL,
        operation  TEXT NOT NULL,
        parent     TEXT NOT NULL,               -- tensors digest of an input adapter
        PRIMARY KEY (digest, step, parent)
    );
    CREATE INDEX lineage_parent ON lineage(parent);
    CREATE TABLE names (
        name          TEXT PRIMARY KEY,
        next_version  INTEGER NOT NULL CHECK (next_version >= 1)
    );
    CREATE TABLE versions (
        id               INTEGER PRIMARY KEY,
        name             TEXT NOT NULL REFERENCES names(name),
        version          INTEGER NOT NULL CHECK (version >= 1),
        digest           TEXT NOT NULL REFERENCES adapters(digest),
        source_kind      TEXT NOT NULL CHECK (source_kind IN ('path', 'hub')),
        source           TEXT NOT NULL,
        source_revision  TEXT,
        added_at         TEXT NOT NULL,
        UNIQUE (name, version)
    );
    CREATE INDEX versions_digest ON versions(digest);
    CREATE TABLE tags (
        name        TEXT NOT NULL,
        tag         TEXT NOT NULL,
        version_id  INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        PRIMARY KEY (name, tag)
    );
    CREATE INDEX tags_version ON tags(version_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def _locked(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


class _Deadline:
    """Retries of ``fn`` while SQLite reports a lock (its busy handler waits inside each try, and
    some lock conflicts, such as WAL setup racing another process, come back at once), until
    ``wait_s`` have passed in all."""

    def __init__(self, index: "Index", wait_s: float):
        self.index, self.wait_s = index, wait_s
        self.end = time.monotonic() + wait_s

    def run(self, fn, on_integrity: int = 0):
        conflicts = 0
        i = 0
        while True:
            left = self.end - time.monotonic()
            self.index._busy(left)
            try:
                return fn()
            except sqlite3.IntegrityError:
                conflicts += 1  # a concurrent writer took the same name@version: run again
                if conflicts > on_integrity:
                    raise
            except sqlite3.OperationalError as e:
                if not _locked(e):
                    raise
                if time.monotonic() >= self.end - 0.01:
                    raise self.index.locked_error(self.wait_s) from None
            i += 1
            time.sleep(min(max(self.end - time.monotonic(), 0.0), 0.02 + random.random() * 0.05 * min(i, 10)))


class Index:
    """One connection to the index. ``create=False`` refuses to create a missing database (a
    reference lookup should not leave an empty registry behind). ``read_wait_s``/``write_wait_s``:
    how long a read or a write waits for another process's lock before failing with one line."""

    def __init__(self, path: str | os.PathLike, create: bool = True, read_wait_s: float = READ_WAIT_S,
                 write_wait_s: float = WRITE_WAIT_S):
        self.path = Path(path)
        self.read_wait_s, self.write_wait_s = read_wait_s, write_wait_s
        if not create and not self.path.exists():
            raise InputError(f"{self.path}: no registry here yet; add an adapter with "
                             "`loratool registry add PATH --name NAME`")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: no implicit transactions; we BEGIN IMMEDIATE ourselves.
            self.conn = sqlite3.connect(str(self.path), timeout=read_wait_s, isolation_level=None)
        except sqlite3.Error as e:
            raise OutputError(f"{self.path}: cannot open the registry index: {e}") from None
        self.conn.row_factory = sqlite3.Row
        try:
            self.conn.execute("PRAGMA foreign_keys = ON")
            opening = _Deadline(self, read_wait_s)
            opening.run(lambda: self.conn.execute("PRAGMA journal_mode = WAL").fetchone())
            self.conn.execute("PRAGMA synchronous = FULL")
            current = opening.run(self.user_version)
            if current != SCHEMA_VERSION:
                self._migrate(current)
            self._busy(read_wait_s)  # each later read waits this long, writes raise it (write())
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise InputError(f"{self.path}: the registry index cannot be read: {e}") from None
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _busy(self, seconds: float) -> None:
        """SQLite's own wait for a lock, for the next statements (``PRAGMA busy_timeout`` takes
        no lock itself)."""
        self.conn.execute(f"PRAGMA busy_timeout = {max(int(seconds * 1000), 0)}")

    def locked_error(self, waited_s: float) -> IndexLockedError:
        return IndexLockedError(
            f"{self.path}: the registry index is locked by another process (waited {waited_s:g} s); another "
            "loratool registry command may still be running: let it finish and try again, or find the "
            f"process holding the file with `fuser -v {self.path}` (a program that opened the index with "
            "an exclusive lock, e.g. an sqlite3 shell inside a transaction)")

    # -- schema -------------------------------------------------------------------------------
    def user_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self, current: int) -> None:
        if current > SCHEMA_VERSION:
            raise InputError(f"{self.path}: the registry index has schema version {current}, newer than "
                             f"this loratool understands ({SCHEMA_VERSION}); upgrade loratool")

        def run():
            with self.transaction() as c:
                v = int(c.execute("PRAGMA user_version").fetchone()[0])  # another process may have won
                for i in range(v, SCHEMA_VERSION):
                    for stmt in MIGRATIONS[i].split(";"):
                        if stmt.strip():
                            c.execute(stmt)
                    c.execute(f"PRAGMA user_version = {i + 1}")

        _Deadline(self, self.write_wait_s).run(run)

    # -- transactions -------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: the write lock is taken at BEGIN; commit on success, roll back
        on any exception (a killed process leaves nothing: SQLite discards its journal)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def write(self, fn, attempts: int = 10):
        """Run ``fn(conn)`` in a write transaction, again on a lock timeout (for up to
        ``write_wait_s`` in all) or a version conflict (a UNIQUE violation from a concurrent
        writer, up to ``attempts`` times)."""
        def once():
            with self.transaction() as c:
                return fn(c)

        try:
            return _Deadline(self, self.write_wait_s).run(once, on_integrity=attempts - 1)
        except sqlite3.OperationalError as e:
            raise OutputError(f"{self.path}: the registry index cannot be written: {e}") from None
        finally:
            self._busy(self.read_wait_s)

    def _read(self, sql: str, params, fetch):
        try:
            return fetch(self.conn.execute(sql, params))
        except sqlite3.OperationalError as e:
            if _locked(e):
                raise self.locked_error(self.read_wait_s) from None
            raise InputError(f"{self.path}: the registry index cannot be read: {e}") from None
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path}: the registry index cannot be read: {e}") from None

    def query(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        return self._read(sql, params, lambda cur: cur.fetchall())

    def one(self, sql: str, params: tuple | list = ()) -> sqlite3.Row | None:
        return self._read(sql, params, lambda cur: cur.fetchone())
