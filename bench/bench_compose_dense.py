"""Benchmark: the dense-delta compose methods (TIES, DARE) vs PEFT's ``*_svd`` combination types
(issue 14: `compose --method ties` on two 154-module adapters took 549 s, silently).

Workload (bench/workload.py, generated once into ~/.cache/loratool-bench): a TinyLlama-1.1B-shaped
random bf16 base and two PEFT adapters r=16 (all-linear: 154 modules).

Measured, each in its own child process (wall, CPU = user+sys and peak RSS from wait4):
  1. `loratool compose --adapters a:0.7,b:0.3 --method M --density 0.5 --rank 16` as a user runs
     it (whole process), for M in ties, dare_ties, dare_linear;
  2. PEFT's add_weighted_adapter(combination_type="ties_svd" / "dare_ties_svd", svd_rank=16,
     density=0.5): on a 2-layer model of the same shapes by default, extrapolated to 22 layers
     (per-layer time × 11; labelled), or on the full model with --peft-full.
Check (ties, 2 layers, where both merge the same delta): per module, loratool's relative error
to the merged delta against PEFT's (its full SVD: the optimum); the ratio must stay under 1+1e-4.

    .venv/bin/python bench/bench_compose_dense.py [--cache DIR] [--peft-full] [--out results.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import run_child  # noqa: E402

W = (0.7, 0.3)
DENSITY, RANK = 0.5, 16
METHODS = ("ties", "dare_ties", "dare_linear")


def child_peft(base: str, a: str, b: str, combination: str, ours: str) -> dict:
    """PEFT's add_weighted_adapter; with ``ours`` (a composed adapter of the same model), each
    module's relative error to the merged delta, PEFT's and ours."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    from loratool.compose_methods.delta import merge_deltas
    from loratool.formats import load_adapter

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    pm = PeftModel.from_pretrained(model, a, adapter_name="a")
    pm.load_adapter(b, adapter_name="b")
    t0 = time.perf_counter()
    pm.add_weighted_adapter(["a", "b"], list(W), "c", combination_type=combination, svd_rank=RANK, density=DENSITY)
    seconds = time.perf_counter() - t0
    res = {"seconds": seconds}
    if ours:
        mine, ratios = load_adapter(ours), []
        for name, mod in pm.named_modules():
            if isinstance(mod, LoraLayer) and "c" in mod.lora_A:
                M = merge_deltas([mod.get_delta_weight("a"), mod.get_delta_weight("b")], W, "ties", DENSITY).double()
                key = name.removeprefix("base_model.model.")
                peft_err = float(torch.linalg.norm(M - mod.get_delta_weight("c").double()) / torch.linalg.norm(M))
                our_err = float(torch.linalg.norm(M - mine.modules[key].delta(torch.float64)) / torch.linalg.norm(M))
                ratios.append(our_err / peft_err)
        res.update(max_error_ratio=max(ratios), min_error_ratio=min(ratios), modules=len(ratios))
    return res


def run(cmd: list[str], label: str) -> dict:
    return run_child(cmd, label)

def compose_cmd(w: dict, out: Path, method: str) -> list[str]:
    return [sys.executable, "-m", "loratool", "compose", "--adapters", f"{w['r16_a']}:{W[0]},{w['r16_b']}:{W[1]}",
            "-o", str(out), "--method", method, "--density", str(DENSITY), "--rank", str(RANK), "--json"]


def main() -> None:
    p = argparse.ArgumentParser(description="dense-delta compose methods vs PEFT's *_svd")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--peft-full", action="store_true", help="run PEFT on all 22 layers (slow)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compose_dense.txt")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_peft(*args.child)))
        return

    from bench.workload import DEFAULT_CACHE, workload

    cache = args.cache or DEFAULT_CACHE
    w22, w2 = workload(cache, 22), workload(cache, 2)
    tmp = Path(tempfile.mkdtemp(prefix="loratool-bench-"))
    lines = [f"== compose 2 r=16 adapters ({W[0]}/{W[1]}), density {DENSITY}, rank {RANK}, 154 modules; "
             f"{os.cpu_count()} CPUs, 1-min load {os.getloadavg()[0]:.1f} at start =="]
    try:
        for m in METHODS:
            r = run(compose_cmd(w22, tmp / m, m), f"loratool compose --method {m}")
            progress = [x for x in r["stderr"].splitlines() if x.startswith("loratool: composing:")]
            lines.append(f"loratool compose --method {m:<12} whole process {r['wall_s']:7.1f} s wall, "
                         f"{r['cpu_s']:7.1f} s CPU, peak RSS {r['maxrss_mb']:6.0f} MB; "
                         f"max rel. error {r['data']['max_relative_error']:.4f}; last progress line: "
                         f"{progress[-1] if progress else '(none)'}")
        layers = 22 if args.peft_full else 2
        wp = w22 if args.peft_full else w2
        ours2 = "" if args.peft_full else str(tmp / "ties_L2")
        if ours2:
            run(compose_cmd(w2, Path(ours2), "ties"), "loratool compose --method ties (2 layers, for the check)")
        for comb in ("ties_svd", "dare_ties_svd"):
            r = run([sys.executable, str(Path(__file__).resolve()), "--child", str(wp["base"]), str(wp["r16_a"]),
                     str(wp["r16_b"]), comb, ours2 if comb == "ties_svd" else ""], f"PEFT {comb} ({layers} layers)")
            s = r["data"]["seconds"]
            lab = f"{s * 22 / layers:7.1f} s for 22 layers (extrapolated from {s:.1f} s on {layers})" \
                if layers != 22 else f"{s:7.1f} s"
            lines.append(f"PEFT add_weighted_adapter({comb:<13}) {lab}; process {r['wall_s']:.1f} s wall, "
                         f"peak RSS {r['maxrss_mb']:.0f} MB")
            if "max_error_ratio" in r["data"]:
                d = r["data"]
                lines.append(f"ties, {d['modules']} modules of 2 layers: our error / PEFT's full-SVD error "
                             f"in [{d['min_error_ratio']:.6f}, {d['max_error_ratio']:.6f}] (limit 1+1e-4)")
                if d["max_error_ratio"] > 1 + 1e-4:
                    lines.append("CHECK FAILED")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines.append(f"(1-minute load average {os.getloadavg()[0]:.1f} at end; other processes share these cores: "
                 "wall times are indicative, CPU times less so)")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    if "CHECK FAILED" in text:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
