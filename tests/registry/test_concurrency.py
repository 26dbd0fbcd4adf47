"""Real processes: many `loratool registry add` at once, and kill -9 in the middle of an add."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file


def start(*args, home) -> subprocess.Popen:
    env = dict(os.environ, LORATOOL_HOME=str(home))
    env.pop("LORATOOL_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "loratool", "registry", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(*args, home) -> subprocess.CompletedProcess:
    p = start(*args, home=home)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_concurrent_adds(make_adapter, home):
    srcs = [make_adapter(f"a{i}", seed=i, r=2 + i) for i in range(8)]
    jobs = [(srcs[i], f"n{i}") for i in range(8)] + [(srcs[0], "n0"), (srcs[1], "n1")]
    procs = [start("add", src, "--name", name, home=home) for src, name in jobs]
    results = [(p, *p.communicate(timeout=120)) for p in procs]
    for p, out, err in results:
        assert p.returncode == 0, err
        assert err == ""
    listed = json.loads(run("list", "--json", home=home).stdout)["adapters"]
    assert sorted(e["name"] for e in listed) == [f"n{i}" for i in range(8)]
    assert all(e["version"] == 1 for e in listed)  # a duplicate of the latest content is no new version
    assert len({e["digest"] for e in listed}) == 8

    # different content under one name at once: versions 1..5, none lost, none doubled
    procs = [start("add", src, "--name", "shared", home=home) for src in srcs[:5]]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    shared = json.loads(run("list", "--name", "shared", "--json", home=home).stdout)["adapters"]
    assert sorted(e["version"] for e in shared) == [1, 2, 3, 4, 5]
    assert len({e["digest"] for e in shared}) == 5

    r = run("verify", home=home)
    assert r.returncode == 0, r.stdout + r.stderr

    # flip one byte of n3's weights: verify exits 1 naming n3 (and shared@k holding the same blob)
    digest = next(e["digest"] for e in listed if e["name"] == "n3")
    show = json.loads(run("show", f"sha256:{digest[:10]}", "--json", home=home).stdout)
    sha = next(f["sha256"] for f in show["files"] if f["path"] == "adapter_model.safetensors")
    blob = home / "blobs" / "sha256" / sha[:2] / sha[2:]
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    r = run("verify", home=home)
    assert r.returncode == 1
    shared_n3 = next(e["ref"] for e in shared if e["digest"] == digest)
    assert f"n3@1, {shared_n3}" in r.stderr and r.stderr.startswith("loratool: error: registry verify:")
    assert "n0@1" not in r.stdout + r.stderr


def big_adapter(d, seed: int):
    """~51 MB: two fp32 factors of 25.6 MB each."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    n, r = 100_000, 64
    k = "base_model.model.model.layers.0.mlp.up_proj"
    save_file({k + ".lora_A.weight": torch.randn(r, n, generator=g), k + ".lora_B.weight": torch.randn(n, r, generator=g)},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r,
                                                      "target_modules": ["up_proj"]}))
    return d


def add_and_kill(src, home) -> bool:
    """Start an add and SIGKILL it once its weights blob is being written; False when the add
    finished before that was seen (a busy machine can starve the poller)."""
    tmp_dir = home / "blobs" / "tmp"
    proc = start("add", src, "--name", "big", home=home)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            writing = any(e.name.startswith("adapter_model") for e in os.scandir(tmp_dir))
        except FileNotFoundError:
            writing = False
        if writing:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL
            return True
        time.sleep(0.0005)
    proc.communicate(timeout=60)
    return False


def test_kill_during_add_leaves_a_consistent_store(tmp_path, home):
    for attempt in range(3):
        src = big_adapter(tmp_path / f"big{attempt}", seed=attempt)
        if add_and_kill(src, home):
            break
        assert run("rm", "big", home=home).returncode == 0
        assert run("gc", home=home).returncode == 0
    else:
        raise AssertionError("three adds finished before their weights were seen being written")

    r = run("verify", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(run("list", "--json", home=home).stdout)["adapters"] == []

    r = run("add", src, "--name", "big", home=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("added big@")
    assert run("verify", home=home).returncode == 0
    r = run("gc", "--json", home=home)
    assert json.loads(r.stdout)["temp_files_removed"] >= 1
    assert list((home / "blobs" / "tmp").iterdir()) == []
    assert run("verify", home=home).returncode == 0
