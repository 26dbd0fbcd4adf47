"""Benchmark `loratool fingerprint` against `sha256sum`, and the hash cache against a fresh run.

    python bench/bench_fingerprint.py [BASE]

BASE defaults to the TinyLlama-shaped workload of bench/workload.py (generated and cached there).
In one run, on the same files:

1. read every weight file once (untimed), so that all three timings below hash from the page
   cache and compare hashing, not whichever command happened to go first to the disk;
2. ``sha256sum FILES``;
3. ``loratool fingerprint BASE --json --no-cache`` (hashes every file; stores the hashes in a
   temporary $LORATOOL_HOME);
4. ``loratool fingerprint BASE --json`` again (served from that cache).

Every per-file sha256 of run 3 must equal sha256sum's, and run 4 must print the same JSON;
otherwise it exits 1. Prints the speed ratio (sha256sum time / loratool time: above 1, loratool is
faster) and the second-run/first-run time ratio. Both loratool timings include starting Python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def default_base() -> Path:
    from bench.workload import workload

    return Path(workload()["base"])


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"bench_fingerprint: {' '.join(cmd[:4])}… failed ({r.returncode}): {r.stderr.strip()}")
    return elapsed, r.stdout


def warm(files: list[Path]) -> None:
    buf = bytearray(8 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", nargs="?", type=Path, help="base directory or .safetensors file")
    args = parser.parse_args(argv)
    base = args.base or default_base()

    from loratool.checkpoint import BaseCheckpoint

    files = BaseCheckpoint(base).files
    root = base if base.is_dir() else base.parent
    total = sum(f.stat().st_size for f in files)
    gb = total / 1e9
    print(f"base: {base} ({len(files)} files, {gb:.2f} GB); {os.cpu_count()} CPUs")
    warm(files)

    t_sum, out = timed(["sha256sum", *map(str, files)])
    expected = {}
    for line in out.splitlines():
        sha, _, name = line.partition("  ")
        expected[Path(name).resolve().relative_to(root.resolve()).as_posix()] = sha

    with tempfile.TemporaryDirectory(prefix="loratool-bench-home-") as home:
        env = dict(os.environ, LORATOOL_HOME=home)
        cmd = [sys.executable, "-m", "loratool", "fingerprint", str(base), "--json"]
        t_first, out1 = timed(cmd + ["--no-cache"], env)
        t_second, out2 = timed(cmd, env)

    got = {f["path"]: f["sha256"] for f in json.loads(out1)["files"]}
    ok = True
    if got != expected:
        ok = False
        for path in sorted(expected.keys() | got.keys()):
            if expected.get(path) != got.get(path):
                print(f"MISMATCH {path}: sha256sum {expected.get(path)}, loratool {got.get(path)}")
    else:
        print(f"all {len(got)} per-file sha256 equal sha256sum's")
    if out2 != out1:
        ok = False
        print("MISMATCH: the cached run printed a different fingerprint")

    print(f"sha256sum:                       {t_sum:8.3f} s  {gb / t_sum:6.2f} GB/s")
    print(f"loratool fingerprint --no-cache: {t_first:8.3f} s  {gb / t_first:6.2f} GB/s")
    print(f"loratool fingerprint (cached):   {t_second:8.3f} s")
    print(f"speed ratio (sha256sum / loratool): {t_sum / t_first:.2f}")
    print(f"second run / first run:             {t_second / t_first:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
