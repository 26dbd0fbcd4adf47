"""References: parsing, validation, weights, and resolution to a path load_adapter reads."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from loratool.errors import InputError, UsageError
from loratool.formats import load_adapter
from loratool.registry.core import AmbiguousRefError, Registry
from loratool.registry.refs import parse_ref, split_weight, validate_name, validate_tag
from loratool.resolve import resolve_adapter_ref


@pytest.mark.parametrize("text, kind, fields", [
    ("llama-sql", "name", {"name": "llama-sql"}),
    ("team/llama-sql", "name", {"name": "team/llama-sql"}),
    ("llama-sql:latest", "name", {"name": "llama-sql"}),
    ("llama-sql@3", "version", {"name": "llama-sql", "version": 3}),
    ("llama-sql:prod", "tag", {"name": "llama-sql", "tag": "prod"}),
    ("sha256:ABCD12", "digest", {"digest": "abcd12"}),
    ("hf://owner/repo", "hub", {"repo_id": "owner/repo", "revision": None}),
    ("hf://owner/repo@v1.0", "hub", {"repo_id": "owner/repo", "revision": "v1.0"}),
])
def test_parse_ref(text, kind, fields):
    ref = parse_ref(text)
    assert ref.kind == kind
    for k, v in fields.items():
        assert getattr(ref, k) == v


@pytest.mark.parametrize("name", [
    "", "../etc", "a/../b", "/abs", "a//b", "a/", ".hidden", "-x", "a b", "a\x00b", "a\nb", "a\x1bb",
    "x@1", "x:y", "sha256", "hf", "é", "a" * 201,
])
def test_invalid_names(name):
    with pytest.raises(UsageError, match="registry name"):
        validate_name(name)


@pytest.mark.parametrize("tag", ["", "3", "1.0", "latest", "-x", "a/b", "a:b", "a\tb", "x" * 65])
def test_invalid_tags(tag):
    with pytest.raises(UsageError, match="tag"):
        validate_tag(tag)


@pytest.mark.parametrize("text, match", [
    ("x@0", "version after '@'"), ("x@v2", "version after '@'"), ("sha256:12", "4 to 64 hex"),
    ("sha256:xyz1", "4 to 64 hex"), ("x:3", "tag"), ("hf://a/b/c", "Hub reference"),
])
def test_malformed_refs(text, match):
    with pytest.raises((UsageError, InputError), match=match):
        parse_ref(text)


@pytest.mark.parametrize("spec, expected", [
    ("llama:prod:0.5", ("llama:prod", 0.5)),
    ("llama:-1", ("llama", -1.0)),
    ("llama@2:1e-1", ("llama@2", 0.1)),
    ("llama:prod", ("llama:prod", None)),
    ("sha256:1234", ("sha256:1234", None)),  # a digest prefix, not "sha256" weighted 1234
    ("sha256:1234:0.5", ("sha256:1234", 0.5)),
    ("hf://o/r@main:2", ("hf://o/r@main", 2.0)),
])
def test_split_weight(spec, expected):
    assert split_weight(spec) == expected


def test_split_weight_existing_path_wins(tmp_path):
    p = tmp_path / "odd:2"
    p.mkdir()
    assert split_weight(str(p)) == (str(p), None)


def test_existing_path_is_returned_without_opening_the_registry(make_adapter, home):
    src = make_adapter("a")
    assert resolve_adapter_ref(str(src), home=home) == src
    assert resolve_adapter_ref(src, home=home) == src
    assert not home.exists()  # no database created, nothing opened


def test_local_path_wins_over_a_name(make_adapter, reg, home, monkeypatch, tmp_path):
    reg.add(make_adapter("a", seed=1), "same")
    local = make_adapter("same", seed=2)
    monkeypatch.chdir(local.parent)  # "same" is now also a relative path
    assert resolve_adapter_ref("same", home=home) == local.relative_to(local.parent)


def test_references_resolve_to_readable_materializations(make_adapter, reg, home):
    a, b = make_adapter("a", seed=1), make_adapter("b", seed=2)
    v1 = reg.add(a, "llama", tags=["prod"])
    v2 = reg.add(b, "llama")
    cases = {"llama": (v2, b), "llama:latest": (v2, b), "llama@1": (v1, a), "llama@2": (v2, b),
             "llama:prod": (v1, a), f"sha256:{v1.digest[:6]}": (v1, a), f"sha256:{v2.digest}": (v2, b)}
    for ref, (added, src) in cases.items():
        path = resolve_adapter_ref(ref, home=home)
        assert path == home / "materialized" / added.digest, ref
        got = load_file(path / "adapter_model.safetensors")
        want = load_file(src / "adapter_model.safetensors")
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got), ref
        assert len(load_adapter(path).modules) == 4


def test_materialization_is_read_only_copies_and_reused(make_adapter, reg, home):
    added = reg.add(make_adapter("a"), "llama")
    path = resolve_adapter_ref("llama", home=home)
    weights = path / "adapter_model.safetensors"
    assert not os.access(weights, os.W_OK) or os.geteuid() == 0
    assert weights.stat().st_mode & 0o222 == 0
    blob = reg.store.path(next(f.sha256 for f in reg.tree(added.digest).files if f.path == weights.name))
    # a copy (or a reflink), never a hard link: writing it cannot change the blob
    assert not os.path.samefile(weights, blob) and weights.stat().st_nlink == 1
    assert weights.read_bytes() == blob.read_bytes()
    ino = weights.stat().st_ino
    assert resolve_adapter_ref("llama", home=home) == path
    assert (path / "adapter_model.safetensors").stat().st_ino == ino  # checked and used again


def test_single_file_adapter_resolves_to_the_file(tmp_path, reg, home):
    import torch
    from safetensors.torch import save_file

    t = {}
    for i in range(2):
        k = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        t[k + ".lora_down.weight"] = torch.randn(4, 16)
        t[k + ".lora_up.weight"] = torch.randn(16, 4)
        t[k + ".alpha"] = torch.tensor(4.0)
    src = tmp_path / "style.safetensors"
    save_file(t, str(src))
    added = reg.add(src, "style")
    path = resolve_adapter_ref("style", home=home)
    assert path == home / "materialized" / added.digest / "style.safetensors"
    assert load_adapter(path).format == "kohya"


def test_unknown_references_name_what_exists(make_adapter, reg, home):
    reg.add(make_adapter("a"), "llama", tags=["prod"])
    for ref, match in [("nope", r"no adapter named 'nope'.*registered: llama"),
                       ("llama@7", r"no version 7 of 'llama'.*versions 1"),
                       ("llama:dev", r"no tag 'dev' on 'llama'.*prod"),
                       ("sha256:0000", "no adapter .* digest starting with 0000"),
                       ("no/such/dir", "no such file or directory")]:
        with pytest.raises(InputError, match=match):
            resolve_adapter_ref(ref, home=home)


def test_no_registry_yet(home):
    with pytest.raises(InputError, match="no such file or directory, and there is no registry"):
        resolve_adapter_ref("llama", home=home)
    assert not (home / "registry.db").exists()


def test_ambiguous_digest_prefix_lists_candidates(make_adapter, reg, home):
    # Two digests sharing a 4-digit prefix would take ~300 adapters to meet by chance; write the
    # index rows directly (the lookup only reads the index).
    row = {"format": "peft", "entry": ".", "size": 0, "num_modules": 0, "num_params": 0, "ranks": "[]",
           "alphas": "[]", "targets": "[]", "created_at": "t"}
    digests = ["abcd" + "0" * 60, "abcd" + "1" * 60]

    def insert(c):
        for i, d in enumerate(digests):
            c.execute("INSERT INTO adapters (digest, format, entry, size, num_modules, num_params, ranks, alphas, "
                      "targets, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [d, *row.values()])
            c.execute("INSERT INTO names (name, next_version) VALUES (?, 2)", (f"n{i}",))
            c.execute("INSERT INTO versions (name, version, digest, source_kind, source, added_at) "
                      "VALUES (?, 1, ?, 'path', '/x', 't')", (f"n{i}", d))

    reg.index.write(insert)
    with pytest.raises(AmbiguousRefError, match=r"2 adapters match: sha256:abcd0000.*\(n0@1\), sha256:abcd1111.*\(n1@1\)"):
        reg.resolve_digest("sha256:abcd")
    assert reg.resolve_digest("sha256:abcd1") == digests[1]


def test_digest_held_by_two_names_is_ambiguous_for_tag(make_adapter, reg):
    added = reg.add(make_adapter("a"), "one")
    reg.add(make_adapter("a"), "two")
    with pytest.raises(AmbiguousRefError, match="one@1, two@1"):
        reg.tag(f"sha256:{added.digest[:8]}", "prod")
    # ...but it resolves to content fine
    assert reg.resolve_digest(f"sha256:{added.digest[:8]}") == added.digest


def test_registry_without_create_does_not_make_one(home):
    with Registry(home, create=False) as r, pytest.raises(InputError, match="no registry"):
        r.find_versions("x")
    assert not home.exists()


def test_every_error_class_lives_in_errors_py():
    """One error hierarchy in one module (issue 12): the registry's errors are importable from
    where they were raised, and are the classes of ``loratool.errors``."""
    import importlib
    import pkgutil

    import loratool
    import loratool.errors as errors
    from loratool.registry.core import AmbiguousRefError, NotInRegistryError
    from loratool.registry.index import IndexLockedError
    from loratool.registry.store import CorruptBlobError

    assert (NotInRegistryError, AmbiguousRefError, CorruptBlobError, IndexLockedError) == (
        errors.NotInRegistryError, errors.AmbiguousRefError, errors.CorruptBlobError, errors.IndexLockedError)
    for info in pkgutil.walk_packages(loratool.__path__, "loratool."):
        if not info.name.startswith(("loratool.kernels", "loratool.cli", "loratool.__main__")):
            importlib.import_module(info.name)
    todo, found = [errors.LoratoolError], []
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    assert len(found) > 10
    assert {c.__module__ for c in found} == {"loratool.errors"}, [c for c in found if c.__module__ != "loratool.errors"]
