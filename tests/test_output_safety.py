"""Outputs appear whole or not at all: a file-size limit (a full disk stands in the same way)
fails with one line and leaves nothing; a finished output has the usual permissions."""

import hashlib
import os
import resource
import stat
import subprocess
import sys

import pytest


def _digest(path):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _limited(limit_bytes):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


@pytest.mark.parametrize("command", ["merge", "convert", "resize"])
def test_file_size_limit_leaves_no_output(fixtures_dir, tmp_path, command):
    out = tmp_path / "out"
    args = {
        "merge": ["merge", "--base", fixtures_dir / "base_llama", "--adapters", fixtures_dir / "llama_r8",
                  "-o", out, "--quiet"],
        "convert": ["convert", fixtures_dir / "llama_r8", "--to", "peft", "-o", out],
        "resize": ["resize", fixtures_dir / "llama_r8", "--rank", "6", "-o", out],
    }[command]
    inputs = [fixtures_dir / "base_llama", fixtures_dir / "llama_r8"]
    before = [_digest(p) for p in inputs]
    p = subprocess.run([sys.executable, "-m", "loratool", *map(str, args)], capture_output=True, text=True,
                       preexec_fn=_limited(20_000))
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("loratool: error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []  # no output, no temporary left behind
    assert [_digest(p) for p in inputs] == before


def test_outputs_get_the_usual_mode(fixtures_dir, tmp_path):
    subprocess.run([sys.executable, "-m", "loratool", "convert", str(fixtures_dir / "kohya_sd.safetensors"),
                    "--to", "kohya", "-o", str(tmp_path / "k.safetensors")], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "loratool", "convert", str(fixtures_dir / "llama_r8"), "--to", "peft",
                    "-o", str(tmp_path / "p")], check=True, capture_output=True)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "k.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o777 & ~umask
