"""Trust at the edges (issue 11): what the registry hands out is what was stored, a base changed in
place is noticed, and no output, even with --overwrite, lands in the registry's home.

Every CLI failure here must be one ``loratool: error:`` line with the documented exit code, never
an internal error (exit 70), and must leave no output behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tinybase import base_tensors, save_adapter, save_base

from loratool.errors import UsageError
from loratool.fingerprint import HashCache
from loratool.manifest import record_manifest
from loratool.registry.core import Registry
from loratool.registry.hub import check_cache_dir

EXIT_INPUT, EXIT_BASE_MISMATCH = 2, 3


def errors_of(p: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    return [line for line in p.stderr.splitlines() if line.startswith("loratool: error:")]


def one_error(p: subprocess.CompletedProcess, code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stderr)
    (line,) = errors_of(p)
    return line


def flip_last_byte(path: Path) -> None:
    """Change a byte in place: same inode, same size (as bit rot or a careless editor would)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x01]))


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``folder`` (but the top-level folders in ``skip``) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in skip}


@pytest.fixture
def world(tmp_path):
    """A tiny base, an adapter pinned to it by a manifest, and a registry holding the adapter as
    ``chat`` (its home is $LORATOOL_HOME of every command run through ``env``)."""
    home = tmp_path / "home"
    base = save_base(tmp_path / "base", base_tensors(), shards=2)
    adapter = save_adapter(tmp_path / "adapter")
    record_manifest(adapter, base=base, cache=HashCache(home))  # the cache the commands use
    with Registry(home) as reg:
        added = reg.add(adapter, "chat")
        blob = reg.store.path(next(f.sha256 for f in reg.tree(added.digest).files
                                   if f.path == "adapter_model.safetensors"))
    return {"home": home, "base": base, "adapter": adapter, "digest": added.digest, "blob": blob,
            "env": {"LORATOOL_HOME": str(home)}, "tmp": tmp_path}


# -- what the registry hands out ------------------------------------------------------------------

@pytest.mark.parametrize("used_before", [False, True], ids=["fresh", "materialized-before"])
def test_rotted_blob_is_refused_naming_the_adapter(cli, world, used_before):
    w = world
    if used_before:  # an intact older copy must not hide the rot
        p = cli("merge", "--base", w["base"], "--adapters", "chat", "-o", w["tmp"] / "first", "-q", env=w["env"])
        assert p.returncode == 0, p.stderr
    flip_last_byte(w["blob"])
    out = w["tmp"] / "out"
    p = cli("merge", "--base", w["base"], "--adapters", "chat", "-o", out, "-q", env=w["env"])
    line = one_error(p, EXIT_INPUT)
    assert "chat@1" in line and "adapter_model.safetensors" in line and "corrupt" in line
    assert "registry verify" in line
    assert not out.exists() and not list(w["tmp"].glob(".out.*"))
    p = cli("registry", "export", "chat", "-o", w["tmp"] / "exported", env=w["env"])
    assert "corrupt" in one_error(p, EXIT_INPUT) and not (w["tmp"] / "exported").exists()
    p = cli("registry", "verify", env=w["env"])
    assert p.returncode == 1 and "chat@1" in p.stdout


def test_materialized_copy_cannot_write_through_to_the_blob(world):
    w = world
    with Registry(w["home"]) as reg:
        path = reg.materialize(w["digest"])
    copy = path / "adapter_model.safetensors"
    st, blob_st = copy.stat(), w["blob"].stat()
    assert st.st_ino != blob_st.st_ino and st.st_nlink == 1  # not a hard link to the blob
    assert st.st_mode & 0o222 == 0 and blob_st.st_mode & 0o222 == 0  # read-only, both
    stored = w["blob"].read_bytes()
    flip_last_byte(copy)  # root can write a read-only file: the blob must not follow
    assert w["blob"].read_bytes() == stored
    with Registry(w["home"]) as reg:
        assert reg.verify().ok
        assert reg.materialize(w["digest"]) == path  # the tampered copy is made again
    assert copy.read_bytes() == stored and copy.stat().st_nlink == 1


# -- a base changed in place ----------------------------------------------------------------------

def test_base_changed_in_place_with_size_and_mtime_kept(cli, world):
    """The hash cache is keyed by ctime too: rewriting a shard's bytes and setting its mtime back
    does not make merge trust the old hash. merge and validate --base agree on the verdict."""
    w = world
    shard = w["base"] / "model-00002-of-00002.safetensors"
    p = cli("merge", "--base", w["base"], "--adapters", w["adapter"], "-o", w["tmp"] / "good", "-q", env=w["env"])
    assert p.returncode == 0, p.stderr
    assert cli("validate", w["adapter"], "--base", w["base"], env=w["env"]).returncode == 0

    st = shard.stat()
    flip_last_byte(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)

    out = w["tmp"] / "out"
    merged = cli("merge", "--base", w["base"], "--adapters", w["adapter"], "-o", out, "-q", env=w["env"])
    line = one_error(merged, EXIT_BASE_MISMATCH)
    assert shard.name in line and not out.exists()
    validated = cli("validate", w["adapter"], "--base", w["base"], env=w["env"])
    assert shard.name in one_error(validated, EXIT_BASE_MISMATCH)
    # by registry name too: the same manifest, the same verdict
    by_name = cli("merge", "--base", w["base"], "--adapters", "chat", "-o", out, "-q", env=w["env"])
    assert one_error(by_name, EXIT_BASE_MISMATCH) and not out.exists()


# -- outputs never land in the registry -----------------------------------------------------------

@pytest.mark.parametrize("where", ["home", "inside", "containing"])
def test_export_into_the_registry_home_is_refused(cli, world, where):
    w = world
    home = w["home"]
    dest = {"home": home, "inside": home / "blobs", "containing": w["tmp"]}[where]
    before = snapshot(home, skip=("hashes",))
    p = cli("registry", "export", "chat", "-o", dest, "--overwrite", env=w["env"])
    line = one_error(p, EXIT_INPUT)
    assert str(home) in line and "--overwrite" in line
    assert snapshot(home, skip=("hashes",)) == before
    assert cli("registry", "verify", env=w["env"]).returncode == 0


def test_export_into_another_home_given_by_option_is_refused(cli, world, tmp_path):
    w = world
    other = tmp_path / "other-home"
    p = cli("registry", "--home", other, "add", w["adapter"], "--name", "chat", env=w["env"])
    assert p.returncode == 0, p.stderr
    before = snapshot(other)
    for dest in (other, other / "materialized"):
        p = cli("registry", "--home", other, "export", "chat", "-o", dest, "--overwrite", env=w["env"])
        assert str(other) in one_error(p, EXIT_INPUT)
    assert snapshot(other) == before
    assert cli("registry", "--home", other, "verify", env=w["env"]).returncode == 0


@pytest.mark.parametrize("where", ["home", "materialized"])
def test_merge_with_a_registry_ref_into_the_home_is_refused(cli, world, where):
    w = world
    home = w["home"]
    dest = home if where == "home" else home / "materialized" / w["digest"]
    before = snapshot(home, skip=("hashes", "materialized"))
    p = cli("merge", "--base", w["base"], "--adapters", "chat", "-o", dest, "--overwrite", "-q", env=w["env"])
    assert str(home) in one_error(p, EXIT_INPUT)
    assert snapshot(home, skip=("hashes", "materialized")) == before
    assert cli("registry", "verify", env=w["env"]).returncode == 0
    with Registry(home) as reg:  # what a later merge by name reads still checks out
        assert reg.materialize(w["digest"]) == home / "materialized" / w["digest"]


def test_manifest_never_writes_into_the_registry(cli, world):
    w = world
    p = cli("manifest", "chat", "--base", w["base"], env=w["env"])
    assert "registry export" in one_error(p, EXIT_INPUT)
    with Registry(w["home"]) as reg:
        materialized = reg.materialize(w["digest"])
    # ... nor by the path of a materialized copy (the one file loratool writes beside an input is
    # its manifest, and never inside the registry home)
    stored = (materialized / "loratool.json").read_bytes()
    p = cli("manifest", materialized, "--base", w["base"], env=w["env"])
    assert str(w["home"]) in one_error(p, EXIT_INPUT)
    assert (materialized / "loratool.json").read_bytes() == stored
    assert not [q for q in materialized.iterdir() if q.name.startswith(".")]


def test_hub_cache_inside_the_registry_home_is_refused(tmp_path):
    home = tmp_path / "home"
    with pytest.raises(UsageError, match="registry home"):
        check_cache_dir(home / "materialized", home)
    with pytest.raises(UsageError, match="registry home"):
        check_cache_dir(home, home)
    assert check_cache_dir(tmp_path / "hf", home) == tmp_path / "hf"


# -- a home that cannot be written --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_unusable_home_is_one_line(cli, tmp_path, kind):
    """A $LORATOOL_HOME that is a file (EEXIST) or lies under one (ENOTDIR) stands for any home
    that cannot be written (tests run as root, where a chmod denies nothing)."""
    blocker = tmp_path / "home-file"
    blocker.write_text("not a folder")
    home = blocker if kind == "file" else blocker / "loratool"
    env = {"LORATOOL_HOME": str(home)}
    base = save_base(tmp_path / "base", base_tensors())
    adapter = save_adapter(tmp_path / "adapter")
    for args in (("registry", "add", adapter, "--name", "chat"), ("registry", "list"), ("registry", "gc"),
                 ("registry", "verify"), ("merge", "--base", base, "--adapters", "chat", "-o", tmp_path / "out")):
        p = cli(*args, env=env)
        assert str(home) in one_error(p, EXIT_INPUT), args
    assert not (tmp_path / "out").exists()
    # a hash cache that cannot be written only costs speed
    p = cli("manifest", adapter, "--base", base, env=env)
    assert p.returncode == 0 and not errors_of(p), p.stderr
    assert blocker.read_text() == "not a folder"


# -- odd values in a stranger's config ------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("base_model_name_or_path", ["a", "b"]),
    ("base_model_name_or_path", {"repo": "x"}),
    ("base_model_name_or_path", 7),
    ("revision", 12345),
    ("task_type", ["CAUSAL_LM"]),
    ("task_type", 3),
])
def test_odd_config_values_are_one_line(cli, tmp_path, field, value):
    adapter = save_adapter(tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg[field] = value
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    env = {"LORATOOL_HOME": str(tmp_path / "home")}
    for args in (("registry", "add", adapter, "--name", "odd"), ("manifest", adapter)):
        p = cli(*args, env=env)
        if p.returncode:
            assert field in one_error(p, EXIT_INPUT), args
        else:  # accepted: only where the value never needs to be text (task_type)
            assert field == "task_type" and not errors_of(p), args
    p = cli("registry", "list", "--json", env=env)
    assert p.returncode == 0, p.stderr


# -- inputs through the boundary ------------------------------------------------------------------

def test_fifo_manifest_is_refused_without_blocking(tmp_path):
    base = save_base(tmp_path / "base", base_tensors())
    adapter = save_adapter(tmp_path / "adapter")
    os.mkfifo(adapter / "loratool.json")  # no writer: an ordinary open would wait forever
    p = subprocess.run([sys.executable, "-m", "loratool", "validate", str(adapter), "--base", str(base)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, LORATOOL_HOME=str(tmp_path / "home")))
    line = one_error(p, EXIT_INPUT)
    assert "loratool.json" in line and "FIFO" in line
