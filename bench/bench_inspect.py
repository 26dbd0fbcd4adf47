"""Whole-process timings of `loratool --help`, `inspect --json` and `inspect --json --spectrum`
on a PEFT all-linear r=16 adapter of the TinyLlama-shaped 1.1B workload (154 modules), plus
`validate`. Goals (issue 3): --help < 0.5 s, inspect < 2 s, --spectrum < 5 s.

    .venv/bin/python bench/bench_inspect.py [--adapter DIR] [--runs 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], runs: int) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(runs):
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
        out = p.stdout
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    adapter = args.adapter
    if adapter is None:
        from bench.workload import workload

        adapter = workload()["r16_a"]
    exe = str(Path(sys.executable).with_name("loratool"))
    rows = {}
    rows["help"], _ = timed([exe, "--help"], args.runs)
    rows["inspect"], out = timed([exe, "inspect", "--json", str(adapter)], args.runs)
    report = json.loads(out)
    rows["inspect_spectrum"], out = timed([exe, "inspect", "--json", "--spectrum", str(adapter)], args.runs)
    spectra = json.loads(out)["modules"]
    rows["validate"], _ = timed([exe, "validate", str(adapter)], args.runs)
    goals = {"help": 0.5, "inspect": 2.0, "inspect_spectrum": 5.0, "validate": None}
    print(f"adapter: {adapter} ({report['num_modules']} modules, rank {report['rank']}, alpha {report['alpha']}, "
          f"{report['file_size'] / 1e6:.1f} MB); cores: {os.cpu_count()}; median of {args.runs} runs")
    for name, secs in rows.items():
        goal = goals[name]
        verdict = "" if goal is None else (f"goal < {goal} s: " + ("ok" if secs < goal else "MISSED"))
        print(f"  {name:18} {secs:6.2f} s   {verdict}")
    assert report["num_modules"] == len(spectra)
    if args.out:
        args.out.write_text(json.dumps({"adapter": str(adapter), "modules": report["num_modules"],
                                        "seconds": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
