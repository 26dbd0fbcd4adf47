"""`loratool registry …` as a user runs it: output, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest
from tinybase import base_tensors, save_base

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
    r = cli("registry", "export", "llama@2", "-o", out, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    r = cli("inspect", out, env=env)  # a normal PEFT directory
    assert r.returncode == 0, r.stderr

    r = cli("registry", "rm", "llama@2", env=env)
    assert r.stdout.startswith("removed llama@2")
    r = cli("registry", "gc", "--json", env=env)
    assert json.loads(r.stdout)["blobs_removed"] == 2  # weights and tree; the config is shared
    r = cli("registry", "verify", env=env)
    assert r.returncode == 0 and "ok" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["add", "{a}", "--name", "../x"], "invalid registry name '../x'"),
    (["add", "{a}", "--name", "ok", "--tag", "2"], "invalid tag '2'"),
    (["show", "nope"], "no adapter named 'nope'"),
    (["show", "llama@9"], "no version 9 of 'llama'"),
    (["tag", "llama", "latest"], "'latest' always means the newest version"),
    (["export", "llama", "-o", "{a}"], "already exists"),
    (["rm", "sha256:zz"], "sha256: followed by 4 to 64 hex digits"),
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
    for name in ("add", "list", "show", "tag", "rm", "gc", "verify", "export", "pull", "push"):
        assert f"  {name} " in r.stdout
    assert "registry" in cli("--help").stdout
