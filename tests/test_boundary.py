"""The input and output boundary (loratool/boundary.py): hostile base folders and careless
destinations never cost a user a byte (issue 11, classes "writing outside the output", "reading
outside the input", "--overwrite destroys what it should protect", FIFOs and devices)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from loratool.boundary import fresh_inputs
from loratool.cli import main


def run(capsys, *args) -> tuple[int, str]:
    """The CLI in this process, as a fresh process would run it: (exit code, stderr)."""
    with fresh_inputs():
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    err = capsys.readouterr().err
    return code, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loratool: error:"), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def tree(path: Path) -> dict[str, str]:
    """Every entry under ``path`` (links as their target, files as their digest)."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def base(fixtures_dir, tmp_path) -> Path:
    d = tmp_path / "work" / "base"
    shutil.copytree(fixtures_dir / "base_llama", d)
    return d


@pytest.fixture
def adapter(fixtures_dir, tmp_path) -> Path:
    d = tmp_path / "work" / "adapter"
    shutil.copytree(fixtures_dir / "llama_r8", d)
    return d


def _index(base: Path) -> tuple[Path, dict]:
    idx = base / "model.safetensors.index.json"
    return idx, json.loads(idx.read_text())


def _move_shard(base: Path, new_name: str) -> None:
    """Move the base's last shard to ``base/new_name`` (a path that may leave the folder) and
    point the index at it."""
    idx, data = _index(base)
    shard = sorted(set(data["weight_map"].values()))[-1]
    dest = (base / new_name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(base / shard, dest)
    data["weight_map"] = {k: (new_name if v == shard else v) for k, v in data["weight_map"].items()}
    idx.write_text(json.dumps(data))


# -- writing outside the output -------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["../victim/model-00002-of-00002.safetensors", "absolute", "linked/model.safetensors"])
def test_index_entries_that_leave_the_base_are_refused(capsys, base, adapter, tmp_path, entry):
    victim = tmp_path / "work" / "victim"
    victim.mkdir()
    if entry == "absolute":
        entry = str(victim / "model-00002-of-00002.safetensors")
    elif entry.startswith("linked/"):
        (base / "linked").symlink_to(victim, target_is_directory=True)
        entry = "linked/model-00002-of-00002.safetensors"
    _move_shard(base, entry)
    before = tree(tmp_path / "work")
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    code, err = run(capsys, "merge", "--base", base, "--adapters", adapter, "-o", out, "--quiet")
    assert code == 2
    line = one_line(err)
    assert "model-00002-of-00002.safetensors" in line
    assert tree(tmp_path / "work") == before  # nothing written outside OUT (nor anything at all)
    assert list(out.parent.iterdir()) == []


# -- reading outside the input -------------------------------------------------------------------

def test_a_link_out_of_the_base_is_never_followed(capsys, base, adapter, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text('{"token": "TOP-SECRET-TOKEN"}')  # valid JSON: the read-back check would pass it
    (base / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "merged"
    code, err = run(capsys, "merge", "--base", base, "--adapters", adapter, "-o", out, "--quiet")
    assert code == 2
    assert "tokenizer.json" in one_line(err)
    assert not out.exists() and not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_a_link_inside_the_base_is_copied_as_a_regular_file(capsys, base, adapter, tmp_path):
    shutil.move(base / "config.json", base / "config.real.json")
    (base / "config.json").symlink_to("config.real.json")
    out = tmp_path / "merged"
    code, err = run(capsys, "merge", "--base", base, "--adapters", adapter, "-o", out, "--quiet")
    assert code == 0, err
    assert not (out / "config.json").is_symlink()
    assert (out / "config.json").read_bytes() == (base / "config.real.json").read_bytes()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_fifo_in_the_base_is_refused_at_once(capsys, base, adapter, tmp_path, name):
    (base / name).unlink()
    os.mkfifo(base / name)
    code, err = run(capsys, "validate", adapter, "--base", base)  # opened non-blocking: no wait
    assert code == 2
    assert name in one_line(err) and "FIFO" in err


def test_a_device_behind_a_link_in_the_base_is_refused(capsys, base, adapter):
    (base / "config.json").unlink()
    (base / "config.json").symlink_to("/dev/zero")
    code, err = run(capsys, "validate", adapter, "--base", base)
    assert code == 2 and "config.json" in one_line(err)


def test_a_hugging_face_cache_snapshot_reads_through_its_blob_links(capsys, base, adapter, tmp_path):
    """The Hub cache links snapshot files to ../../blobs: inside the repository folder, so allowed."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(base.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    out = tmp_path / "merged"
    code, err = run(capsys, "merge", "--base", snap, "--adapters", adapter, "-o", out, "--quiet")
    assert code == 0, err
    assert all(not p.is_symlink() for p in out.iterdir())


# -- --overwrite never destroys what it should protect ------------------------------------------

def _kohya(fixtures_dir, tmp_path) -> Path:
    d = tmp_path / "work" / "k"
    d.mkdir(parents=True)
    shutil.copyfile(fixtures_dir / "kohya_sd.safetensors", d / "a.safetensors")
    return d / "a.safetensors"


@pytest.mark.parametrize("case", [
    "resize A -o A", "convert proj/a -o proj", "convert a -o a/adapter_model.safetensors",
    "convert a -o a/sub", "convert kohya -o kohya", "compose a -o a", "merge -o base", "merge -o adapter",
    "merge -o base/sub",
])
def test_overwrite_never_touches_an_input(capsys, fixtures_dir, base, adapter, tmp_path, case):
    (tmp_path / "work" / "notes.txt").write_text("mine")
    kohya = _kohya(fixtures_dir, tmp_path)
    args = {
        "resize A -o A": ["resize", adapter, "--rank", "2", "-o", adapter],
        "convert proj/a -o proj": ["convert", adapter, "--to", "peft", "-o", tmp_path / "work"],
        "convert a -o a/adapter_model.safetensors": ["convert", adapter, "--to", "peft", "-o",
                                                     adapter / "adapter_model.safetensors"],
        "convert a -o a/sub": ["convert", adapter, "--to", "peft", "-o", adapter / "sub"],
        "convert kohya -o kohya": ["convert", kohya, "--to", "kohya", "-o", kohya],
        "compose a -o a": ["compose", "--adapters", f"{adapter}:0.5", "-o", adapter],
        "merge -o base": ["merge", "--base", base, "--adapters", adapter, "-o", base, "--quiet"],
        "merge -o adapter": ["merge", "--base", base, "--adapters", adapter, "-o", adapter, "--quiet"],
        "merge -o base/sub": ["merge", "--base", base, "--adapters", adapter, "-o", base / "sub", "--quiet"],
    }[case]
    before = tree(tmp_path / "work")
    code, err = run(capsys, *args, "--overwrite")
    assert code == 2
    assert "input" in one_line(err)
    assert tree(tmp_path / "work") == before


def test_overwrite_never_deletes_other_files_in_the_output_folder(capsys, adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    code, err = run(capsys, "convert", adapter, "--to", "peft", "-o", out, "--overwrite")
    assert code == 2 and "README.md" in one_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]
    # an earlier output of the same command is replaced
    shutil.rmtree(out)
    assert run(capsys, "convert", adapter, "--to", "peft", "-o", out)[0] == 0
    code, err = run(capsys, "convert", adapter, "--to", "peft", "-o", out, "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize("kind", ["fifo", "device", "dangling", "link"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_special_destinations_are_refused(capsys, adapter, tmp_path, kind, overwrite):
    dest = tmp_path / "dest"
    target = tmp_path / "target.safetensors"
    if kind == "fifo":
        os.mkfifo(dest)
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.fail("the device-node case needs root to create a node; these tests run as root in CI")
        os.mknod(dest, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
    elif kind == "dangling":
        dest.symlink_to(target)
    else:
        target.write_bytes(b"keep")
        dest.symlink_to(target)
    before = os.lstat(dest)
    code, err = run(capsys, "convert", adapter, "--to", "kohya", "-o", dest, *(["--overwrite"] if overwrite else []))
    assert code == 2
    one_line(err)
    after = os.lstat(dest)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    assert kind != "link" or target.read_bytes() == b"keep"
    assert kind != "dangling" or not target.exists()


def test_registry_home_is_never_an_output(capsys, adapter, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LORATOOL_HOME", str(home))
    assert run(capsys, "registry", "add", adapter, "--name", "a")[0] == 0
    def stored():  # the blobs and the index; materialized/ is the registry's own cache of copies
        return {k: v for k, v in tree(home).items() if not k.startswith("materialized")}

    before = stored()
    for dest in (home, home / "blobs", tmp_path):
        code, err = run(capsys, "convert", "a", "--to", "peft", "-o", dest, "--overwrite")
        assert code == 2 and "registry" in one_line(err), dest
    assert stored() == before


# -- errors of the file system are one line -------------------------------------------------------

def test_unwritable_destination_is_one_line(capsys, adapter, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run(capsys, "convert", adapter, "--to", "peft", "-o", blocker / "out")
    assert code == 2 and "Not a directory" in one_line(err)
    code, err = run(capsys, "convert", adapter, "--to", "peft", "-o", "/proc/loratool-out")
    assert code == 2 and "/proc/loratool-out" in one_line(err)
