"""The local adapter registry: a content-addressed blob store with a SQLite index.

An adapter is stored as blobs (one per file: config, weights, ``loratool.json``) plus a *tree*
blob, the canonical JSON listing its files and their blobs; the sha256 of the tree is the
adapter's digest, so the same content is stored once and has one digest whatever its name.
Names carry versions 1, 2, … and movable tags (``prod``); moving a tag to an older version is a
rollback.

Order of writes (crash safety): blobs first (each complete before it is renamed into place), the
tree blob next, the index row last, in one transaction. A kill at any point leaves at worst
unreferenced blobs and temporary files, which ``gc`` removes; never a row whose blobs are missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from loratool.boundary import default_home, parse_json
from loratool.text import listed, number, utc_now
from loratool.errors import AmbiguousRefError, InputError, NotInRegistryError, UsageError
from loratool.fingerprint import HashCache, hash_files
from loratool.registry.index import Index
from loratool.schemas.registry import (
    AddResult,
    BaseInfo,
    CorruptBlob,
    Details,
    Entry,
    GcResult,
    LineageEdge,
    ListReport,
    RemoveResult,
    Source,
    TagResult,
    Tree,
    TreeFile,
    UntagResult,
    VerifyReport,
)
from loratool.registry.refs import Ref, parse_ref, validate_name, validate_tag
from loratool.registry.store import BlobStore

DB_FILE = "registry.db"
MATERIALIZED = "materialized"
_LIST_LIMIT = 8


def _ref(row: sqlite3.Row) -> str:
    return f"{row['name']}@{row['version']}"


def protected_home(home: Path) -> list[Path]:
    """``[home]`` as an input no output may touch, unless it is ``default_home()``, which every
    output check protects already (and names as the registry home in its message)."""
    if os.path.realpath(home) == os.path.realpath(default_home()):
        return []
    return [home]


def _adapter_manifest(sidecar: Path, files: list[Path]):
    """The manifest beside the adapter, else embedded in its own weight files. (Unlike
    ``load_manifest`` on a directory, other ``.safetensors`` files there are never opened: a Hub
    snapshot may also hold a full model.)"""
    from loratool.manifest import METADATA_KEY, parse_manifest, read_manifest_file
    from loratool.safetensors_io import SafetensorsFile

    if os.path.lexists(sidecar):
        return read_manifest_file(sidecar)
    for f in files:
        if f.suffix == ".safetensors":
            meta = SafetensorsFile(f).metadata
            if METADATA_KEY in meta:
                return parse_manifest(meta[METADATA_KEY], f"{f} (metadata {METADATA_KEY})")
    return None


class Registry:
    """The registry under ``home`` (default ``$LORATOOL_HOME``, see ``default_home``).

    ``create=False`` opens an existing registry only (reference lookups must not create one).
    Use as a context manager, or call ``close()``.
    """

    def __init__(self, home: str | os.PathLike | None = None, create: bool = True):
        # the same default_home that every output check protects (loratool.boundary)
        self.home = Path(home) if home is not None else default_home()
        self.store = BlobStore(self.home)
        self.materialized = self.home / MATERIALIZED
        self._create = create
        self._index: Index | None = None

    @property
    def index(self) -> Index:
        if self._index is None:
            db = self.home / DB_FILE
            if not self._create and not db.exists():
                raise NotInRegistryError(f"there is no registry at {self.home} yet (add adapters with "
                                         "`loratool registry add PATH --name NAME`)")
            try:
                self.home.mkdir(parents=True, exist_ok=True)
                self._index = Index(db)
            except OSError as e:  # $LORATOOL_HOME is a file, read-only, on a full disk
                raise self.store.cannot_write(e, "open the registry index") from None
        return self._index

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- adding -------------------------------------------------------------------------------
    def add(self, path: str | os.PathLike, name: str, tags: Iterable[str] = (),
            source: Source | None = None, format: str | None = None) -> AddResult:
        """Store the adapter at ``path`` as the next version of ``name`` (or return the latest
        version when it already holds the same content) and point ``tags`` at it. ``format``
        overrides detection; the tree records the format, and every later read of the reference
        (``loratool.resolve.load_adapter``) reads it in that format."""
        from loratool.fingerprint import adapter_tensors_digest, config_digest
        from loratool.formats import load_adapter
        from loratool.manifest import declared_base, manifest_path

        validate_name(name)
        tags = list(dict.fromkeys(validate_tag(t) for t in tags))
        adapter = load_adapter(path, format=format)
        base_model, _ = declared_base(adapter)  # text or None: a config's odd value is one line, here
        src = Path(adapter.path or path)
        root = src if src.is_dir() else src.parent
        entry = "." if src.is_dir() else src.name
        files = list(dict.fromkeys(Path(f) for f in adapter.files))
        sidecar = manifest_path(src)
        manifest = _adapter_manifest(sidecar, files)
        if os.path.lexists(sidecar) and sidecar not in files:
            files.append(sidecar)
        rel = {f: f.relative_to(root).as_posix() for f in files}
        for f, r in rel.items():  # the tree and the index hold text; a name that is not UTF-8 cannot be either
            try:
                r.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"{f}: the file name is not valid UTF-8 ({os.fsencode(r)!r}); rename it to "
                                 "UTF-8 to add this adapter") from None
        shas = hash_files(files, cache=HashCache(self.home))
        tensors = adapter_tensors_digest(adapter)
        base = manifest.base if manifest else None
        source = source or Source(kind="path", location=str(Path(path).resolve()))

        with self.store.lock():
            new_bytes = 0
            tree_files = []
            for f in files:
                present = self.store.has(shas[f], f.stat().st_size)
                digest, size = self.store.put_file(f, expected=shas[f])
                new_bytes += 0 if present else size
                tree_files.append(TreeFile(path=rel[f], sha256=digest, size=size))
            tree = Tree(format=adapter.format, entry=entry, files=sorted(tree_files, key=lambda t: t.path))
            digest = self._digest_of_same_tree(tree) or self.store.put_bytes(tree.canonical(), "tree")
            row = {
                "digest": digest,
                "format": adapter.format,
                "entry": entry,
                "size": sum(t.size for t in tree_files),
                "tensors_digest": tensors,
                "config_digest": config_digest(adapter.config) if adapter.config else None,
                "num_modules": len(adapter.modules),
                "num_params": adapter.num_params,
                "ranks": json.dumps(sorted({number(r) for r in adapter.ranks})),
                "alphas": json.dumps(sorted({number(a) for a in adapter.alphas})),
                "targets": json.dumps(adapter.target_names()),
                "base_model": base_model,
                "manifest_path": rel[sidecar] if sidecar in rel else None,
                "base_name": base.name if base else None,
                "base_repo": base.repo_id if base else None,
                "base_revision": base.revision if base else None,
                "base_structure": base.structure if base else None,
                "base_content": base.content if base else None,
                "created_at": utc_now(),
            }
            edges = [(digest, step, e.operation, i.digest)
                     for step, e in enumerate(manifest.lineage if manifest else [])
                     for i in e.inputs if i.kind == "adapter" and i.digest]

            def insert(c: sqlite3.Connection) -> AddResult:
                cols = ", ".join(row)
                c.execute(f"INSERT OR IGNORE INTO adapters ({cols}) VALUES ({', '.join('?' * len(row))})",
                          list(row.values()))
                c.executemany("INSERT OR IGNORE INTO files (digest, path, blob, size) VALUES (?, ?, ?, ?)",
                              [(digest, t.path, t.sha256, t.size) for t in tree_files])
                c.executemany("INSERT OR IGNORE INTO lineage (digest, step, operation, parent) VALUES (?, ?, ?, ?)",
                              edges)
                latest = c.execute("SELECT id, version, digest FROM versions WHERE name = ? "
                                   "ORDER BY version DESC LIMIT 1", (name,)).fetchone()
                if latest is not None and latest["digest"] == digest:
                    vid, version, created = latest["id"], latest["version"], False
                else:
                    c.execute("INSERT INTO names (name, next_version) VALUES (?, 1) ON CONFLICT (name) DO NOTHING",
                              (name,))
                    version = c.execute("SELECT next_version FROM names WHERE name = ?", (name,)).fetchone()[0]
                    c.execute("UPDATE names SET next_version = ? WHERE name = ?", (version + 1, name))
                    vid = c.execute(
                        "INSERT INTO versions (name, version, digest, source_kind, source, source_revision, added_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (name, version, digest, source.kind, source.location, source.revision, utc_now()),
                    ).lastrowid
                    created = True
                for t in tags:
                    self._set_tag(c, name, t, vid)
                return AddResult(name=name, version=version, digest=digest, created=created, tags=tags,
                                 new_bytes=new_bytes)

            return self.index.write(insert)

    def _digest_of_same_tree(self, tree: Tree) -> str | None:
        """The digest of an indexed adapter with exactly this tree (format, entry, files), whose
        tree blob is present; else None. Found by content, not by bytes: a tree stored before the
        canonical JSON wrote UTF-8 (issue 12) holds ``\\uXXXX`` escapes for non-ASCII paths, so its
        bytes, and its digest, differ from ``tree.canonical()``; the same adapter added again
        gets that digest back instead of a second one. Nothing is rewritten."""
        if not tree.files:
            return None
        want = {(f.path, f.sha256, f.size) for f in tree.files}
        first = tree.files[0]
        for r in self.index.query(
                "SELECT a.digest FROM files f JOIN adapters a ON a.digest = f.digest "
                "WHERE f.blob = ? AND f.path = ? AND f.size = ? AND a.format = ? AND a.entry = ? ORDER BY a.digest",
                (first.sha256, first.path, first.size, tree.format, tree.entry)):
            have = {(f["path"], f["blob"], f["size"]) for f in self.index.query(
                "SELECT path, blob, size FROM files WHERE digest = ?", (r["digest"],))}
            if have == want and self.store.has(r["digest"]):
                return r["digest"]
        return None

    @staticmethod
    def _set_tag(c: sqlite3.Connection, name: str, tag: str, version_id: int) -> None:
        c.execute("INSERT INTO tags (name, tag, version_id) VALUES (?, ?, ?) "
                  "ON CONFLICT (name, tag) DO UPDATE SET version_id = excluded.version_id",
                  (name, tag, version_id))

    # -- resolving references -----------------------------------------------------------------
    def _names_hint(self) -> str:
        names = [r["name"] for r in self.index.query("SELECT DISTINCT name FROM versions ORDER BY name")]
        return f"registered: {listed(names, _LIST_LIMIT, ', ')}" if names else "the registry is empty"

    def _digests(self, prefix: str) -> list[str]:
        return [r["digest"] for r in self.index.query(
            "SELECT digest FROM adapters WHERE digest >= ? AND digest < ? ORDER BY digest",
            (prefix, prefix + "g"))]  # 'g' sorts after every hex digit

    def resolve_digest(self, ref: Ref | str) -> str:
        """The digest a registry reference points at (not for paths or Hub references)."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.kind == "digest":
            found = self._digests(ref.digest)
            if not found:
                raise NotInRegistryError(f"no adapter in the registry at {self.home} has a digest starting "
                                         f"with {ref.digest}")
            if len(found) > 1:
                labels = []
                for d in found:
                    names = [_ref(r) for r in self.index.query(
                        "SELECT name, version FROM versions WHERE digest = ? ORDER BY name, version", (d,))]
                    labels.append(f"sha256:{d[:16]} ({', '.join(names) or 'unnamed'})")
                raise AmbiguousRefError(f"{ref.text} is ambiguous: {len(found)} adapters match: "
                                        f"{listed(labels, _LIST_LIMIT, ', ')}; give more digits")
            return found[0]
        return self.find_version(ref)["digest"]

    def find_versions(self, ref: Ref | str) -> list[sqlite3.Row]:
        """Every version a reference names: one for name, name@N, name:tag; all versions holding
        the content for sha256:…"""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.kind == "hub":
            raise UsageError(f"{ref.text} is a Hub reference; `loratool registry pull {ref.text}` adds it")
        if ref.kind == "digest":
            digest = self.resolve_digest(ref)
            return self.index.query("SELECT * FROM versions WHERE digest = ? ORDER BY name, version", (digest,))
        if ref.kind == "name":
            row = self.index.one("SELECT * FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1", (ref.name,))
            if row is None:
                raise NotInRegistryError(f"no adapter named {ref.name!r} in the registry at {self.home} "
                                         f"({self._names_hint()})")
            return [row]
        if ref.kind == "version":
            row = self.index.one("SELECT * FROM versions WHERE name = ? AND version = ?", (ref.name, ref.version))
            if row is None:
                have = [str(r["version"]) for r in self.index.query(
                    "SELECT version FROM versions WHERE name = ? ORDER BY version", (ref.name,))]
                why = (f"{ref.name} has versions {listed(have, _LIST_LIMIT, ', ')}" if have
                       else f"no adapter named {ref.name!r}; {self._names_hint()}")
                raise NotInRegistryError(f"no version {ref.version} of {ref.name!r} in the registry at "
                                         f"{self.home} ({why})")
            return [row]
        row = self.index.one("SELECT v.* FROM tags t JOIN versions v ON v.id = t.version_id "
                             "WHERE t.name = ? AND t.tag = ?", (ref.name, ref.tag))
        if row is None:
            have = [r["tag"] for r in self.index.query("SELECT tag FROM tags WHERE name = ? ORDER BY tag", (ref.name,))]
            why = f"its tags: {listed(have, _LIST_LIMIT, ', ')}" if have else "it has no tags"
            raise NotInRegistryError(f"no tag {ref.tag!r} on {ref.name!r} in the registry at {self.home} ({why})")
        return [row]

    def find_version(self, ref: Ref | str) -> sqlite3.Row:
        """Exactly one version; a digest held by several versions is ambiguous."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        rows = self.find_versions(ref)
        if len(rows) > 1:
            raise AmbiguousRefError(f"{ref.text} is ambiguous: {len(rows)} versions hold this content: "
                                    f"{listed([_ref(r) for r in rows], _LIST_LIMIT, ', ')}; name one of them")
        return rows[0]

    # -- reading ------------------------------------------------------------------------------
    def tree(self, digest: str) -> Tree:
        what = f"adapter sha256:{digest[:12]}…"
        data = self.store.read_bytes(digest, what=what)
        try:
            return Tree.model_validate(parse_json(data, what, what="adapter tree"))
        except ValidationError:  # the index names a blob that is not a tree: a damaged index
            raise InputError(f"{what}: the registry index points at blob {self.store.path(digest)}, which is not "
                             "an adapter's file list; run `loratool registry verify`") from None

    def manifest(self, digest: str):
        """The stored manifest (``loratool.json``) of an adapter, else None."""
        from loratool.manifest import parse_manifest

        row = self.index.one("SELECT manifest_path FROM adapters WHERE digest = ?", (digest,))
        if row is None or row["manifest_path"] is None:
            return None
        blob = self.index.one("SELECT blob FROM files WHERE digest = ? AND path = ?", (digest, row["manifest_path"]))
        data = self.store.read_bytes(blob["blob"], what=f"manifest of sha256:{digest[:12]}…")
        return parse_manifest(data, f"registry manifest of sha256:{digest[:12]}…")

    def _entries(self, where: str = "", params: tuple = ()) -> list[Entry]:
        rows = self.index.query(
            "SELECT v.id AS vid, v.name, v.version, v.source_kind, v.source, v.source_revision, v.added_at, a.* "
            f"FROM versions v JOIN adapters a ON a.digest = v.digest {where} ORDER BY v.name, v.version", params)
        tags: dict[int, list[str]] = {}
        for t in self.index.query("SELECT tag, version_id FROM tags ORDER BY tag"):
            tags.setdefault(t["version_id"], []).append(t["tag"])
        latest = {r["name"]: r["v"] for r in self.index.query("SELECT name, max(version) AS v FROM versions GROUP BY name")}
        out = []
        for r in rows:
            base = None
            if any(r[k] for k in ("base_name", "base_repo", "base_structure", "base_content")):
                base = BaseInfo(name=r["base_name"], repo_id=r["base_repo"], revision=r["base_revision"],
                                structure=r["base_structure"], content=r["base_content"])
            out.append(Entry(
                name=r["name"], version=r["version"], ref=_ref(r), tags=tags.get(r["vid"], []),
                latest=latest.get(r["name"]) == r["version"], digest=r["digest"], format=r["format"],
                size=r["size"], num_modules=r["num_modules"], num_params=r["num_params"],
                ranks=json.loads(r["ranks"]), alphas=json.loads(r["alphas"]), targets=json.loads(r["targets"]),
                base_model=r["base_model"], base=base, has_manifest=r["manifest_path"] is not None,
                source=Source(kind=r["source_kind"], location=r["source"], revision=r["source_revision"]),
                added_at=r["added_at"],
            ))
        return out

    def entries(self, name: str | None = None, fits: Any = None, api: Any = None) -> ListReport:
        """Every version (of ``name``). ``fits``: a base (path, ``hf://`` reference or
        ``BaseFingerprint``): only adapters whose manifest records that base's content
        fingerprint, or at least its structure fingerprint (headers only for a local base)."""
        where, params = ("WHERE v.name = ?", (validate_name(name),)) if name else ("", ())
        entries = self._entries(where, params)
        if fits is None:
            return ListReport(adapters=entries)
        from loratool.fingerprint import fingerprint_base
        from loratool.schemas.manifest import BaseFingerprint

        fp = fits if isinstance(fits, BaseFingerprint) else fingerprint_base(
            fits, cache=HashCache(self.home), content=False, api=api)
        kept = []
        for e in entries:
            if e.base is None:
                continue
            if fp.content and e.base.content == fp.content:
                kept.append(e.model_copy(update={"fits": "content"}))
            elif fp.structure and e.base.structure == fp.structure:
                kept.append(e.model_copy(update={"fits": "structure"}))
        return ListReport(adapters=kept)

    def details(self, ref: str) -> Details:
        rows = self.find_versions(ref)
        first = rows[0]
        entry = self._entries("WHERE v.id = ?", (first["id"],))[0]
        digest = entry.digest
        same = [_ref(r) for r in self.index.query(
            "SELECT name, version FROM versions WHERE digest = ? AND id != ? ORDER BY name, version",
            (digest, first["id"]))]
        adapter = self.index.one("SELECT tensors_digest FROM adapters WHERE digest = ?", (digest,))
        tensors = adapter["tensors_digest"]

        def holders(tensors_digest: str) -> list[str]:
            return [_ref(r) for r in self.index.query(
                "SELECT v.name, v.version FROM versions v JOIN adapters a ON a.digest = v.digest "
                "WHERE a.tensors_digest = ? ORDER BY v.name, v.version", (tensors_digest,))]

        lineage = [LineageEdge(step=r["step"], operation=r["operation"], parent=r["parent"],
                               in_registry=holders(r["parent"]))
                   for r in self.index.query("SELECT * FROM lineage WHERE digest = ? ORDER BY step, parent", (digest,))]
        children = [_ref(r) for r in self.index.query(
            "SELECT DISTINCT v.name, v.version FROM lineage l JOIN versions v ON v.digest = l.digest "
            "WHERE l.parent = ? AND l.digest != ? ORDER BY v.name, v.version", (tensors, digest))] if tensors else []
        tree = self.tree(digest)
        return Details(entry=entry, files=tree.files, same_content=same, tensors_digest=tensors,
                       lineage=lineage, children=children, manifest=self.manifest(digest))

    # -- tags and removal ---------------------------------------------------------------------
    def tag(self, ref: str, tag: str) -> TagResult:
        """Point ``name:tag`` at the version ``ref`` names (moving it if it exists: a rollback
        when the version is older)."""
        validate_tag(tag)
        row = self.find_version(ref)

        def move(c: sqlite3.Connection) -> TagResult:
            prev = c.execute("SELECT v.version FROM tags t JOIN versions v ON v.id = t.version_id "
                             "WHERE t.name = ? AND t.tag = ?", (row["name"], tag)).fetchone()
            if c.execute("SELECT 1 FROM versions WHERE id = ?", (row["id"],)).fetchone() is None:
                raise NotInRegistryError(f"{_ref(row)} was removed meanwhile")
            self._set_tag(c, row["name"], tag, row["id"])
            return TagResult(name=row["name"], tag=tag, version=row["version"],
                             previous=prev["version"] if prev else None)

        return self.index.write(move)

    def untag(self, ref: str) -> UntagResult:
        """Remove the tag ``name:tag`` (the version it points at stays)."""
        parsed = parse_ref(ref)
        if parsed.kind != "tag":
            why = ("'latest' is not a tag: it always means the newest version" if parsed.kind == "name"
                   and parsed.text != parsed.name else "untag takes NAME:TAG, e.g. llama:prod")
            raise UsageError(f"{ref}: {why}")
        self.find_version(parsed)  # a missing tag: one line naming the tags the name has

        def delete(c: sqlite3.Connection) -> UntagResult:
            row = c.execute("SELECT v.version FROM tags t JOIN versions v ON v.id = t.version_id "
                            "WHERE t.name = ? AND t.tag = ?", (parsed.name, parsed.tag)).fetchone()
            if row is None:
                raise NotInRegistryError(f"{ref}: the tag was removed meanwhile")
            c.execute("DELETE FROM tags WHERE name = ? AND tag = ?", (parsed.name, parsed.tag))
            return UntagResult(name=parsed.name, tag=parsed.tag, version=row["version"])

        return self.index.write(delete)

    def remove(self, ref: str, all_versions: bool = False) -> RemoveResult:
        """Remove what ``ref`` names: ``name@N``, ``name:tag`` and ``name:latest`` that version;
        ``sha256:…`` every version holding that content; a bare name its only version, or with
        ``all_versions`` every version of it (without, a name with several versions is refused,
        listing them: one mistyped command must not delete a whole history). Tags on removed
        versions go with them; blobs stay until ``gc``. Version numbers are never reused."""
        parsed = parse_ref(ref)
        bare = parsed.kind == "name" and parsed.text == parsed.name
        if all_versions and not bare:
            raise UsageError(f"{ref}: --all removes every version of a name; give the bare name"
                             + (f" ({parsed.name})" if parsed.name else ""))
        if bare:
            rows = self.index.query("SELECT * FROM versions WHERE name = ? ORDER BY version", (parsed.name,))
            if not rows:
                self.find_versions(parsed)  # raises with the names that exist
            if len(rows) > 1 and not all_versions:
                raise UsageError(
                    f"{ref} has {len(rows)} versions ({listed([_ref(r) for r in rows], _LIST_LIMIT, ', ')}); "
                    f"name one ({_ref(rows[-1])}, {ref}:TAG or sha256:…) or pass --all to remove every version")
        else:
            rows = self.find_versions(parsed)
        ids = [r["id"] for r in rows]

        def delete(c: sqlite3.Connection) -> RemoveResult:
            c.executemany("DELETE FROM versions WHERE id = ?", [(i,) for i in ids])
            c.execute("DELETE FROM adapters WHERE digest NOT IN (SELECT digest FROM versions)")
            return RemoveResult(removed=[_ref(r) for r in rows])

        return self.index.write(delete)

    # -- maintenance --------------------------------------------------------------------------
    def _referenced_blobs(self) -> set[str]:
        rows = self.index.query("SELECT blob FROM files UNION SELECT digest FROM adapters")
        return {r[0] for r in rows}

    def gc(self) -> GcResult:
        """Delete blobs no adapter references, leftovers of interrupted adds and materialized
        copies of removed adapters. Holds the store lock exclusively: adds wait."""
        result = GcResult()
        with self.store.lock(exclusive=True):
            keep = self._referenced_blobs()
            for digest, _ in list(self.store.digests()):
                if digest not in keep:
                    result.bytes_freed += self.store.remove(digest)
                    result.blobs_removed += 1
            for t in self.store.temp_files():
                with contextlib.suppress(OSError):
                    t.unlink()
                    result.temp_files_removed += 1
            adapters = {r[0] for r in self.index.query("SELECT digest FROM adapters")}
            if self.materialized.is_dir():
                for d in self.materialized.iterdir():
                    if d.name not in adapters:
                        shutil.rmtree(d, ignore_errors=True)
                        result.materialized_removed += 1
        return result

    def verify(self, workers: int | None = None) -> VerifyReport:
        """Re-hash every blob the index references (files and trees)."""
        blobs: dict[str, list[str]] = {}
        for r in self.index.query(
                "SELECT f.blob AS blob, v.name, v.version FROM files f JOIN versions v ON v.digest = f.digest "
                "UNION SELECT v.digest AS blob, v.name, v.version FROM versions v ORDER BY 2, 3"):
            blobs.setdefault(r["blob"], []).append(_ref(r))
        for r in self.index.query("SELECT blob FROM files UNION SELECT digest FROM adapters"):
            blobs.setdefault(r[0], [])
        corrupt: list[CorruptBlob] = []
        present: dict[Path, str] = {}
        for digest, refs in sorted(blobs.items()):
            p = self.store.path(digest)
            if p.is_file():
                present[p] = digest
            else:
                corrupt.append(CorruptBlob(blob=digest, problem="missing", adapters=sorted(set(refs))))
        found = hash_files(list(present), cache=None, workers=workers)
        checked = 0
        for p, digest in present.items():
            checked += p.stat().st_size
            if found[p] != digest:
                corrupt.append(CorruptBlob(blob=digest, problem="corrupt", adapters=sorted(set(blobs[digest]))))
        corrupt.sort(key=lambda c: c.blob)
        return VerifyReport(blobs_checked=len(blobs), bytes_checked=checked, corrupt=corrupt,
                            temp_files=len(self.store.temp_files()))

    # -- getting adapters out -----------------------------------------------------------------
    def _label(self, digest: str) -> str:
        """The adapter's name@version list, for messages (its short digest when it has none)."""
        names = ", ".join(_ref(r) for r in self.index.query(
            "SELECT name, version FROM versions WHERE digest = ? ORDER BY name, version", (digest,))) \
            if (self.home / DB_FILE).exists() else ""
        return names or f"adapter sha256:{digest[:12]}…"

    def _valid_materialization(self, dest: Path, tree: Tree, what: str) -> bool:
        """Whether ``dest`` holds exactly the adapter's files, as copies of their own (one link
        each, so no blob or other file can be written through them), each of the recorded size
        and sha256. The blobs behind them are hashed too (with the copies, in parallel; adapters
        are small), so a blob that rotted is refused even while an older copy of it is intact.
        Nothing is written: a lookup leaves the registry as it was."""
        expected = {f.path for f in tree.files}
        expected |= {parent.as_posix() for f in tree.files for parent in Path(f.path).parents if parent != Path(".")}
        try:
            present = {(Path(d) / n).relative_to(dest).as_posix()
                       for d, dirs, names in os.walk(dest) for n in dirs + names}
        except ValueError:
            return False
        if present != expected:  # missing files, or a file put there (a loratool.json it never had)
            return False
        files = []
        for f in tree.files:
            try:
                st = os.lstat(dest / f.path)
            except OSError:
                return False
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != f.size:
                return False  # a link (to a blob, as older loratool made them), replaced, truncated
            files.append(f)
        blobs = {self.store.path(f.sha256): f for f in files}
        for p, f in blobs.items():
            if not p.is_file():
                raise self.store._missing(f.sha256, f"{what}: {f.path}")
        copies = {dest / f.path: f for f in files}
        found = hash_files([*blobs, *copies], cache=None)
        for p, f in blobs.items():
            if found[p] != f.sha256:
                raise self.store._corrupt(f.sha256, found[p], f"{what}: {f.path}")
        return all(found[p] == f.sha256 for p, f in copies.items())

    def materialize(self, digest: str) -> Path:
        """A directory holding the adapter's files under ``materialized/<digest>/``, as read-only
        copies of its blobs (reflinks where the filesystem shares extents; never hard links, which
        would let a write to the copy change the blob). Every blob is hashed as it is copied, and
        an existing directory is used again only after its files (and their blobs) check out;
        otherwise it is made again. A blob that rotted raises ``CorruptBlobError`` naming the
        adapter. Returns the directory, or the file inside it for a single-file adapter."""
        tree = self.tree(digest)
        dest = self.materialized / digest
        target = dest if tree.entry == "." else dest / tree.entry
        what = self._label(digest)
        if self._valid_materialization(dest, tree, what):
            return target
        with self.store.lock():
            try:
                if self._valid_materialization(dest, tree, what):
                    return target
                self.materialized.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", suffix=".tmp", dir=self.materialized))
                try:
                    for f in tree.files:
                        out = tmp / f.path
                        out.parent.mkdir(parents=True, exist_ok=True)
                        self.store.clone_to(f.sha256, out, what=f"{what}: {f.path}")
                    if self._valid_materialization(dest, tree, what):  # another process made it meanwhile
                        return target
                    if os.path.lexists(dest):  # stale, tampered with, or links made by an older loratool
                        aside = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.old.", dir=self.materialized))
                        with contextlib.suppress(OSError):
                            os.replace(dest, aside / "old")
                        shutil.rmtree(aside, ignore_errors=True)
                    try:
                        os.replace(tmp, dest)
                    except OSError:  # another process made it first
                        if not self._valid_materialization(dest, tree, what):
                            raise
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError as e:
                raise self.store.cannot_write(e, f"materialize {what}") from None
        return target

    def export(self, ref: str, out: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the adapter at ``out`` as it was added, byte for byte, blob digests checked on the
        way: a folder adapter (PEFT, diffusers) as that folder, its ``loratool.json`` included; a
        single-file adapter (kohya, diffusers) as the file ``out``, with its stored manifest
        beside it. Atomic, through the output boundary (the registry home is never written).
        ``loratool.registry.export.export`` writes it in another format."""
        from loratool.safetensors_io import atomic_dir

        digest = self.resolve_digest(parse_ref(ref))
        tree = self.tree(digest)
        out = Path(out)
        # the registry's own home (whatever --home says) is an input: never written, even with
        # --overwrite, whether OUT is it, lies inside it or contains it
        if tree.entry == ".":  # a folder adapter (PEFT, diffusers), whatever its format
            with atomic_dir(out, overwrite=overwrite, inputs=protected_home(self.home)) as tmp:
                self._copy_files(tree.files, tmp, ref)
            return out
        return self._export_file(ref, tree, out, overwrite)

    def _copy_files(self, files: list[TreeFile], dest: Path, ref: str) -> None:
        for f in files:
            (dest / f.path).parent.mkdir(parents=True, exist_ok=True)
            self.store.copy_to(f.sha256, dest / f.path, what=f"{ref}: {f.path}")

    def _export_file(self, ref: str, tree: Tree, out: Path, overwrite: bool) -> Path:
        """A single-file adapter: its file at ``out`` (read back before it is renamed into place),
        then its stored manifest at ``manifest_path(out)``, where ``load_manifest`` finds it."""
        from loratool.boundary import atomic_path as atomic_file
        from loratool.manifest import SIDECAR_SUFFIX, manifest_path
        from loratool.safetensors_io import atomic_path

        inputs = protected_home(self.home)
        files = {f.path: f for f in tree.files}
        entry, sidecar = files[tree.entry], files.get(tree.entry + SIDECAR_SUFFIX)
        with atomic_path(out, overwrite=overwrite, inputs=inputs) as tmp:
            self.store.copy_to(entry.sha256, tmp, what=f"{ref}: {entry.path}")
        if sidecar is not None:  # it describes OUT, so it replaces an older one there
            with atomic_file(manifest_path(out), overwrite=True, inputs=inputs) as tmp:
                self.store.copy_to(sidecar.sha256, tmp, what=f"{ref}: {sidecar.path}")
        return out

