"""The content-addressed blob store under ``$LORATOOL_HOME``.

Layout (``home`` is ``loratool.boundary.default_home()`` unless given)::

    blobs/sha256/ab/cdef…     one file per distinct content, named by its sha256 (2 + 62 hex)
    blobs/tmp/                blobs being written (a kill -9 leaves them here; ``gc`` removes them)
    materialized/<digest>/    read-only copies of an adapter's blobs (reflinks where possible)
    registry.db               the SQLite index (``loratool.registry.index``)
    registry.lock             ``flock``: writers of blobs hold it shared, ``gc`` exclusive

A blob is written to a temporary file in ``blobs/tmp`` while it is hashed, fsynced, made read-only
and renamed into place, so a blob path only ever holds complete content (the rename is atomic and
the temporary file is on the same filesystem). Readers check the digest of what they read.

Materialized files are never hard links to blobs (issue 11): a link shares the inode, so anyone
who may write it (root, or after a chmod) would change the blob through it. They are copies (a
reflink, ``FICLONE``, where the filesystem shares extents copy-on-write; a byte copy elsewhere),
hashed as they are made and made read-only.

Files of the store are the registry's own, so it reads and writes them directly; the sources of
``put_file`` are the user's, opened through ``loratool.boundary.open_regular``. Every ``OSError``
of a write (a read-only or missing ``$LORATOOL_HOME``) becomes one ``OutputError`` line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from loratool.boundary import fsync_dir, open_regular
from loratool.errors import CorruptBlobError, InputError, OutputError
from loratool.fingerprint import sha256_file

CHUNK = 8 * 1024 * 1024
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
READ_ONLY = 0o444
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int): share the source's extents, copy-on-write


def copy_hashed(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy a stream, returning (sha256, size) of what was copied."""
    h = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return h.hexdigest(), size


class BlobStore:
    def __init__(self, home: str | os.PathLike):
        self.home = Path(home)
        self.root = self.home / "blobs" / "sha256"
        self.tmp = self.home / "blobs" / "tmp"
        self.lock_file = self.home / "registry.lock"

    # -- paths --------------------------------------------------------------------------------
    def path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise InputError(f"{digest!r} is not a sha256 digest (64 lowercase hex characters)")
        return self.root / digest[:2] / digest[2:]

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.path(digest).stat()
        except OSError:
            return False
        return size is None or st.st_size == size

    def digests(self) -> Iterator[tuple[str, Path]]:
        """Every blob on disk: (digest, path). Names that are not digests are skipped."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir() or not re.fullmatch(r"[0-9a-f]{2}", sub.name):
                continue
            for f in sorted(sub.iterdir()):
                digest = sub.name + f.name
                if DIGEST_RE.match(digest) and f.is_file():
                    yield digest, f

    def temp_files(self) -> list[Path]:
        return sorted(self.tmp.iterdir()) if self.tmp.is_dir() else []

    # -- locking ------------------------------------------------------------------------------
    def cannot_write(self, e: OSError, what: str = "write to the registry") -> OutputError:
        """One line for an ``OSError`` on the registry's own files (a read-only ``$LORATOOL_HOME``,
        one that is a file, a full disk)."""
        where = e.filename or self.home
        return OutputError(f"{where}: cannot {what} ({e.strerror or e}); $LORATOOL_HOME must be a writable "
                           "folder: fix its permissions or point LORATOOL_HOME (or --home) elsewhere")

    @contextlib.contextmanager
    def lock(self, exclusive: bool = False) -> Iterator[None]:
        """Writers of blobs (add, materialize) hold the store lock shared; ``gc`` holds it
        exclusive, so it never deletes a blob that an add has written but not yet indexed. The
        kernel releases an ``flock`` when its process dies, kill -9 included."""
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise self.cannot_write(e, "lock the registry") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # -- writing ------------------------------------------------------------------------------
    def _commit_temp(self, tmp: Path, digest: str) -> None:
        dest = self.path(digest)
        if dest.exists():  # same content already stored (by us or a concurrent add)
            tmp.unlink(missing_ok=True)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, READ_ONLY)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)

    def put_file(self, src: str | os.PathLike, expected: str | None = None) -> tuple[str, int]:
        """Store a file's bytes; return (sha256, size). With ``expected`` (the digest found by an
        earlier hash) a blob already present is not written again, and a file that changed since
        is refused."""
        src = Path(src)
        fin = open_regular(src)  # the user's file: a FIFO or a device is refused without a read
        try:
            st = os.fstat(fin)
            if expected and self.has(expected, st.st_size):
                return expected, st.st_size
            with self._staging(src.name, str(src)) as (fd, tmp):
                with os.fdopen(fin, "rb", closefd=False) as r, os.fdopen(fd, "wb") as fout:
                    digest, size = copy_hashed(r, fout)
                    fout.flush()
                    os.fsync(fout.fileno())
                if expected and digest != expected:
                    raise InputError(f"{src}: changed while it was being added (sha256 {digest[:12]}…, "
                                     f"was {expected[:12]}…); add it again once nothing writes to it")
                self._commit_temp(tmp, digest)
        finally:
            os.close(fin)
        return digest, size

    def put_bytes(self, data: bytes, label: str = "blob") -> str:
        digest = hashlib.sha256(data).hexdigest()
        if self.has(digest, len(data)):
            return digest
        with self._staging(label, "a blob") as (fd, tmp):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._commit_temp(tmp, digest)
        return digest

    @contextlib.contextmanager
    def _staging(self, label: str, what: str):
        """A temporary file in the store for one blob, removed unless committed; I/O errors
        (creating it included) become one-line OutputErrors naming ``what``."""
        tmp: Path | None = None
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", label)[:60]
            fd, name = tempfile.mkstemp(prefix=f"{safe}.", suffix=".tmp", dir=self.tmp)
            tmp = Path(name)
            yield fd, tmp
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise self.cannot_write(e, f"store {what}") from None
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise

    # -- reading (every read checks the digest) ----------------------------------------------
    def _missing(self, digest: str, what: str) -> CorruptBlobError:
        return CorruptBlobError(f"{what}: blob sha256:{digest[:12]}… is missing from {self.root}; "
                                "run `loratool registry verify`")

    def _corrupt(self, digest: str, found: str, what: str) -> CorruptBlobError:
        return CorruptBlobError(f"{what}: blob {self.path(digest)} is corrupt: its bytes hash to "
                                f"{found[:12]}…, not {digest[:12]}…; run `loratool registry verify`")

    def read_bytes(self, digest: str, what: str = "registry") -> bytes:
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise self._missing(digest, what) from None
        found = hashlib.sha256(data).hexdigest()
        if found != digest:
            raise self._corrupt(digest, found, what)
        return data

    def check(self, digest: str, what: str = "registry") -> None:
        """Re-hash a blob; raise ``CorruptBlobError`` when it is missing or its bytes changed."""
        p = self.path(digest)
        if not p.is_file():
            raise self._missing(digest, what)
        found = sha256_file(p)
        if found != digest:
            raise self._corrupt(digest, found, what)

    def copy_to(self, digest: str, dest: Path, what: str = "registry") -> None:
        """Copy a blob to ``dest`` (a new, writable file), checking its digest on the way."""
        try:
            with open(self.path(digest), "rb") as fin, open(dest, "wb") as fout:
                found, _ = copy_hashed(fin, fout)
        except FileNotFoundError:
            raise self._missing(digest, what) from None
        if found != digest:
            dest.unlink(missing_ok=True)
            raise self._corrupt(digest, found, what)

    def clone_to(self, digest: str, dest: Path, what: str = "registry") -> None:
        """A new read-only file ``dest`` with a blob's bytes, never a hard link to it: a reflink
        where the filesystem can (no bytes copied; a later write to either copies the extent), a
        byte copy elsewhere. The copy is hashed before it is kept, so a blob that rotted is
        refused here (``CorruptBlobError``) and ``dest`` is removed."""
        try:
            src = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._missing(digest, what) from None
        try:
            out = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except BaseException:
            os.close(src)
            raise
        try:
            try:
                try:
                    fcntl.ioctl(out, FICLONE, src)
                    found = None
                except OSError as e:  # no reflinks here (ext4, tmpfs, another filesystem): copy
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                                       errno.ENOSYS, errno.EPERM, errno.EBADF):
                        raise
                    with os.fdopen(src, "rb", closefd=False) as r, os.fdopen(out, "wb", closefd=False) as w:
                        found, _ = copy_hashed(r, w)
                os.fsync(out)
            finally:
                os.close(out)
                os.close(src)
            if found is None:
                found = sha256_file(dest)
            if found != digest:
                raise self._corrupt(digest, found, what)
            os.chmod(dest, READ_ONLY)
        except BaseException:
            with contextlib.suppress(OSError):
                dest.unlink()
            raise

    # -- removal ------------------------------------------------------------------------------
    def remove(self, digest: str) -> int:
        """Delete a blob; return the bytes freed (0 when it was not there)."""
        p = self.path(digest)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        with contextlib.suppress(OSError):
            p.parent.rmdir()  # only when empty
        return size

