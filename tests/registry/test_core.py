"""The registry's operations, in process: add, versions, tags, rm, gc, verify, export, --fits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tinybase import base_tensors, save_base

from loratool.errors import InputError, OutputError, UsageError
from loratool.formats import load_adapter
from loratool.manifest import (
    build_manifest,
    lineage_entry,
    load_manifest,
    manifest_path,
    record_manifest,
    write_manifest,
)
from loratool.registry.core import Registry
from loratool.registry.export import export
from loratool.registry.store import CorruptBlobError


def flip_byte(path, offset: int = -1) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_same_content_is_stored_once(make_adapter, reg, blobs):
    src = make_adapter("a")
    first = reg.add(src, "llama")
    assert (first.version, first.created) == (1, True) and first.new_bytes > 0
    n = len(blobs())
    assert n == 3  # config, weights, tree
    again = reg.add(src, "llama")
    assert (again.version, again.created, again.new_bytes, again.digest) == (1, False, 0, first.digest)
    other = reg.add(make_adapter("copy-of-a"), "other-name")  # same bytes elsewhere, another name
    assert other.digest == first.digest and other.new_bytes == 0 and other.version == 1
    assert len(blobs()) == n
    for p in blobs():  # blobs are read-only and named by their sha256
        assert p.stat().st_mode & 0o222 == 0
        import hashlib

        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.parent.name + p.name


def test_versions_count_up_and_are_never_reused(make_adapter, reg):
    a, b, c = (make_adapter(n, seed=i) for i, n in enumerate("abc"))
    assert [reg.add(p, "llama").version for p in (a, b)] == [1, 2]
    assert reg.add(a, "llama").version == 3  # older content again is a new latest version
    reg.remove("llama@3")
    assert reg.add(c, "llama").version == 4
    assert [e.ref for e in reg.entries().adapters] == ["llama@1", "llama@2", "llama@4"]
    assert [e.latest for e in reg.entries().adapters] == [False, False, True]


def test_tags_move_and_roll_back(make_adapter, reg):
    v1 = reg.add(make_adapter("a", seed=1), "llama", tags=["prod"])
    v2 = reg.add(make_adapter("b", seed=2), "llama")
    r = reg.tag("llama@2", "prod")
    assert (r.version, r.previous) == (2, 1)
    assert reg.resolve_digest("llama:prod") == v2.digest
    r = reg.tag("llama@1", "prod")  # rollback
    assert (r.version, r.previous) == (1, 2)
    assert reg.resolve_digest("llama:prod") == v1.digest
    assert reg.resolve_digest("llama") == v2.digest  # latest is unaffected
    assert {e.ref: e.tags for e in reg.entries().adapters} == {"llama@1": ["prod"], "llama@2": []}
    with pytest.raises(UsageError, match="tag"):
        reg.tag("llama@1", "7")


@pytest.mark.parametrize("ref, all_versions, left", [
    ("llama", True, ["other@1"]),
    ("other", False, ["llama@1", "llama@2"]),  # a bare name with one version
    ("llama@1", False, ["llama@2", "other@1"]),
    ("llama:prod", False, ["llama@2", "other@1"]),
    ("llama:latest", False, ["llama@1", "other@1"]),  # one version, not the name
])
def test_rm(make_adapter, reg, ref, all_versions, left):
    reg.add(make_adapter("a", seed=1), "llama", tags=["prod"])
    reg.add(make_adapter("b", seed=2), "llama")
    reg.add(make_adapter("c", seed=3), "other")
    reg.remove(ref, all_versions=all_versions)
    assert [e.ref for e in reg.entries().adapters] == left
    # no dangling tags, no orphan adapters
    assert reg.index.one("SELECT count(*) FROM tags t LEFT JOIN versions v ON v.id = t.version_id "
                         "WHERE v.id IS NULL")[0] == 0
    assert reg.index.one("SELECT count(*) FROM adapters")[0] == len(left)


@pytest.mark.parametrize("ref, all_versions, message", [
    ("llama", False, r"^llama has 2 versions \(llama@1, llama@2\); name one \(llama@2, llama:TAG or sha256:…\) "
                     "or pass --all to remove every version$"),
    ("llama@1", True, r"^llama@1: --all removes every version of a name; give the bare name \(llama\)$"),
    ("llama:latest", True, "give the bare name"),
])
def test_rm_of_several_versions_needs_all(make_adapter, reg, ref, all_versions, message):
    reg.add(make_adapter("a", seed=1), "llama")
    reg.add(make_adapter("b", seed=2), "llama")
    with pytest.raises(UsageError, match=message):
        reg.remove(ref, all_versions=all_versions)
    assert [e.ref for e in reg.entries().adapters] == ["llama@1", "llama@2"]


def test_untag_removes_the_tag_not_the_version(make_adapter, reg):
    reg.add(make_adapter("a"), "llama", tags=["prod", "best"])
    r = reg.untag("llama:prod")
    assert (r.name, r.tag, r.version) == ("llama", "prod", 1)
    assert [(e.ref, e.tags) for e in reg.entries().adapters] == [("llama@1", ["best"])]
    with pytest.raises(InputError, match=r"no tag 'prod' on 'llama' .*\(its tags: best\)$"):
        reg.untag("llama:prod")
    for ref, message in [("llama", "untag takes NAME:TAG"), ("llama@1", "untag takes NAME:TAG"),
                         ("llama:latest", "'latest' is not a tag")]:
        with pytest.raises(UsageError, match=message):
            reg.untag(ref)
    assert [(e.ref, e.tags) for e in reg.entries().adapters] == [("llama@1", ["best"])]


def test_rm_by_digest_removes_every_version_holding_it(make_adapter, reg):
    a = reg.add(make_adapter("a"), "one")
    reg.add(make_adapter("a"), "two")
    assert reg.remove(f"sha256:{a.digest[:10]}").removed == ["one@1", "two@1"]
    with pytest.raises(InputError, match="no adapter named 'one'"):
        reg.remove("one")


def test_gc_keeps_what_is_referenced(make_adapter, reg, home, blobs):
    keep = make_adapter("keep", seed=1)
    reg.add(keep, "keep")
    reg.add(make_adapter("drop", seed=2), "drop")
    reg.materialize(reg.resolve_digest("drop"))
    (home / "blobs" / "tmp" / "adapter_model.safetensors.x.tmp").write_bytes(b"partial")
    before = len(blobs())
    reg.remove("drop")
    r = reg.gc()
    # the config is the same bytes in both (same rank, alpha, targets), so it stays
    assert (r.blobs_removed, r.temp_files_removed, r.materialized_removed) == (2, 1, 1)
    assert len(blobs()) == before - 2 and r.bytes_freed > 0
    assert reg.verify().ok
    assert len(load_adapter(reg.materialize(reg.resolve_digest("keep"))).modules) == 4
    assert reg.gc().blobs_removed == 0


def test_verify_names_corrupt_and_missing_adapters(make_adapter, reg):
    a = reg.add(make_adapter("a", seed=1), "llama")
    reg.add(make_adapter("b", seed=2), "other")
    assert reg.verify().ok
    weights = next(f for f in reg.tree(a.digest).files if f.path == "adapter_model.safetensors")
    flip_byte(reg.store.path(weights.sha256))
    report = reg.verify()
    assert not report.ok and report.bad_adapters == ["llama@1"]
    assert report.corrupt[0].problem == "corrupt" and report.corrupt[0].blob == weights.sha256
    reg.store.path(weights.sha256).unlink()
    assert reg.verify().corrupt[0].problem == "missing"


def test_reading_a_blob_checks_its_digest(make_adapter, reg, tmp_path):
    a = reg.add(make_adapter("a"), "llama")
    weights = next(f for f in reg.tree(a.digest).files if f.path == "adapter_model.safetensors")
    flip_byte(reg.store.path(weights.sha256), offset=200)
    with pytest.raises(CorruptBlobError, match="llama@1: adapter_model.safetensors: blob .* is corrupt"):
        reg.materialize(a.digest)
    with pytest.raises(CorruptBlobError, match="corrupt"):
        reg.export("llama", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    flip_byte(reg.store.path(a.digest))  # the tree blob
    with pytest.raises(CorruptBlobError, match="corrupt"):
        reg.tree(a.digest)


def test_stale_materialization_is_rebuilt(make_adapter, reg, home):
    """A materialized copy that no longer checks out (written through as root, a file put beside
    it, a hard link made by an older loratool) is made again from the blobs; a lost blob is
    refused until an add stores it again."""
    a = reg.add(make_adapter("a"), "llama")
    path = reg.materialize(a.digest)
    weights = next(f for f in reg.tree(a.digest).files if f.path == "adapter_model.safetensors")
    blob = reg.store.path(weights.sha256)
    copy = path / "adapter_model.safetensors"
    want = blob.read_bytes()

    flip_byte(copy)  # written through (root ignores the read-only mode)
    assert reg.materialize(a.digest) == path and copy.read_bytes() == want

    (path / "loratool.json").write_text("{}")  # a manifest the stored adapter never had
    assert reg.materialize(a.digest) == path and not (path / "loratool.json").exists()

    copy.unlink()
    os.link(blob, copy)  # what loratool made before issue 11
    assert reg.materialize(a.digest) == path
    assert not os.path.samefile(copy, blob) and copy.stat().st_nlink == 1

    blob.unlink()  # a lost blob: refused, although the copy is intact
    with pytest.raises(CorruptBlobError, match="llama@1: adapter_model.safetensors: blob .* is missing"):
        reg.materialize(a.digest)
    reg.add(make_adapter("a"), "llama")  # stores it again
    assert reg.verify().ok
    assert reg.materialize(a.digest) == path and copy.read_bytes() == want
    assert sorted(p.name for p in (home / "materialized").iterdir()) == [a.digest]  # no leftovers


def test_export_is_byte_exact_peft(make_adapter, reg, tmp_path):
    src = make_adapter("a")
    reg.add(src, "llama")
    out = reg.export("llama", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
        assert os.access(out / name, os.W_OK)
    with pytest.raises(OutputError, match="already exists"):
        reg.export("llama", out)
    reg.export("llama", out, overwrite=True)


def test_export_gives_a_kohya_file_back_as_added(kohya_file, reg, tmp_path):
    src = kohya_file("style.safetensors")
    write_manifest(build_manifest(src), src)  # style.safetensors.loratool.json beside it
    reg.add(src, "style")
    out = reg.export("style", tmp_path / "mine.safetensors")
    assert out.read_bytes() == src.read_bytes()
    assert manifest_path(out).read_bytes() == manifest_path(src).read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        reg.export("style", out)
    with pytest.raises(UsageError, match=f"the output lies inside the input {reg.home};"):
        reg.export("style", reg.home / "x.safetensors")
    assert load_adapter(out).format == "kohya" and load_manifest(out).adapter.format == "kohya"


def test_export_converts_to_another_format(kohya_file, reg, home, tmp_path):
    src = kohya_file()
    reg.add(src, "style")
    r = export("style", tmp_path / "peft", format="peft", home=home)
    assert (r.format, r.source_format, r.converted, r.output) == ("peft", "kohya", True, tmp_path / "peft")
    peft, kohya = load_adapter(r.output), load_adapter(src)
    assert peft.format == "peft" and sorted(peft.modules) == sorted(kohya.modules)
    for name, m in kohya.modules.items():
        assert torch.equal(peft.modules[name].delta(), m.delta())
    assert load_manifest(r.output).lineage[-1].operation == "converted"
    # the format it was added in: the stored file, whether --format names it or not
    for fmt in (None, "kohya"):
        same = export("style", tmp_path / f"{fmt}.safetensors", format=fmt, home=home)
        assert (same.format, same.converted) == ("kohya", False)
        assert same.output.read_bytes() == src.read_bytes()
    with pytest.raises(UsageError, match="unknown format 'ckpt'"):
        export("style", tmp_path / "x", format="ckpt", home=home)


def test_manifest_base_lineage_and_fits(tmp_path, make_adapter, reg):
    base = save_base(tmp_path / "base", base_tensors())
    other = save_base(tmp_path / "other", base_tensors(inter=40))  # another structure
    resaved = save_base(tmp_path / "resaved", base_tensors(seed=5))  # same structure, other content
    parent = make_adapter("parent", seed=1)
    record_manifest(parent, base)
    child = make_adapter("child", seed=2)
    pm = load_manifest(parent)
    write_manifest(build_manifest(child, base_fp=pm.base, lineage=[
        *pm.lineage, lineage_entry("resized", inputs=[pm], params={"rank": 4})]), child)
    reg.add(parent, "parent")
    reg.add(child, "child")
    reg.add(make_adapter("plain", seed=3), "plain")  # no manifest: fits nothing

    e = {x.name: x for x in reg.entries().adapters}
    assert e["parent"].base.name == "tiny-org/tiny-llama" and e["parent"].has_manifest
    assert e["plain"].base is None and not e["plain"].has_manifest

    from loratool.fingerprint import fingerprint_base

    fits = reg.entries(fits=fingerprint_base(base, content=True)).adapters
    assert [(x.name, x.fits) for x in fits] == [("child", "content"), ("parent", "content")]
    fits = reg.entries(fits=str(base)).adapters  # a path: headers only
    assert [(x.name, x.fits) for x in fits] == [("child", "structure"), ("parent", "structure")]
    assert [x.name for x in reg.entries(fits=str(resaved)).adapters] == ["child", "parent"]
    assert reg.entries(fits=str(other)).adapters == []
    assert [x.ref for x in reg.entries(name="child").adapters] == ["child@1"]

    d = reg.details("child")
    assert d.lineage[-1].operation == "resized" and d.lineage[-1].in_registry == ["parent@1"]
    assert d.manifest is not None and d.manifest.base.structure == pm.base.structure
    assert reg.details("parent").children == ["child@1"]
    # the manifest is part of the content, and export gives it back
    assert "loratool.json" in [f.path for f in d.files]
    out = reg.export("child", tmp_path / "out")
    assert json.loads((out / "loratool.json").read_text()) == json.loads((child / "loratool.json").read_text())


def test_add_refuses_bad_names_before_writing(make_adapter, reg, home, blobs):
    with pytest.raises(UsageError, match="registry name"):
        reg.add(make_adapter("a"), "../evil")
    with pytest.raises(UsageError, match="tag"):
        reg.add(make_adapter("a"), "ok", tags=["1"])
    assert blobs() == []


def test_add_of_a_broken_adapter_stores_nothing(tmp_path, reg, blobs):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match="adapter_model.safetensors is missing"):
        reg.add(bad, "bad")
    assert blobs() == [] and reg.entries().adapters == []


def test_registry_from_default_home(make_adapter, tmp_path):
    from loratool.fingerprint import default_home

    home = default_home({"LORATOOL_HOME": str(tmp_path / "env-home")})
    with Registry(home) as r:
        r.add(make_adapter("a"), "x")
    assert (tmp_path / "env-home" / "registry.db").exists()
