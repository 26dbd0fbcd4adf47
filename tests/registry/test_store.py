"""The blob store: atomic content-addressed writes, checked reads."""

from __future__ import annotations

import hashlib

import pytest

from loratool.errors import InputError, OutputError
from loratool.registry.store import BlobStore, CorruptBlobError


def test_put_and_read(home, tmp_path):
    store = BlobStore(home)
    src = tmp_path / "f.bin"
    src.write_bytes(b"hello" * 1000)
    digest, size = store.put_file(src)
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest() and size == 5000
    path = store.path(digest)
    assert path == home / "blobs" / "sha256" / digest[:2] / digest[2:]
    assert path.stat().st_mode & 0o222 == 0
    assert store.read_bytes(digest) == src.read_bytes()
    assert store.put_bytes(b"hello" * 1000) == digest  # same content, same blob
    assert [d for d, _ in store.digests()] == [digest]
    assert store.temp_files() == []
    out = tmp_path / "copy"
    store.copy_to(digest, out)
    assert out.read_bytes() == src.read_bytes()


def test_checked_reads(home, tmp_path):
    store = BlobStore(home)
    digest = store.put_bytes(b"abc" * 100)
    path = store.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"abd" * 100)
    for read in (lambda: store.read_bytes(digest, what="x@1"), lambda: store.check(digest, what="x@1"),
                 lambda: store.copy_to(digest, tmp_path / "out", what="x@1")):
        with pytest.raises(CorruptBlobError, match=r"x@1: blob .* is corrupt: its bytes hash to"):
            read()
    assert not (tmp_path / "out").exists()
    path.unlink()
    with pytest.raises(CorruptBlobError, match="is missing"):
        store.read_bytes(digest, what="x@1")


def test_not_a_digest(home):
    with pytest.raises(InputError, match="not a sha256 digest"):
        BlobStore(home).path("../../etc/passwd")


def test_file_changed_since_it_was_hashed_is_refused(home, tmp_path):
    store = BlobStore(home)
    src = tmp_path / "f.bin"
    src.write_bytes(b"now")
    with pytest.raises(InputError, match="changed while it was being added"):
        store.put_file(src, expected=hashlib.sha256(b"was").hexdigest())
    assert store.temp_files() == [] and list(store.digests()) == []


def test_clone_is_a_read_only_copy_never_a_link(home, tmp_path):
    store = BlobStore(home)
    digest = store.put_bytes(b"weights" * 1000)
    out = tmp_path / "copy"
    store.clone_to(digest, out)
    assert out.read_bytes() == b"weights" * 1000
    assert out.stat().st_nlink == 1 and out.stat().st_ino != store.path(digest).stat().st_ino
    assert out.stat().st_mode & 0o222 == 0


def test_clone_of_a_rotted_blob_is_refused(home, tmp_path):
    store = BlobStore(home)
    digest = store.put_bytes(b"abc" * 100)
    path = store.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"abd" * 100)
    with pytest.raises(CorruptBlobError, match=r"x@1: blob .* is corrupt"):
        store.clone_to(digest, tmp_path / "out", what="x@1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("under", [False, True])
def test_home_that_cannot_be_written_is_one_line(tmp_path, under):
    """A home that is a file (or lies under one) stands for a read-only one: tests run as root."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = BlobStore(blocker / "home" if under else blocker)
    src = tmp_path / "f.bin"
    src.write_bytes(b"data")
    for write in (lambda: store.put_file(src), lambda: store.put_bytes(b"data"), lambda: store.lock().__enter__()):
        with pytest.raises(OutputError, match="must be a writable folder"):
            write()
