"""loratool.fingerprint: file hashes and their cache, structure/content fingerprints, the Hub."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from tinybase import COMMIT, FakeHubApi, base_tensors, save_base

from loratool import boundary
from loratool.errors import InputError
from loratool.fingerprint import (
    HashCache,
    canonical_json,
    config_digest,
    content_fingerprint,
    default_home,
    fingerprint_base,
    hash_files,
    parse_hub_ref,
    sha256_file,
)

def hashlib_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- hashing and the cache --------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [7, 4096, 8 * 1024 * 1024])
def test_sha256_file_equals_hashlib(tmp_path, chunk):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(100_003))
    assert sha256_file(f, chunk_bytes=chunk) == hashlib_sha256(f)


def test_fingerprint_sha256_equals_hashlib_over_each_file(tmp_path):
    base = save_base(tmp_path / "base", base_tensors(), shards=3)
    fp = fingerprint_base(base, cache=HashCache(tmp_path / "home"))
    assert [f.path for f in fp.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for f in fp.files:
        assert f.sha256 == hashlib_sha256(base / f.path)
        assert f.size == (base / f.path).stat().st_size
    assert fp.content == content_fingerprint(f.sha256 for f in fp.files)
    assert fp.num_tensors == len(base_tensors())
    assert fp.name == "tiny-org/tiny-llama"


def test_second_run_is_served_from_the_cache(tmp_path):
    base = save_base(tmp_path / "base", base_tensors(), shards=2)
    first = HashCache(tmp_path / "home")
    fp1 = fingerprint_base(base, cache=first)
    assert (first.hits, first.misses) == (0, 2)
    second = HashCache(tmp_path / "home")
    fp2 = fingerprint_base(base, cache=second)
    assert (second.hits, second.misses, second.hashed_bytes) == (2, 0, 0)
    assert fp2 == fp1
    # refresh (--no-cache) hashes again
    third = HashCache(tmp_path / "home")
    assert fingerprint_base(base, cache=third, refresh=True) == fp1
    assert (third.hits, third.misses) == (0, 2)


def test_cache_is_invalidated_by_mtime_and_size(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"a" * 1000)
    cache = HashCache(tmp_path / "home")
    h1 = hash_files([f], cache=cache)[f]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same bytes, new mtime
    cache = HashCache(tmp_path / "home")
    assert hash_files([f], cache=cache)[f] == h1
    assert (cache.hits, cache.misses) == (0, 1)
    f.write_bytes(b"a" * 1001)  # new size (and content)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # even with the cached mtime
    cache = HashCache(tmp_path / "home")
    h2 = hash_files([f], cache=cache)[f]
    assert (cache.hits, cache.misses) == (0, 1)
    assert h2 == hashlib_sha256(f) != h1


def test_cache_entry_for_another_file_is_not_used(tmp_path):
    """Entries are checked against the full identity, not just the key file name."""
    f = tmp_path / "blob"
    f.write_bytes(b"x" * 10)
    cache = HashCache(tmp_path / "home")
    hash_files([f], cache=cache)
    (entry,) = (tmp_path / "home" / "hashes").rglob("*.json")
    data = json.loads(entry.read_text())
    data["identity"]["inode"] += 1
    entry.write_text(json.dumps(data))
    cache = HashCache(tmp_path / "home")
    hash_files([f], cache=cache)
    assert cache.misses == 1


def test_cache_is_invalidated_by_ctime(tmp_path):
    """Bytes changed in place with size and mtime set back (os.utime) are hashed again: every
    change sets the ctime, which no user can set back (issue 11)."""
    f = tmp_path / "blob"
    f.write_bytes(b"a" * 1000)
    h1 = hash_files([f], cache=HashCache(tmp_path / "home"))[f]
    st = f.stat()
    with open(f, "r+b") as w:
        w.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = f.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    cache = HashCache(tmp_path / "home")
    assert hash_files([f], cache=cache)[f] == hashlib_sha256(f) != h1
    assert (cache.hits, cache.misses) == (0, 1)


@pytest.mark.parametrize("entry", ["[" * 5000 + "]" * 5000, "{\"identity\": 1" + "0" * 5000 + "}", "\xff\xfe", ""])
def test_damaged_cache_entry_is_a_miss(tmp_path, entry):
    f = tmp_path / "blob"
    f.write_bytes(b"x" * 10)
    hash_files([f], cache=HashCache(tmp_path / "home"))
    (path,) = (tmp_path / "home" / "hashes").rglob("*.json")
    path.write_bytes(entry.encode("latin-1"))
    cache = HashCache(tmp_path / "home")
    assert hash_files([f], cache=cache)[f] == hashlib_sha256(f) and cache.misses == 1


def test_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # no writer: an ordinary open would block forever
    with pytest.raises(InputError, match="FIFO"):
        sha256_file(fifo)


def test_default_home():
    assert default_home({"LORATOOL_HOME": "/x/lt", "XDG_CACHE_HOME": "/y"}) == Path("/x/lt")
    assert default_home({"XDG_CACHE_HOME": "/y"}) == Path("/y/loratool")
    assert default_home({}) == Path("~/.cache/loratool").expanduser()
    assert default_home is boundary.default_home  # one definition, still importable from here


# -- structure and content ----------------------------------------------------------------------------

def test_structure_is_independent_of_sharding_content_is_not(tmp_path):
    one = fingerprint_base(save_base(tmp_path / "one", base_tensors(), shards=1), content=True)
    three = fingerprint_base(save_base(tmp_path / "three", base_tensors(), shards=3), content=True)
    assert one.structure == three.structure
    assert one.content != three.content
    assert len(one.files) == 1 and len(three.files) == 3


def test_one_changed_tensor_changes_content_not_structure(tmp_path):
    t = base_tensors()
    a = fingerprint_base(save_base(tmp_path / "a", t))
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"] + 1
    b = fingerprint_base(save_base(tmp_path / "b", t))
    assert a.structure == b.structure
    assert a.files[0].structure == b.files[0].structure
    assert a.content != b.content


@pytest.mark.parametrize("change", ["shape", "dtype", "name"])
def test_structure_changes_with_shape_dtype_or_name(tmp_path, change):
    t = base_tensors()
    a = fingerprint_base(save_base(tmp_path / "a", t), content=False)
    key = "model.layers.0.mlp.up_proj.weight"
    if change == "shape":
        t[key] = t[key][:-1]
    elif change == "dtype":
        t[key] = t[key].bfloat16()
    else:
        t["model.layers.0.mlp.up_proj2.weight"] = t.pop(key)
    b = fingerprint_base(save_base(tmp_path / "b", t), content=False)
    assert a.structure != b.structure
    assert a.content is None and a.files[0].sha256 is None  # headers only


def test_single_file_base_and_renamed_copy_share_content(tmp_path):
    d = save_base(tmp_path / "base", base_tensors())
    renamed = tmp_path / "elsewhere.safetensors"
    renamed.write_bytes((d / "model.safetensors").read_bytes())
    a, b = fingerprint_base(d), fingerprint_base(renamed)
    assert b.files[0].path == "elsewhere.safetensors"
    assert (a.structure, a.content) == (b.structure, b.content)


def test_name_from_hf_cache_snapshot_path(tmp_path):
    snap = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    fp = fingerprint_base(save_base(snap, base_tensors(), name_or_path="/fsx/run3/ckpt"), content=False)
    assert (fp.name, fp.repo_id, fp.revision) == ("tiny-org/tiny-llama", "tiny-org/tiny-llama", COMMIT)
    local = fingerprint_base(save_base(tmp_path / "mine", base_tensors(), name_or_path="/fsx/x"), content=False)
    assert local.name == "mine"  # a local path in _name_or_path is not a name


# -- canonical config digest ---------------------------------------------------------------------------

def test_config_digest_ignores_set_order_and_key_order():
    a = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "k_proj"], "modules_to_save": ["lm_head", "embed"]}
    b = {"modules_to_save": ["embed", "lm_head"], "target_modules": ["k_proj", "q_proj", "v_proj"], "lora_alpha": 16.0, "r": 8}
    assert config_digest(a) == config_digest(b)
    assert config_digest(a) == config_digest({**a, "peft_version": "0.17.0"})
    assert config_digest(a) != config_digest({**a, "r": 4})
    # ordinary lists keep their order
    assert canonical_json({"layers_to_transform": [2, 1]}) != canonical_json({"layers_to_transform": [1, 2]})
    # regex target_modules (a string) is kept as is
    assert canonical_json({"target_modules": ".*proj"}) == '{"target_modules":".*proj"}'


# -- the Hub, through an api object ----------------------------------------------------------------------

def test_parse_hub_ref():
    assert parse_hub_ref("hf://org/name") == ("org/name", None)
    assert parse_hub_ref("hf://org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_ref("/local/path") is None
    with pytest.raises(InputError, match="hf://owner/name"):
        parse_hub_ref("hf://bad name")


def test_hub_fingerprint_equals_local(tmp_path):
    d = save_base(tmp_path / "base", base_tensors(), shards=2)
    api = FakeHubApi(d)
    hub = fingerprint_base("hf://tiny-org/tiny-llama@main", api=api)
    local = fingerprint_base(d)
    assert api.calls[0] == ("model_info", "tiny-org/tiny-llama", "main", True)
    assert api.calls[1] == ("get_safetensors_metadata", "tiny-org/tiny-llama", COMMIT)  # pinned
    assert (hub.repo_id, hub.revision, hub.name) == ("tiny-org/tiny-llama", COMMIT, "tiny-org/tiny-llama")
    assert (hub.structure, hub.content) == (local.structure, local.content)
    assert [(f.path, f.sha256, f.structure) for f in hub.files] == [(f.path, f.sha256, f.structure) for f in local.files]
    assert hub.num_params == local.num_params and hub.notes == []


@pytest.mark.parametrize("shards", [1, 3])
def test_hub_without_headers_has_no_structure(tmp_path, shards):
    d = save_base(tmp_path / "base", base_tensors(), shards=shards)
    local = fingerprint_base(d)
    # a stray consolidated file is not part of the model (BaseCheckpoint would not read it either)
    save_base(tmp_path / "other", base_tensors(seed=5))
    (d / "consolidated.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    fp = fingerprint_base("hf://tiny-org/tiny-llama", api=FakeHubApi(d, headers=False))
    assert [f.path for f in fp.files] == [f.path for f in local.files]
    assert fp.structure is None and fp.content == local.content
    assert any("structure unknown" in n and "NotASafetensorsRepoError" in n for n in fp.notes)


def test_hub_non_lfs_file_records_blob_id_and_says_so(tmp_path):
    d = save_base(tmp_path / "base", base_tensors())
    fp = fingerprint_base("hf://tiny-org/tiny-llama", api=FakeHubApi(d, lfs=False))
    (f,) = fp.files
    assert f.sha256 is None and f.git_blob_id == "f" * 40
    assert fp.content is None
    assert any("not stored with LFS" in n and "SHA-1" in n for n in fp.notes)


def test_hub_repo_without_safetensors_is_an_input_error(tmp_path):
    d = tmp_path / "pickles"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match=r"hf://org/pickles: no \.safetensors weights.*pytorch_model\.bin"):
        fingerprint_base("hf://org/pickles", api=FakeHubApi(d, headers=False))


def test_hub_network_error_is_one_line_input_error():
    class Offline:
        def model_info(self, *a, **kw):
            raise ConnectionError("Failed to resolve 'huggingface.co'\n(offline)")

    with pytest.raises(InputError) as e:
        fingerprint_base("hf://org/name", api=Offline())
    assert "\n" not in str(e.value) and "hf://org/name: cannot read" in str(e.value)


# -- the command ---------------------------------------------------------------------------------------

def test_cli_fingerprint_json_and_cache(tmp_path, cli):
    d = save_base(tmp_path / "base", base_tensors())
    env = {"LORATOOL_HOME": str(tmp_path / "home")}
    r = cli("fingerprint", d, "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["files"][0]["sha256"] == hashlib_sha256(d / "model.safetensors")
    assert list((tmp_path / "home" / "hashes").rglob("*.json"))
    r2 = cli("fingerprint", d, env=env)
    assert r2.returncode == 0 and "0 files" in r2.stdout and "1 from cache" in r2.stdout
    assert out["content"] in r2.stdout


def test_tensors_digest_is_memoised_per_adapter_and_follows_its_tensors(fixtures_dir):
    """compose and merge record each input in the manifest and the lineage: the digest of file
    tensors is computed once per adapter object, and a module whose tensors change gets a new one."""
    import dataclasses

    from loratool.fingerprint import adapter_tensors_digest
    from loratool.formats import load_adapter

    a = load_adapter(fixtures_dir / "llama_r8")
    first = adapter_tensors_digest(a)
    assert adapter_tensors_digest(a) == first == adapter_tensors_digest(load_adapter(fixtures_dir / "llama_r8"))
    other = load_adapter(fixtures_dir / "llama_rslora_patterns")
    name = next(iter(a.modules))
    peer = next(m for m in other.modules.values() if m.lora_A.shape == a.modules[name].lora_A.shape)
    a.modules[name] = dataclasses.replace(a.modules[name], lora_A=peer.lora_A)
    assert adapter_tensors_digest(a) != first
