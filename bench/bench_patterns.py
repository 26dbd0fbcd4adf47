"""Bench the cost of hostile PEFT pattern keys (issue 11): `inspect` and `merge` of the llama_r8
fixture with a catastrophic regex key (``(.|.)*Z``) and with a 100k-key ``rank_pattern``, against
the same commands on the plain adapter, in one run (subprocesses, as a user runs them).

    python bench/bench_patterns.py [--fixtures fixtures/build] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loratool", *args], check=True, capture_output=True)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", type=Path, default=ROOT / "fixtures" / "build")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-patterns-"))
    try:
        cases = {"plain": None, "catastrophic key": {"(.|.)*Z": 4},
                 "100k keys": {f"model.layers.{i}.self_attn.q_proj": 8 for i in range(100_000)}}
        base = args.fixtures / "base_llama"
        print(f"{'case':<18} {'inspect s':>9} {'x plain':>8} {'merge s':>8} {'x plain':>8}")
        plain = None
        for name, pattern in cases.items():
            d = work / name.replace(" ", "_")
            shutil.copytree(args.fixtures / "llama_r8", d)
            if pattern is not None:
                cfg = json.loads((d / "adapter_config.json").read_text())
                cfg["rank_pattern"] = {**cfg.get("rank_pattern", {}), **pattern}
                (d / "adapter_config.json").write_text(json.dumps(cfg))
            ins = min(timed(["inspect", str(d)]) for _ in range(args.repeat))
            out = work / "out"
            mer = []
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                mer.append(timed(["merge", "--base", str(base), "--adapters", str(d), "-o", str(out), "-q"]))
            row = (ins, min(mer))
            plain = plain or row
            print(f"{name:<18} {row[0]:>9.2f} {row[0] / plain[0]:>8.2f} {row[1]:>8.2f} {row[1] / plain[1]:>8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
