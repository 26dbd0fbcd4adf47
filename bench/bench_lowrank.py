"""Benchmark: compose and resize on the r×r core vs PEFT's dense SVD (issue 5).

Workload (bench/workload.py, generated once into ~/.cache/loratool-bench): a TinyLlama-1.1B-shaped
random bf16 base and PEFT adapters (all-linear: 154 modules, r=16 ×2 and r=64).

Measured, each in its own child process (peak memory = that child's ru_maxrss, from wait4):
  1. `loratool compose --adapters a:0.7,b:0.3 --rank 16` as a user runs it (whole process);
  2. the same composition in-process, compute only (compose_adapters, without imports and I/O);
  3. PEFT's add_weighted_adapter(combination_type="svd", svd_rank=16) — on a 2-layer model of the
     same shapes by default, extrapolated to 22 layers (per-layer time × 22; clearly labelled),
     or on the full model with --peft-full; and our compose on that same 2-layer model;
  4. resize r=64 -> 8: `loratool resize` (whole process) and compute only, vs a full-matrix SVD of
     each dense delta (torch.linalg.svd) on one layer's 7 modules, extrapolated × 22.
Checks: per module, the relative Frobenius error of the written composition (read back from disk)
equals the optimal rank-16 error ±1e-4; on the 2-layer model it also equals the error of PEFT's
dense-SVD result ±1e-4.

    .venv/bin/python bench/bench_lowrank.py [--cache DIR] [--peft-full] [--json results.json]
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


# -- children ------------------------------------------------------------------------------------

def child_compose(a: str, b: str, out: str) -> dict:
    """Compute-only timing of our composition, then the error check of the CLI's written output."""
    import torch

    from loratool.compose import compose_adapters
    from loratool.formats import load_adapter
    from loratool.lowrank import RankRule

    A, B = load_adapter(a), load_adapter(b)
    t0 = time.perf_counter()
    composed, report = compose_adapters([A, B], W, "linear", RankRule(rank=16))
    compute = time.perf_counter() - t0
    res = {"compute_s": compute, "modules": len(report.modules)}
    if out:
        written = load_adapter(out)
        worst, errs = 0.0, {}
        for row in report.modules:
            name = row.name
            M = W[0] * A.modules[name].delta(torch.float64) + W[1] * B.modules[name].delta(torch.float64)
            got = written.modules[name].delta(torch.float64)
            err = float(torch.linalg.norm(M - got) / torch.linalg.norm(M))
            errs[name] = err
            worst = max(worst, abs(err - row.relative_error))
        res.update(max_abs_error_gap=worst, errors=errs,
                   optimal={r.name: r.relative_error for r in report.modules})
    return res


def child_peft_svd(base: str, a: str, b: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    pm = PeftModel.from_pretrained(model, a, adapter_name="a")
    pm.load_adapter(b, adapter_name="b")
    t0 = time.perf_counter()
    pm.add_weighted_adapter(["a", "b"], list(W), "svd", combination_type="svd", svd_rank=16)
    seconds = time.perf_counter() - t0
    from peft.tuners.lora import LoraLayer

    errs = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and "svd" in mod.lora_A:
            M = W[0] * mod.get_delta_weight("a").double() + W[1] * mod.get_delta_weight("b").double()
            got = mod.get_delta_weight("svd").double()
            errs[name.removeprefix("base_model.model.")] = float(torch.linalg.norm(M - got) / torch.linalg.norm(M))
    return {"seconds": seconds, "modules": len(errs), "errors": errs}


def child_resize(a: str) -> dict:
    import torch  # noqa: F401  (imported before the clock starts, as in child_compose)

    from loratool.formats import load_adapter
    from loratool.lowrank import RankRule
    from loratool.resize import resize_adapter

    A = load_adapter(a)
    t0 = time.perf_counter()
    _, report = resize_adapter(A, RankRule(rank=8))
    return {"compute_s": time.perf_counter() - t0, "modules": report.num_modules,
            "max_relative_error": report.max_relative_error}


def child_dense_resize(a: str, layer: int) -> dict:
    """PEFT/kohya style: form each dense delta and run a full-matrix SVD, for one layer."""
    import torch

    from loratool.formats import load_adapter

    A = load_adapter(a)
    names = [n for n in A.modules if f".layers.{layer}." in n]
    t0 = time.perf_counter()
    for n in names:
        M = A.modules[n].delta(torch.float32)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        _ = (U[:, :8] * S[:8]) @ Vh[:8]
    return {"seconds": time.perf_counter() - t0, "modules": len(names)}


CHILDREN = {"compose": child_compose, "peft_svd": child_peft_svd, "resize": child_resize,
            "dense_resize": child_dense_resize}


# -- parent --------------------------------------------------------------------------------------

def run(cmd: list[str], label: str) -> dict:
    return run_child(cmd, label)

def child_cmd(name: str, *args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", name, *map(str, args)]


def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "loratool", *map(str, args)]


def main() -> None:
    p = argparse.ArgumentParser(description="compose/resize on the r×r core vs PEFT's dense SVD")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--peft-full", action="store_true", help="run PEFT's svd combination on all 22 layers (slow)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        name, *rest = args.child
        fn = CHILDREN[name]
        rest = [int(x) if x.isdigit() else x for x in rest]
        print(json.dumps(fn(*rest)))
        return

    from bench.workload import DEFAULT_CACHE, workload

    import torch

    cache = args.cache or DEFAULT_CACHE
    print(f"workload (cache {cache}) ...", flush=True)
    w22, w2 = workload(cache, 22), workload(cache, 2)
    tmp = Path(tempfile.mkdtemp(prefix="loratool-bench-"))
    fig: dict = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}
    try:
        print("compose 0.7/0.3 --rank 16 (22 layers, 154 modules):")
        out = tmp / "composed"
        cli = run(cli_cmd("compose", "--adapters", f"{w22['r16_a']}:{W[0]},{w22['r16_b']}:{W[1]}", "-o", out,
                          "--rank", "16", "--json"), "loratool compose (whole process)")
        ours = run(child_cmd("compose", w22["r16_a"], w22["r16_b"], out), "compose_adapters (compute only)")
        fig["compose_cli"] = {"wall_s": cli["wall_s"], "maxrss_mb": cli["maxrss_mb"]}
        fig["compose_compute_s"] = ours["data"]["compute_s"]
        fig["compose_error_gap"] = ours["data"]["max_abs_error_gap"]
        fig["compose_modules"] = ours["data"]["modules"]

        print("PEFT add_weighted_adapter(svd, svd_rank=16):")
        peft_w = w22 if args.peft_full else w2
        layers = 22 if args.peft_full else 2
        peft = run(child_cmd("peft_svd", peft_w["base"], peft_w["r16_a"], peft_w["r16_b"]),
                   f"PEFT svd ({layers} layers)")
        ours2 = run(child_cmd("compose", w2["r16_a"], w2["r16_b"], ""), "compose_adapters (2 layers, compute only)")
        fig["peft_svd"] = {"layers": layers, "seconds": peft["data"]["seconds"], "wall_s": peft["wall_s"],
                           "maxrss_mb": peft["maxrss_mb"],
                           "seconds_22_layers": peft["data"]["seconds"] * 22 / layers,
                           "extrapolated": layers != 22}
        fig["ours_2_layers_compute_s"] = ours2["data"]["compute_s"]
        # our optimal errors vs PEFT's dense-SVD errors on the same (2-layer or full) model
        ours_cmp = ours["data"]["optimal"] if args.peft_full else None
        if ours_cmp is None:
            chk = run(child_cmd("compose", w2["r16_a"], w2["r16_b"], _compose_small(w2, tmp)), "error check (2 layers)")
            ours_cmp = chk["data"]["optimal"]
        gaps = [abs(ours_cmp[n] - e) for n, e in peft["data"]["errors"].items()]
        fig["peft_vs_ours_error_gap"] = max(gaps)

        print("resize r=64 -> 8 (154 modules):")
        rcli = run(cli_cmd("resize", w22["r64"], "-o", tmp / "resized", "--rank", "8", "--json"),
                   "loratool resize (whole process)")
        rours = run(child_cmd("resize", w22["r64"]), "resize_adapter (compute only)")
        dense = run(child_cmd("dense_resize", w22["r64"], 0), "dense full-matrix SVD (layer 0 of 22)")
        fig["resize_cli"] = {"wall_s": rcli["wall_s"], "maxrss_mb": rcli["maxrss_mb"]}
        fig["resize_compute_s"] = rours["data"]["compute_s"]
        fig["dense_svd"] = {"layer_s": dense["data"]["seconds"], "seconds_22_layers": dense["data"]["seconds"] * 22,
                            "maxrss_mb": dense["maxrss_mb"], "extrapolated": True}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    fig["loadavg_end"] = os.getloadavg()[0]
    report(fig)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
    ok = fig["compose_error_gap"] <= 1e-4 and fig["peft_vs_ours_error_gap"] <= 1e-4
    if not ok:
        raise SystemExit("error check FAILED: relative errors differ from the optimal by more than 1e-4")


def _compose_small(w2, tmp: Path) -> Path:
    out = tmp / "composed_L2"
    run(cli_cmd("compose", "--adapters", f"{w2['r16_a']}:{W[0]},{w2['r16_b']}:{W[1]}", "-o", out, "--rank", "16"),
        "loratool compose (2 layers)")
    return out


def report(f: dict) -> None:
    pe = f["peft_svd"]
    lab = " (extrapolated from 2 of 22 layers)" if pe["extrapolated"] else ""
    print()
    print(f"== compose two r=16 adapters, 0.7/0.3, rank 16, {f['compose_modules']} modules "
          f"({f['cpus']} CPUs, {f['threads']} torch threads) ==")
    print(f"loratool compose, whole process     {f['compose_cli']['wall_s']:8.2f} s   peak RSS {f['compose_cli']['maxrss_mb']:8.0f} MB")
    print(f"compose_adapters, compute only      {f['compose_compute_s']:8.2f} s")
    print(f"PEFT svd, {pe['layers']:2d} layers measured         {pe['seconds']:8.2f} s   peak RSS {pe['maxrss_mb']:8.0f} MB"
          f" (process incl. model load: {pe['wall_s']:.1f} s)")
    print(f"PEFT svd, 22 layers{lab:<17}{pe['seconds_22_layers']:8.1f} s")
    print(f"ours on the same {pe['layers']} layers, compute     {f['ours_2_layers_compute_s']:8.3f} s")
    print(f"ratio PEFT / ours (compute)         {pe['seconds_22_layers'] / f['compose_compute_s']:8.0f} x")
    print(f"ratio PEFT / ours (whole process)   {pe['seconds_22_layers'] / f['compose_cli']['wall_s']:8.0f} x")
    print(f"max |error - optimal rank-16 error| {f['compose_error_gap']:.2e} (written output, all modules; limit 1e-4)")
    print(f"max |ours - PEFT dense SVD| error   {f['peft_vs_ours_error_gap']:.2e} (limit 1e-4)")
    d = f["dense_svd"]
    print(f"(1-minute load average {f['loadavg_start']:.1f} at start, {f['loadavg_end']:.1f} at end: other "
          "processes share these cores, so times are indicative)")
    print()
    print("== resize r=64 -> 8, 154 modules ==")
    print(f"loratool resize, whole process      {f['resize_cli']['wall_s']:8.2f} s   peak RSS {f['resize_cli']['maxrss_mb']:8.0f} MB")
    print(f"resize_adapter, compute only        {f['resize_compute_s']:8.2f} s")
    print(f"dense full-matrix SVD, 1 layer      {d['layer_s']:8.2f} s   peak RSS {d['maxrss_mb']:8.0f} MB")
    print(f"dense full-matrix SVD, 22 layers (extrapolated) {d['seconds_22_layers']:8.1f} s")
    print(f"ratio dense / ours (compute)        {d['seconds_22_layers'] / f['resize_compute_s']:8.0f} x")


if __name__ == "__main__":
    main()
