"""validate's output for people and CI: findings grouped by check id with a few examples and a
count, modules in natural order, ``--ignore ID`` (ids or names) out of the verdict, counts in JSON."""

from __future__ import annotations

import json

from loratool.cli.validate import render_lines
from loratool.text import natural_key
from loratool.validation import CHECKS, ignored_checks, validate


def test_natural_order():
    names = ["layers.10.q", "layers.2.q", "layers.1.q", "layers.1.k", "a", "layers.11.q"]
    assert sorted(names, key=natural_key) == ["a", "layers.1.k", "layers.1.q", "layers.2.q", "layers.10.q",
                                              "layers.11.q"]


def test_grouped_with_examples_and_count(fixtures_dir):
    r = validate(fixtures_dir / "llama_r8", base=fixtures_dir / "base_gpt2")
    missing = [f for f in r.findings if f.id == "LT301"]
    assert r.counts["LT301"] == len(missing) == r.num_modules > 3 and not r.passed
    mods = [f.module for f in missing]
    assert mods == sorted(mods, key=natural_key)
    lines = render_lines(r)
    assert sum(1 for line in lines if line.startswith("ERROR   LT301")) == 3
    assert f"... and {len(missing) - 3} more like these ({len(missing)} in all" in "\n".join(lines)
    assert sum(1 for line in render_lines(r, None) if line.startswith("ERROR   LT301")) == len(missing)
    assert lines[-1].startswith("FAIL: ")


def test_ignore_by_id_or_name_changes_the_verdict(fixtures_dir, cli):
    r = validate(fixtures_dir / "llama_r8", base=fixtures_dir / "base_gpt2", ignore=["LT301", "no-manifest"])
    assert r.passed and r.exit_code == 0 and r.num_errors == 0
    assert r.ignored == {"LT301": r.num_modules, "LT307": 1} and not any(f.id in r.ignored for f in r.findings)
    p = cli("validate", fixtures_dir / "llama_r8", "--base", fixtures_dir / "base_gpt2", "--ignore", "target-missing",
            "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["ignored"]["LT301"] == data["num_modules"] and "LT301" not in data["counts"]
    p = cli("validate", fixtures_dir / "llama_r8", "--ignore", "LT999")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "'LT999': no such check" in p.stderr


def test_every_check_can_be_named():
    assert ignored_checks(["lt101,zero-b", " LT406 "]) == {"LT101", "LT202", "LT406"}
    assert ignored_checks([",".join(CHECKS.values())]) == set(CHECKS)
