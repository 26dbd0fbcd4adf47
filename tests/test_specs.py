"""The one ``--adapters`` grammar (``loratool.adapter_specs``), the same for every command that
takes it: compose, merge, parity and unmerge (issue 12)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loratool.adapter_specs import AdapterSpec, parse_adapter_specs
from loratool.cli import main
from loratool.errors import UsageError

GOOD = [
    ("a:0.7,b:0.3", [("a", 0.7), ("b", 0.3)]),
    ("a", [("a", 1.0)]),
    (" a:0.7 , b ", [("a", 0.7), ("b", 1.0)]),
    ("neg:-0.5", [("neg", -0.5)]),
    ("w:1e-1", [("w", 0.1)]),
    ("w:.5", [("w", 0.5)]),
    ("name:prod", [("name:prod", 1.0)]),  # a tag: tags never are numbers
    ("name:prod:0.5", [("name:prod", 0.5)]),
    ("name@3", [("name@3", 1.0)]),
    ("name@3:2", [("name@3", 2.0)]),
    ("team/llama-sql:latest:0.25", [("team/llama-sql:latest", 0.25)]),
    ("sha256:abcd", [("sha256:abcd", 1.0)]),  # a digest prefix, not `sha256` at weight 1234
    ("sha256:1234", [("sha256:1234", 1.0)]),
    ("sha256:1234:0.5", [("sha256:1234", 0.5)]),
    ("hf://owner/repo", [("hf://owner/repo", 1.0)]),
    ("hf://owner/repo@main:0.5", [("hf://owner/repo@main", 0.5)]),
    ("dir:with:colons", [("dir:with:colons", 1.0)]),
    ("dir:with:colons:1e-1", [("dir:with:colons", 0.1)]),
    ("C:\\ad:2", [("C:\\ad", 2.0)]),
]

BAD = [
    ("a:0.7,,b:0.3", "entry 2 of 'a:0.7,,b:0.3' is empty"),
    ("a:0.7,", "entry 2 of 'a:0.7,' is empty"),
    (",a", "entry 1 of ',a' is empty"),
    (",", "entry 1 of ',' is empty"),
    ("", "'' is empty"),
    ("   ", "is empty"),
    (":0.5", "entry ':0.5' has no path or reference before ':'"),
    ("a:1,:0.5", "entry ':0.5' has no path or reference before ':'"),
    ("::0.5", "entry '::0.5' has no path or reference before ':'"),
    ("a:1e999", "entry 'a:1e999' has weight inf"),
]


def _pairs(specs: list[AdapterSpec]) -> list[tuple[Path, float]]:
    return [(s.path, s.weight) for s in specs]


@pytest.mark.parametrize("text,expected", GOOD, ids=[t for t, _ in GOOD])
def test_good_entries(text, expected):
    assert _pairs(parse_adapter_specs(text)) == [(Path(p), w) for p, w in expected]


@pytest.mark.parametrize("text,message", BAD, ids=[t or "empty" for t, _ in BAD])
def test_bad_entries_are_refused_naming_the_entry(text, message):
    with pytest.raises(UsageError) as e:
        parse_adapter_specs(text)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "expected" in str(e.value)


def test_repeated_options_lists_and_pairs():
    assert _pairs(parse_adapter_specs(["x", "y:2,z"])) == [(Path("x"), 1.0), (Path("y"), 2.0), (Path("z"), 1.0)]
    assert parse_adapter_specs([AdapterSpec(Path("a"), 0.5), ("b", 2)]) == [
        AdapterSpec(Path("a"), 0.5), AdapterSpec(Path("b"), 2.0)]
    with pytest.raises(UsageError, match="no adapter given"):
        parse_adapter_specs([])


def test_an_existing_path_is_never_split(tmp_path):
    odd = tmp_path / "ad:0.5"
    odd.mkdir()
    weird = tmp_path / "a,b:1"
    weird.mkdir()
    assert _pairs(parse_adapter_specs(str(odd))) == [(odd, 1.0)]
    assert _pairs(parse_adapter_specs(f"{odd}:2")) == [(odd, 2.0)]
    assert _pairs(parse_adapter_specs(str(weird))) == [(weird, 1.0)]


def test_every_module_uses_the_same_parser():
    import loratool.compose
    import loratool.merge
    import loratool.merge.specs

    assert loratool.compose.parse_adapter_specs is parse_adapter_specs
    assert loratool.merge.parse_adapter_specs is parse_adapter_specs
    assert loratool.merge.specs.AdapterSpec is AdapterSpec


def test_compose_does_not_import_the_merge_package():
    code = "import sys, loratool.compose; print(sorted(m for m in sys.modules if m.startswith('loratool.merge')))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def _command(name: str, fixtures_dir: Path, out: Path, adapters: str) -> list[str]:
    base = str(fixtures_dir / "base_llama")
    return {
        "compose": ["compose", "--adapters", adapters, "-o", str(out)],
        "merge": ["merge", "--base", base, "--adapters", adapters, "-o", str(out), "-q"],
        "parity": ["parity", "--base", base, "--merged", base, "--adapters", adapters, "-q"],
        "unmerge": ["unmerge", "--merged", base, "--adapters", adapters, "-o", str(out), "-q"],
    }[name]


COMMANDS = ["compose", "merge", "parity", "unmerge"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("text,message", BAD, ids=[t or "empty" for t, _ in BAD])
def test_every_command_refuses_the_same_entries(command, text, message, fixtures_dir, tmp_path, capsys):
    adapter = fixtures_dir / "llama_r8"
    # a good entry first: the bad one is refused wherever it stands
    adapters = f"{adapter}:0.5,{text}" if text.strip() else text
    with pytest.raises(SystemExit) as e:
        main(_command(command, fixtures_dir, tmp_path / "out", adapters))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("loratool: error: --adapters:"), err
    assert "is empty" in err or repr(text.split(",")[-1].strip()) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["compose", "merge"])
def test_every_command_reads_a_weighted_path_with_colons(command, fixtures_dir, tmp_path, capsys):
    adapter = tmp_path / "llama:r8"
    shutil.copytree(fixtures_dir / "llama_r8", adapter)
    with pytest.raises(SystemExit) as e:
        main(_command(command, fixtures_dir, tmp_path / "out", f"{adapter}:0.5") + ["--json"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    report = json.loads(out)
    if command == "compose":
        assert [i["weight"] for i in report["inputs"]] == [0.5]
    else:
        assert report["adapters"] == [f"{adapter}:0.5"]
