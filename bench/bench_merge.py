"""Benchmark `loratool merge` against `cp -r` and PEFT, in one run, at two model sizes.

For each size (TinyLlama-shaped bf16 bases with 11 and 22 layers by default, from
``bench/workload.py``, generated once and cached): time ``cp -r`` of the base (and the ``sync``
after it), ``loratool merge`` of the r=16 PEFT adapter (a subprocess, as a user runs it: process
start and torch import included), and PEFT's ``merge_and_unload`` + ``save_pretrained``; peak RSS of
each from ``getrusage(RUSAGE_CHILDREN)`` of a wrapper process; then check that our output equals
PEFT's bit for bit, tensor by tensor. Memory should stay flat when the model doubles.

The merge fsyncs its output before renaming it into place (a crash never leaves a partial OUT)
and ``cp`` does not, so the ratio to compare is ``x cp+sync``: the merge against ``cp -r``
followed by ``sync`` (both timed, fastest of --repeat each); ``x cp`` is printed beside it.

    python bench/bench_merge.py [--layers 11 22] [--work /tmp/loratool-bench-merge] [--json OUT]
                                [--compare OTHER_TREE] [--engine auto|torch]

``--engine torch`` times torch's engine (``LORATOOL_MERGE_ENGINE=torch``) instead of the default
(numpy's, for this plain merge, where the probe vouches for it).

``--compare`` also times the merge of another checkout of loratool (``git worktree add
/tmp/before <commit>``; no venv of its own: it runs with this interpreter, from that tree, with
that tree first on PYTHONPATH, and the run checks that it imports that tree's loratool) in the
same run, and checks that both outputs are equal byte for byte: the before/after of a change.

Outputs are written under --work and removed after each size; cp and our merge run --repeat times
and the fastest run counts (a shared machine is noisy). Page caches are left alone (warm
after the first read), so ``cp -r`` is the warm-cache copy; ``sync`` is timed separately because
the merge fsyncs its output and ``cp`` does not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Runs a command and prints the peak RSS (KB) of its process tree's largest process.
WRAPPER = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
dt = time.perf_counter() - t
print(f"@@ {rc} {dt:.3f} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
"""

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="2GB")
"""


def measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """(seconds, peak RSS in MB) of ``cmd`` run in a fresh wrapper process."""
    p = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("@@ ")]
    if not line:
        raise SystemExit(f"benchmark wrapper failed: {p.stderr[-2000:]}")
    rc, dt, rss = line[-1].split()[1:]
    if int(rc) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{p.stderr[-3000:]}")
    return float(dt), int(rss) // 1024


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def bit_equal(a: Path, b: Path) -> tuple[int, list[str]]:
    """Compare every tensor of two checkpoints by raw bytes; (tensors compared, differing names)."""
    from loratool.checkpoint import BaseCheckpoint

    ca, cb = BaseCheckpoint(a), BaseCheckpoint(b)
    differ = sorted(set(ca.names()) ^ set(cb.names()))
    for name in ca.names():
        if name in cb and (ca.dtype(name) != cb.dtype(name) or ca.ref(name).raw() != cb.ref(name).raw()):
            differ.append(name)
    return len(ca.names()), differ


def best(n: int, run) -> tuple[float, int]:
    """The fastest of ``n`` runs (this is a shared machine) and the largest peak RSS."""
    results = [run() for _ in range(n)]
    return min(r[0] for r in results), max(r[1] for r in results)


def bench_size(layers: int, work: Path, peft: bool, weighted: bool, repeat: int,
               compare: Path | None = None, engine: str = "auto") -> dict:
    from bench.workload import workload

    w = workload(layers=layers)
    base, adapter = w["base"], w["r16_a"]
    size = sum(p.stat().st_size for p in base.iterdir() if p.is_file())
    loratool = [sys.executable, "-m", "loratool"]
    row: dict = {"layers": layers, "base_bytes": size, "engine": engine}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    subprocess.run(["cp", "-r", str(base), str(work / "warm")], check=True)  # warm the page cache
    shutil.rmtree(work / "warm")
    subprocess.run(["sync"], check=True)
    cp, sync = [], []
    for _ in range(repeat):
        cp.append(timed(["cp", "-r", str(base), str(work / "cp")]))
        sync.append(timed(["sync"]))
        shutil.rmtree(work / "cp")
        subprocess.run(["sync"], check=True)
    row["cp_s"], row["sync_after_cp_s"] = round(min(cp), 2), round(min(sync), 2)
    row["import_torch_s"] = round(best(repeat, lambda: measured([sys.executable, "-c", "import torch"]))[0], 2)

    def ours(spec: str, out: Path, src: Path = ROOT):
        # ``python -m`` puts the working directory first on sys.path, ahead of PYTHONPATH: run
        # in the tree whose loratool is timed, and check that it is the one imported
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
                   LORATOOL_MERGE_ENGINE=engine)
        got = subprocess.run([sys.executable, "-c", "import loratool; print(loratool.__file__)"], env=env, cwd=src,
                             capture_output=True, text=True, check=True).stdout.strip()
        if Path(got).resolve() != (src / "loratool" / "__init__.py").resolve():
            raise SystemExit(f"{src}: runs import loratool from {got}, not from that tree")

        def run():
            shutil.rmtree(out, ignore_errors=True)
            return measured([*loratool, "merge", "--base", str(base), "--adapters", spec,
                             "-o", str(out), "--device", "cpu", "--quiet"], env=env, cwd=src)
        return run

    if compare is not None:  # runs alternate (other, ours, ours, other...): both see the same machine,
        # and each goes first as often (the second of a pair runs slower on a busy machine)
        other_run, ours_run = ours(str(adapter), work / "other", compare), ours(str(adapter), work / "ours")
        pairs = []
        for k in range(repeat):
            if k % 2:
                mine = ours_run()
                pairs.append((other_run(), mine))
            else:
                pairs.append((other_run(), ours_run()))
        row.update(compare_src=str(compare), compare_merge_s=round(min(p[0][0] for p in pairs), 2),
                   compare_peak_rss_mb=max(p[0][1] for p in pairs),
                   compare_runs_s=[round(p[0][0], 2) for p in pairs], merge_runs_s=[round(p[1][0], 2) for p in pairs])
        dt, rss = min(p[1][0] for p in pairs), max(p[1][1] for p in pairs)
    else:
        dt, rss = best(repeat, ours(str(adapter), work / "ours"))
    row.update(merge_s=round(dt, 2), merge_peak_rss_mb=rss, merge_over_cp=round(dt / row["cp_s"], 2),
               merge_over_cp_sync=round(dt / (row["cp_s"] + row["sync_after_cp_s"]), 2))
    if compare is not None:
        n, differ = bit_equal(work / "ours", work / "other")
        row.update(compare_bit_equal=not differ, compare_merge_ratio=round(row["merge_s"] / row["compare_merge_s"], 3))
        shutil.rmtree(work / "other")
    if weighted:
        dt, rss = best(repeat, ours(f"{adapter}:0.7,{w['r16_b']}:0.3", work / "ours2"))
        row.update(merge_weighted_s=round(dt, 2), merge_weighted_peak_rss_mb=rss)
        shutil.rmtree(work / "ours2")
    if peft:
        dt, rss = measured([sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(work / "peft")])
        row.update(peft_s=round(dt, 2), peft_peak_rss_mb=rss)
        n, differ = bit_equal(work / "ours", work / "peft")
        row.update(tensors_compared=n, bit_equal_to_peft=not differ, differing=differ[:5])
    shutil.rmtree(work)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[11, 22])
    p.add_argument("--work", type=Path, default=Path("/tmp/loratool-bench-merge"))
    p.add_argument("--no-peft", action="store_true", help="Skip PEFT's merge (and the bit check).")
    p.add_argument("--weighted", action="store_true", help="Also time a:0.7,b:0.3 (two r=16 adapters).")
    p.add_argument("--repeat", type=int, default=3, help="Runs of cp and of our merge; the fastest counts.")
    p.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON here.")
    p.add_argument("--engine", choices=["auto", "torch"], default="auto",
                   help="LORATOOL_MERGE_ENGINE for our merges (both trees with --compare).")
    p.add_argument("--compare", type=Path, default=None,
                   help="Another loratool checkout to time in the same run (before/after a change).")
    args = p.parse_args(argv)
    args.work = args.work.resolve()  # the merges run in the tree they time (``ours``)
    args.compare = args.compare.resolve() if args.compare else None
    rows = []
    for layers in args.layers:
        row = bench_size(layers, args.work, peft=not args.no_peft, weighted=args.weighted, repeat=args.repeat,
                         compare=args.compare, engine=args.engine)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{'layers':>6} {'size GB':>8} {'cp -r s':>8} {'+sync s':>8} {'merge s':>8} {'x cp':>6} "
          f"{'x cp+sync':>9} {'RSS MB':>7} {'PEFT s':>7} {'PEFT MB':>8} {'bits':>5}")
    for r in rows:
        print(f"{r['layers']:>6} {r['base_bytes'] / 1e9:>8.2f} {r['cp_s']:>8.2f} {r['sync_after_cp_s']:>8.2f} "
              f"{r['merge_s']:>8.2f} {r['merge_over_cp']:>6.2f} {r['merge_over_cp_sync']:>9.2f} "
              f"{r['merge_peak_rss_mb']:>7} "
              f"{r.get('peft_s', float('nan')):>7.2f} {r.get('peft_peak_rss_mb', 0):>8} "
              f"{str(r.get('bit_equal_to_peft', '-')):>5}")
        if "compare_merge_s" in r:
            print(f"{'':>6} {r['compare_src']}: merge {r['compare_merge_s']:.2f} s, {r['compare_peak_rss_mb']} MB; "
                  f"this tree / that tree = {r['compare_merge_ratio']:.3f}, same bytes: {r['compare_bit_equal']}")
            print(f"{'':>6} runs, in pairs (each tree first in every other pair): that tree {r['compare_runs_s']}, "
                  f"this tree {r['merge_runs_s']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
