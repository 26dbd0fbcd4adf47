"""Every broken input: one line naming the file and the problem, a non-zero exit, no traceback,
and the input left untouched."""

import hashlib

import pytest

from fixtures.broken import CASES, case_path


def _digest(path):
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("name,what,inspect_rc,validate_rc,phrase", CASES, ids=[c[0] for c in CASES])
def test_catalogue(cli, fixtures_dir, name, what, inspect_rc, validate_rc, phrase):
    path = case_path(fixtures_dir / "broken", name)
    before = _digest(path)
    for cmd, rc in (("inspect", inspect_rc), ("validate", validate_rc)):
        p = cli(cmd, path)
        out = p.stdout + p.stderr
        assert p.returncode == rc, f"{cmd} {name}: rc {p.returncode}\n{out}"
        assert "Traceback" not in out
        if rc == 2:
            assert p.stdout == ""
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1, lines
            assert lines[0].startswith("loratool: error: ")
            assert phrase.lower() in lines[0].lower()
            assert str(path.name) in lines[0] or str(path) in lines[0]
        elif rc == 1:
            errors = [l for l in p.stdout.splitlines() if l.startswith("ERROR")]
            assert errors and phrase.lower() in " ".join(errors).lower()
            assert all(("safetensors" in l or "adapter_config.json" in l or str(path) in l) for l in errors)
    assert _digest(path) == before  # inputs are never modified


def test_catalogue_is_large_enough():
    assert len(CASES) >= 12
