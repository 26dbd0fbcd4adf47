"""Benchmark `loratool merge --base-precision nf4` against the plain merge, in the same run
(issue 16: goal at most 1.5x the plain merge's time, with flat memory).

On the TinyLlama-shaped 1.1B bf16 base of ``bench/workload.py`` (cached) and its r=16 PEFT
adapter: the plain merge, ``--base-precision nf4`` and ``--base-precision nf4,double-quant``, then
the plain and nf4 merges again with ``LORATOOL_MERGE_ENGINE=torch`` (the engine a machine whose
numpy GEMM fails the probe takes; its ratio is to the plain merge on the same engine),
each a subprocess as a user runs it, timed (fastest of --repeat) with its CPU time (user + system)
and the peak RSS of the process (``getrusage(RUSAGE_CHILDREN)`` of a wrapper): on a machine
shared with other work the wall time moves with the load, the CPU time much less. With
``--check N`` the first N merged tensors of the nf4 and nf4,double-quant outputs are compared with
round(dequant(quant(W)) + ΔW) computed independently by bitsandbytes and torch (PEFT's float32
arithmetic; torch on one thread, whose float32 mean the double quantization's offset follows).

With ``--micro`` it first times the round trip alone (``bnb.roundtrip_norms``, one thread, CPU
time, best of 5) on one 2048 x 5632 bf16 block of the base's first MLP weight, in pieces of 256K
elements as the merge's row blocks give it: ns per element for nf4 and nf4,double-quant (about a
second; what the merge adds per merged element, against which the load of a shared machine moves
the wall time of the whole bench far more).

    python bench/bench_quant_merge.py [--layers 22] [--work /tmp/loratool-bench-quant] [--repeat 1]
                                      [--check 4] [--micro] [--out bench/results/quant_merge.txt]
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

WRAPPER = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
dt = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"@@ {rc} {dt:.3f} {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime:.3f}", file=sys.stderr)
"""


def run(cmd: list[str], env: dict | None = None) -> tuple[float, int, str, float]:
    """(seconds, peak RSS in MB, stdout, CPU seconds) of ``cmd`` in a wrapper process (``env``
    added to the environment)."""
    p = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    line = [x for x in p.stderr.splitlines() if x.startswith("@@ ")]
    if not line or line[-1].split()[1] != "0":
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    _, _, dt, rss, cpu = line[-1].split()
    return float(dt), int(rss) // 1024, p.stdout, float(cpu)


def check(base: Path, adapter: Path, out: Path, count: int, double_quant: bool) -> list[str]:
    """The first ``count`` merged tensors of ``out`` against bitsandbytes + torch."""
    import torch

    torch.set_num_threads(1)  # the offset of double quantization: torch's single-threaded mean
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from safetensors import safe_open

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lines = []
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fa:
        names = sorted(k[len("base_model.model."):-len(".lora_A.weight")] for k in fa.keys() if k.endswith("lora_A.weight"))
        index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        for name in names[:count]:
            key = name + ".weight"
            with safe_open(str(base / index[key]), "pt") as fb, safe_open(str(out / index[key]), "pt") as fo:
                w, got = fb.get_tensor(key), fo.get_tensor(key)
            packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            b = fa.get_tensor(f"base_model.model.{name}.lora_B.weight").float()
            a = fa.get_tensor(f"base_model.model.{name}.lora_A.weight").float()
            want = (dequantize_4bit(packed, state).float() + (b @ a) * scale).to(torch.bfloat16)
            same = torch.equal(got.view(torch.int16), want.view(torch.int16))
            lines.append(f"  {key}: {'bit-equal' if same else 'DIFFERS'} ({got.numel()} elements)")
    return lines


def micro(base: Path) -> list[str]:
    """ns per element of the round trip alone on one 2048 x 5632 bf16 block (see the docstring)."""
    import numpy as np

    from loratool.quant import bnb
    from loratool.safetensors_io import SafetensorsFile

    files = sorted(base.glob("*.safetensors"))
    key, st = next((k, st) for st in map(SafetensorsFile, files) for k in sorted(st.keys())
                   if k.endswith("mlp.up_proj.weight"))
    raw = np.frombuffer(st.ref(key).raw(), np.uint16)[: 2048 * 5632].copy()
    n, piece = raw.size, 1 << 18
    out = np.empty(n, np.uint16)
    lines = []
    for dq in (False, True):
        spec = bnb.QuantSpec("nf4", 64, dq)
        absmax = bnb.absmax_bits(raw, "BF16", 64)
        scale = bnb.quantize_absmax(absmax).dequantize() if dq else None
        best = float("inf")
        for _ in range(5):
            t = time.thread_time()
            for e0 in range(0, n, piece):
                c0, c1 = e0 // 64, (e0 + piece) // 64
                bnb.roundtrip_norms(raw[e0:e0 + piece], "BF16", spec, out=out[e0:e0 + piece],
                                    scale=None if scale is None else scale[c0:c1], absmax=absmax[c0:c1] if dq else None)
            best = min(best, time.thread_time() - t)
        lines.append(f"round trip alone, {spec}: {best / n * 1e9:5.2f} ns/element (CPU, one thread; {key})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--work", type=Path, default=Path("/tmp/loratool-bench-quant"))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--check", type=int, default=4)
    ap.add_argument("--micro", action="store_true", help="first time the round trip alone on one block")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from bench.workload import workload

    w = workload(layers=args.layers)
    base, adapter = Path(w["base"]), Path(w["r16_a"])
    args.work.mkdir(parents=True, exist_ok=True)
    lines = [f"# bench_quant_merge: {base} ({args.layers} layers), adapter {adapter.name}, "
             f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}",
             "# command: python bench/bench_quant_merge.py " + " ".join(sys.argv[1:])]
    if args.micro:
        lines += micro(base)
        print("\n".join(lines[-2:]), flush=True)
    results = {}
    torch_engine = {"LORATOOL_MERGE_ENGINE": "torch"}
    for label, extra, env in [("plain", [], None), ("nf4", ["--base-precision", "nf4"], None),
                              ("nf4,double-quant", ["--base-precision", "nf4,double-quant"], None),
                              ("plain, torch engine", [], torch_engine),
                              ("nf4, torch engine", ["--base-precision", "nf4"], torch_engine)]:
        best = None
        for _ in range(args.repeat):
            out = args.work / "out"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "loratool", "merge", "--base", str(base), "--adapters", str(adapter),
                   "-o", str(out), "-q", "--json", *extra]
            dt, rss, stdout, cpu = run(cmd, env)
            if best is None or dt < best[0]:
                best = (dt, rss, cpu)
        results[label] = best
        res = json.loads(stdout)
        warns = sum(1 for q in res.get("quantization", []) if q["warn"])
        ref = results["plain, torch engine" if env else "plain"]
        ratio, cpu_ratio = best[0] / ref[0], best[2] / ref[2]
        lines.append(f"{label:20s} {best[0]:7.2f} s  {ratio:5.2f}x plain  CPU {best[2]:6.2f} s {cpu_ratio:5.2f}x  "
                     f"peak RSS {best[1]:6d} MB"
                     + (f"  ({len(res['quantization'])} tensors, {warns} with ‖q‖ > ‖ΔW‖)" if label.startswith("nf4") else ""))
        print(lines[-1], flush=True)
        if label.startswith("nf4") and args.check:
            lines.append(f"check of {label} against bitsandbytes + torch, first {args.check} merged tensors:")
            lines += check(base, adapter, out, args.check, "double-quant" in label)
            print("\n".join(lines[-args.check - 1:]), flush=True)
        shutil.rmtree(args.work / "out", ignore_errors=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
