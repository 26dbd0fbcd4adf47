"""Benchmark `loratool parity` against the merge it checks, in one run (issue 14).

For each size (TinyLlama-shaped bf16 bases from ``bench/workload.py``, 22 layers = 1.1B
parameters by default): ``loratool merge`` of the r=16 PEFT adapter, then ``loratool parity`` of
its output, each a whole process as a user runs it (start-up included), with its peak RSS from
``getrusage(RUSAGE_CHILDREN)`` of a wrapper process (``bench_merge.measured``); the ratio
parity / merge is the figure issue 14 asks for (at most 2, peak under 600 MB). ``--forward``
also times ``parity --forward`` (transformers + PEFT: float32 models), on the sizes given.

    python bench/bench_parity.py [--layers 22] [--forward-layers 11] [--work DIR] [--out FILE]

The machine's load average is recorded before and after: on a shared machine wall times move
with it, so both processes run back to back, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_merge import measured  # noqa: E402


def bench_size(layers: int, work: Path, forward: bool) -> dict:
    from bench.workload import workload

    w = workload(layers=layers)
    base, adapter = w["base"], w["r16_a"]
    merged = work / f"merged-L{layers}"
    shutil.rmtree(merged, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    loratool = [sys.executable, "-m", "loratool"]
    row: dict = {"layers": layers, "base_bytes": sum(p.stat().st_size for p in base.iterdir() if p.is_file()),
                 "load_before": os.getloadavg()[0]}
    row["merge_s"], row["merge_peak_rss_mb"] = measured(
        [*loratool, "merge", "--base", str(base), "--adapters", str(adapter), "-o", str(merged), "--device", "cpu",
         "--quiet"], cwd=ROOT)
    parity = [*loratool, "parity", "--base", str(base), "--merged", str(merged), "--adapters", str(adapter),
              "--quiet", "--json"]
    row["parity_s"], row["parity_peak_rss_mb"] = measured(parity, cwd=ROOT)  # exit 0: it passed
    row["parity_over_merge"] = round(row["parity_s"] / row["merge_s"], 2)
    if forward:
        row["forward_s"], row["forward_peak_rss_mb"] = measured([*parity, "--forward"], cwd=ROOT)
    row["load_after"] = os.getloadavg()[0]
    shutil.rmtree(merged)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[22])
    p.add_argument("--forward-layers", type=int, nargs="*", default=[],
                   help="Sizes at which to also time parity --forward.")
    p.add_argument("--work", type=Path, default=Path("/tmp/loratool-bench-parity"))
    p.add_argument("--out", type=Path, default=None, help="Also write the table here.")
    args = p.parse_args(argv)
    rows = []
    for layers in sorted(set(args.layers) | set(args.forward_layers)):
        row = bench_size(layers, args.work.resolve(), layers in args.forward_layers)
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(args.work, ignore_errors=True)
    lines = [f"{'layers':>6} {'size GB':>8} {'merge s':>8} {'RSS MB':>7} {'parity s':>9} {'RSS MB':>7} "
             f"{'x merge':>8} {'fwd s':>7} {'fwd MB':>7} {'load':>9}"]
    for r in rows:
        lines.append(f"{r['layers']:>6} {r['base_bytes'] / 1e9:>8.2f} {r['merge_s']:>8.2f} {r['merge_peak_rss_mb']:>7} "
                     f"{r['parity_s']:>9.2f} {r['parity_peak_rss_mb']:>7} {r['parity_over_merge']:>8.2f} "
                     f"{r.get('forward_s', float('nan')):>7.1f} {r.get('forward_peak_rss_mb', 0):>7} "
                     f"{r['load_before']:>4.1f}-{r['load_after']:<4.1f}")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join([json.dumps(r) for r in rows] + [""] + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
