"""Benchmark: whole `loratool` processes on the CPU paths that need no torch (issue 14).

Workload (bench/workload.py, in ~/.cache/loratool-bench): the TinyLlama-1.1B-shaped model and its
PEFT adapters (all-linear: 154 modules, r=16 ×2). Each command runs in a fresh interpreter, timed
from the parent (interpreter start to exit, best of --repeat), which also records whether torch
was imported:

  1. `loratool validate r16_a`
  2. `loratool inspect --spectrum r16_a`
  3. `loratool compose --adapters r16_a:0.7,r16_b:0.3 --rank 16`
  4. PEFT's add_weighted_adapter(combination_type="svd", svd_rank=16) in the same run, on a 2-layer
     model of the same shapes (bench_lowrank's child), extrapolated × 11 to 22 layers (labelled).

The load average is printed before and after: on a shared machine the figures move with it.

    .venv/bin/python bench/bench_cpu_paths.py [--cache DIR] [--repeat 3] [--no-peft] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workload import DEFAULT_CACHE, workload  # noqa: E402

# One command in a fresh interpreter; its last stderr line says whether torch was imported.
RUN = ("import sys\n"
       "from loratool.cli import main\n"
       "try:\n"
       "    main(sys.argv[1:])\n"
       "except SystemExit as e:\n"
       "    code = e.code or 0\n"
       "else:\n"
       "    code = 0\n"
       "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n"
       "sys.exit(code)\n")


def whole_process(args: list[str], repeat: int) -> dict:
    best, torch_loaded = None, None
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            argv = [a.replace("{tmp}", tmp) for a in args]
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True, cwd=tmp,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
            wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"loratool {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        torch_loaded = p.stderr.strip().splitlines()[-1].endswith("True")
        best = wall if best is None else min(best, wall)
    return {"wall_s": best, "torch": torch_loaded}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's svd combination")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_paths.txt")
    args = p.parse_args()

    w = workload(args.cache)
    a, b = str(w["r16_a"]), str(w["r16_b"])
    lines = [f"bench_cpu_paths: whole processes, best of {args.repeat}; {os.cpu_count()} CPUs",
             f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    runs = [("validate r16_a", ["validate", a], 0.5),
            ("inspect --spectrum r16_a", ["inspect", "--spectrum", a], 0.5),
            ("compose 0.7/0.3 --rank 16", ["compose", "--adapters", f"{a}:0.7,{b}:0.3", "--rank", "16",
                                           "-o", "{tmp}/out"], 1.5)]
    compose_s = None
    for label, cmd, target in runs:
        print(f"  running {label} ...", flush=True)
        r = whole_process(cmd, args.repeat)
        compose_s = r["wall_s"]
        lines.append(f"{label:<28} {r['wall_s']:7.2f} s   torch imported: {'yes' if r['torch'] else 'no '}   "
                     f"(target < {target} s)")
    if not args.no_peft:
        from bench.bench_lowrank import child_cmd, run

        w2 = workload(args.cache, layers=2)
        peft = run(child_cmd("peft_svd", w2["base"], w2["r16_a"], w2["r16_b"]), "PEFT svd (2 layers)")
        s2 = peft["data"]["seconds"]
        lines.append(f"PEFT add_weighted_adapter svd, 2 layers measured  {s2:8.2f} s (compute only, in-process)")
        lines.append(f"PEFT svd, 22 layers (extrapolated × 11)           {s2 * 11:8.1f} s")
        lines.append(f"ratio PEFT (22 layers, compute) / our compose (whole process)  {s2 * 11 / compose_s:6.0f} x")
    lines.append(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
