"""Tree blobs are canonical JSON (``loratool.canonical``), and trees written before issue 12 keep
their digests.

Before issue 12 ``Tree.canonical`` was ``json.dumps(sort_keys=True, separators=(",", ":"))``
with the default ``ensure_ascii=True``; ``canonical_json`` writes UTF-8. The two agree byte for
byte on every tree whose text is below U+007F, and differ only in how they write a path with a
character from U+007F (DEL) up: ``\\u007f``, ``\\u00fc`` against the raw UTF-8 bytes. A registry digest is the sha256 of the stored blob and is
never recomputed, so an old tree resolves and verifies as it is; ``add`` finds it by content.
"""

from __future__ import annotations

import json
import os

import pytest

from loratool.canonical import canonical_bytes
from loratool.errors import InputError
from loratool.schemas.registry import Tree, TreeFile


def old_canonical(tree: Tree) -> bytes:
    """``Tree.canonical`` as it was before issue 12, verbatim."""
    data = tree.model_dump()
    data["files"] = sorted(data["files"], key=lambda f: f["path"])
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _tree(entry: str, *paths: str, fmt: str = "kohya") -> Tree:
    return Tree(format=fmt, entry=entry, files=[
        TreeFile(path=p, sha256=f"{i:064x}", size=i * 2**40) for i, p in enumerate(paths)])


ASCII_TREES = [
    _tree(".", "adapter_model.safetensors", "adapter_config.json", "loratool.json", fmt="peft"),
    _tree(".", "unet/adapter_model.safetensors", "text_encoder/adapter_model.safetensors", fmt="peft"),
    _tree("a b\"c\\d.safetensors", "a b\"c\\d.safetensors", "a b\"c\\d.safetensors.loratool.json"),
    _tree("tab\there\x1f.safetensors", "tab\there\x1f.safetensors"),  # control characters: escaped by both
]


@pytest.mark.parametrize("tree", ASCII_TREES, ids=lambda t: t.entry)
def test_ascii_trees_are_the_same_bytes_as_before(tree):
    assert tree.canonical() == old_canonical(tree) == canonical_bytes(json.loads(old_canonical(tree)))


@pytest.mark.parametrize("name, escape", [("stil_ü_東京", b"\\u00fc"), ("del\x7f", b"\\u007f")])
def test_trees_from_u007f_up_differ_only_in_escapes(name, escape):
    tree = _tree(f"{name}.safetensors", f"{name}.safetensors", f"{name}.safetensors.loratool.json")
    new, old = tree.canonical(), old_canonical(tree)
    assert new != old and name.encode() in new and escape in old and old.isascii()
    assert json.loads(new) == json.loads(old)
    assert Tree.model_validate_json(old) == tree


def test_a_tree_written_before_issue_12_keeps_its_digest(reg, kohya_file, blobs, monkeypatch):
    src = kohya_file("stil_ü_東京.safetensors")
    with monkeypatch.context() as m:  # the registry as the code before issue 12 wrote it
        m.setattr(Tree, "canonical", old_canonical)
        old = reg.add(src, "style", tags=["prod"])
    stored = reg.store.read_bytes(old.digest)
    tree = reg.tree(old.digest)
    assert stored == old_canonical(tree) != tree.canonical()  # so the new bytes would be a new digest
    rows = lambda: [tuple(r) for t in ("adapters", "files", "versions", "tags")  # noqa: E731
                    for r in reg.index.query(f"SELECT * FROM {t}")]
    before_rows, before_blobs = rows(), blobs()

    # reads: the old digest resolves and verifies, the file comes out under its own name
    assert reg.resolve_digest(f"sha256:{old.digest[:12]}") == reg.resolve_digest("style:prod") == old.digest
    assert [f.path for f in reg.details("style").files] == [src.name]
    assert reg.verify().ok
    out = reg.materialize(old.digest)
    assert out.name == src.name and out.read_bytes() == src.read_bytes()
    assert (rows(), blobs()) == (before_rows, before_blobs)  # nothing rewritten

    # the same adapter again: the old digest, no second version, no second tree blob
    again = reg.add(src, "style")
    assert (again.version, again.created, again.digest, again.new_bytes) == (1, False, old.digest, 0)
    assert reg.add(src, "copy").digest == old.digest
    assert reg.index.one("SELECT count(*) FROM adapters")[0] == 1 and blobs() == before_blobs
    assert reg.verify().ok

    # once it is gone, the same content is stored with the canonical (UTF-8) tree
    reg.remove("style")
    reg.remove("copy")
    reg.gc()
    new = reg.add(src, "style")
    assert new.digest != old.digest and reg.store.read_bytes(new.digest) == tree.canonical()


def test_a_file_name_that_is_not_utf8_is_refused_before_anything_is_stored(reg, kohya_file, blobs):
    src = kohya_file("good.safetensors")
    bad = src.with_name(os.fsdecode(b"bad\xff.safetensors"))
    src.rename(bad)
    with pytest.raises(InputError, match=r"the file name is not valid UTF-8 \(b'bad\\xff.safetensors'\)"):
        reg.add(bad, "bad")
    assert blobs() == []
