"""`loratool registry …` as a user runs it: output, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest
from tinybase import base_tensors, save_base

from loratool.formats import load_adapter
from loratool.manifest import record_manifest


@pytest.fixture
def env(home):
    return {"LORATOOL_HOME": str(home)}


def test_registry_workflow(make_adapter, cli, env, tmp_path):
    a, b = make_adapter("a", seed=1), make_adapter("b", seed=2)
    r = cli("registry", "add", a, "--name", "llama", "--tag", "prod", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("added llama@1 (sha256:") and r.stdout.rstrip().endswith("tagged prod")
    r = cli("registry", "add", a, "--name", "llama", env=env)
    assert r.stdout.startswith("llama@1 already holds this content")
    r = cli("registry", "add", b, "--name", "llama", "--json", env=env)
    added = json.loads(r.stdout)
    assert (added["version"], added["created"]) == (2, True)

    r = cli("registry", "list", env=env)
    assert r.returncode == 0 and "llama@1" in r.stdout and "llama@2" in r.stdout and "prod" in r.stdout
    r = cli("registry", "show", "llama:prod", "--json", env=env)
    shown = json.loads(r.stdout)
    assert shown["entry"]["ref"] == "llama@1" and shown["entry"]["tags"] == ["prod"]
    assert "llama@1" in cli("registry", "show", "llama:prod", env=env).stdout

    r = cli("registry", "tag", "llama@2", "prod", env=env)
    assert r.stdout.strip() == "llama:prod -> llama@2 (was @1)"
    r = cli("registry", "tag", "llama@1", "prod", env=env)  # rollback
    assert r.stdout.strip() == "llama:prod -> llama@1 (was @2)"

    out = tmp_path / "exported"
    r = cli("registry", "export", "llama@2", "-o", out, "--json", env=env)
    assert r.returncode == 0, r.stderr
    exported = json.loads(r.stdout)
    assert (exported["format"], exported["converted"], exported["output"]) == ("peft", False, str(out))
    assert (out / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    r = cli("inspect", out, env=env)  # a normal PEFT directory
    assert r.returncode == 0, r.stderr

    r = cli("registry", "untag", "llama:prod", env=env)
    assert r.stdout.strip() == "removed tag llama:prod (it pointed at llama@1)"
    r = cli("registry", "tag", "llama@1", "prod", "--json", env=env)
    assert json.loads(r.stdout) == {"name": "llama", "tag": "prod", "version": 1, "previous": None}
    r = cli("registry", "untag", "llama:prod", "--json", env=env)
    assert json.loads(r.stdout) == {"name": "llama", "tag": "prod", "version": 1}

    r = cli("registry", "rm", "llama", env=env)  # two versions: refused, listing them
    assert r.returncode == 2 and r.stderr.strip() == (
        "loratool: error: llama has 2 versions (llama@1, llama@2); name one (llama@2, llama:TAG or "
        "sha256:…) or pass --all to remove every version")
    r = cli("registry", "rm", "llama@2", env=env)
    assert r.stdout.startswith("removed llama@2")
    r = cli("registry", "gc", "--json", env=env)
    assert json.loads(r.stdout)["blobs_removed"] == 2  # weights and tree; the config is shared
    r = cli("registry", "verify", env=env)
    assert r.returncode == 0 and "ok" in r.stdout
    cli("registry", "add", b, "--name", "llama", env=env)
    r = cli("registry", "rm", "llama", "--all", "--json", env=env)
    assert json.loads(r.stdout) == {"removed": ["llama@1", "llama@3"]}


def test_export_a_kohya_file_as_added_or_converted(kohya_file, cli, env, tmp_path):
    src = kohya_file("style.safetensors")
    assert cli("registry", "add", src, "--name", "style", env=env).returncode == 0
    r = cli("registry", "export", "style", "-o", tmp_path / "back.safetensors", env=env)
    assert r.stdout.strip() == f"wrote {tmp_path / 'back.safetensors'} (kohya, as added)"
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
    r = cli("registry", "export", "style", "-o", tmp_path / "peft", "--format", "peft", env=env)
    assert r.stdout.strip() == f"wrote {tmp_path / 'peft'} (kohya converted to peft)", r.stderr
    assert load_adapter(tmp_path / "peft").format == "peft"  # one folder per component (unet, text_encoder)


@pytest.mark.parametrize("args, message", [
    (["add", "{a}", "--name", "../x"], "invalid registry name '../x'"),
    (["add", "{a}", "--name", "ok", "--tag", "2"], "invalid tag '2'"),
    (["show", "nope"], "no adapter named 'nope'"),
    (["show", "llama@9"], "no version 9 of 'llama'"),
    (["tag", "llama", "latest"], "'latest' always means the newest version"),
    (["export", "llama", "-o", "{a}"], "already exists"),
    (["rm", "sha256:zz"], "sha256: followed by 4 to 64 hex digits"),
    (["rm", "llama@1", "--all"], "--all removes every version of a name; give the bare name (llama)"),
    (["untag", "llama:nope"], "no tag 'nope' on 'llama'"),
    (["untag", "llama@1"], "llama@1: untag takes NAME:TAG"),
    (["export", "llama", "-o", "{a}.kohya.safetensors", "--format", "kohya"], "no model components"),
    (["pull", "owner/repo"], "pull takes a Hub reference"),
])
def test_errors_are_one_line_exit_2(make_adapter, reg, cli, env, args, message):
    a = make_adapter("a")
    reg.add(a, "llama")
    r = cli("registry", *[x.format(a=a) for x in args], env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("loratool: error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_list_fits(tmp_path, make_adapter, cli, env):
    base = save_base(tmp_path / "base", base_tensors())
    other = save_base(tmp_path / "other", base_tensors(inter=40))
    a = make_adapter("a")
    record_manifest(a, base)
    cli("registry", "add", a, "--name", "fits", env=env)
    cli("registry", "add", make_adapter("b", seed=2), "--name", "nomanifest", env=env)
    r = cli("registry", "list", "--fits", base, "--json", env=env)
    assert [(e["name"], e["fits"]) for e in json.loads(r.stdout)["adapters"]] == [("fits", "structure")]
    r = cli("registry", "list", "--fits", other, env=env)
    assert r.returncode == 0 and "no adapters fit that base" in r.stdout


def test_help_lists_the_commands(cli):
    r = cli("registry", "--help")
    assert r.returncode == 0
    for name in ("add", "list", "show", "tag", "untag", "rm", "gc", "verify", "export", "pull", "push"):
        assert f"  {name} " in r.stdout
    assert "registry" in cli("--help").stdout
