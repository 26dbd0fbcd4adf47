"""Benchmark: `loratool extract` on the TinyLlama-1.1B-shaped workload (issue 17).

Workload (bench/workload.py, generated once into ~/.cache/loratool-bench): the random bf16 base and
its r=16 all-linear PEFT adapter ``r16_a``, merged by PEFT's ``merge_and_unload`` and saved with
another shard layout (``merged_r16_a``, generated once here). Measured, each in its own child
process (wall, CPU = user+sys, peak RSS from wait4):
  1. `loratool extract --rank 16` on 22 layers and on 11 layers (peak memory must stay flat);
  2. `loratool extract --rel-error 0.3` on 22 layers (ranks per module);
  3. with --mergekit PATH (mergekit-extract-lora of a separate venv), mergekit on the same pair.
Checks: on sampled modules, a dense float64 SVD of (merged − base) gives the optimal rank-16 error;
ours must be within 1e-3 of it; PEFT loads the --rel-error output of 11 layers (--peft-check).

    .venv/bin/python bench/bench_extract.py [--cache DIR] [--mergekit /tmp/mk-venv/bin/mergekit-extract-lora]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import run_child  # noqa: E402

SAMPLED = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.5.mlp.down_proj",
           "model.layers.10.mlp.gate_proj")


def child_merge(base: str, adapter: str, out: str) -> dict:
    """PEFT's merge_and_unload of ``adapter`` into ``base`` (bf16), saved in 1 GB shards."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, max_shard_size="1GB")
    (Path(out) / ".done").write_text("{}\n")
    return {}


def child_check(base: str, merged: str, ours: str, rank: str) -> dict:
    """Per sampled module: our error and the optimal rank-k error of (merged − base), dense SVD."""
    import numpy as np

    from loratool.adapter import float_values
    from loratool.checkpoint import BaseCheckpoint
    from loratool.formats import load_adapter

    cb, cm, a = BaseCheckpoint(base), BaseCheckpoint(merged), load_adapter(ours)
    k, rows = int(rank), []
    for name in SAMPLED:
        D = float_values(cm.ref(name + ".weight")).astype(np.float64) - float_values(cb.ref(name + ".weight"))
        S = np.linalg.svd(D, compute_uv=False)
        opt = float(np.sqrt((S[k:] ** 2).sum() / (S ** 2).sum()))
        B2, A2, scale = a.modules[name].low_rank()
        err = float(np.linalg.norm(D - scale * (B2.astype(np.float64) @ A2)) / np.linalg.norm(D))
        rows.append({"name": name, "ours": err, "optimal": opt})
    return {"modules": rows}


def child_peft(base: str, ours: str) -> dict:
    """PEFT loads ``ours`` onto ``base``; its delta of the sampled modules equals our factors'."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from loratool.formats import load_adapter

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, ours)
    a, worst, n = load_adapter(ours), 0.0, 0
    for name, mod in pm.named_modules():
        key = name.removeprefix("base_model.model.")
        if key in a.modules and key.split(".")[2] in ("0", "5", "10"):
            got = mod.get_delta_weight("default").double()
            want = a.modules[key].delta(torch.float64)
            worst = max(worst, float(torch.linalg.norm(got - want) / torch.linalg.norm(want)))
            n += 1
    return {"modules": n, "max_rel_diff": worst}


def run(cmd: list[str], label: str, check: bool = True) -> dict:
    """``bench.measure.run_child``; a failure ends the bench unless ``check`` is False."""
    return run_child(cmd, label, check=check)


class _Lines(list):
    """Result lines, each also printed as it comes (a long run that fails keeps what it measured)."""

    def append(self, text: str) -> None:
        print(text, flush=True)
        super().append(text)

    def __iadd__(self, items):
        for x in items:
            self.append(x)
        return self


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *args]


def merged_of(w: dict, root: Path) -> Path:
    out = root / "merged_r16_a"
    if not (out / ".done").exists():
        run(me("merge", str(w["base"]), str(w["r16_a"]), str(out)), f"PEFT merge_and_unload into {out}")
    return out


def extract_cmd(base: Path, tuned: Path, out: Path, *rule: str) -> list[str]:
    return [sys.executable, "-m", "loratool", "extract", "--base", str(base), "--tuned", str(tuned), "-o", str(out),
            *rule, "--json", "-q"]


def line(label: str, r: dict) -> str:
    return (f"{label:<44} whole process {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s CPU, "
            f"peak RSS {r['maxrss_mb']:6.0f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description="loratool extract on the 1.1B workload")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--mergekit", default=None, help="mergekit-extract-lora executable (a separate venv)")
    p.add_argument("--peft-check", action="store_true", help="load the 11-layer --rel-error output in PEFT")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "extract.txt")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = {"merge": child_merge, "check": child_check, "peft": child_peft}[args.child[0]]
        print(json.dumps(fn(*args.child[1:])))
        return

    from bench.workload import DEFAULT_CACHE, workload

    cache = args.cache or DEFAULT_CACHE
    tmp = Path(tempfile.mkdtemp(prefix="loratool-bench-extract-"))
    lines = _Lines()
    lines += [f"== loratool extract: PEFT-merged r=16 all-linear adapter of the TinyLlama-1.1B-shaped bf16 base "
             f"(154 modules); {os.cpu_count()} CPUs, 1-min load {os.getloadavg()[0]:.1f} at start =="]
    try:
        runs = {}
        for layers in (22, 11):
            w = workload(cache, layers)
            merged = merged_of(w, Path(cache).expanduser() / f"tinyllama-L{layers}")
            out = tmp / f"r16_L{layers}"
            r = run(extract_cmd(w["base"], merged, out, "--rank", "16"), f"extract --rank 16 ({layers} layers)")
            runs[layers] = r
            d = r["data"]
            lines.append(line(f"loratool extract --rank 16, {layers} layers", r)
                         + f"; {d['num_modules']} modules, max rel. error {d['max_relative_error']:.3e}, "
                           f"passes {sorted({m['num_passes'] for m in d['modules']})}")
            if layers == 22:
                chk = run(me("check", str(w["base"]), str(merged), str(out), "16"), "dense SVD of sampled modules")
                for m in chk["data"]["modules"]:
                    ok = m["ours"] - m["optimal"] <= 1e-3
                    lines.append(f"  {m['name']:<34} ours {m['ours']:.6f}, optimal rank-16 {m['optimal']:.6f} "
                                 f"(dense float64 SVD), excess {m['ours'] - m['optimal']:.2e} "
                                 f"{'ok' if ok else 'CHECK FAILED'} (limit 1e-3)")
                rows = {m["name"]: m for m in d["modules"]}
                lines.append("  the report's optimal-error estimate for the same modules: " + ", ".join(
                    f"{rows[n]['optimal_error']:.6f}" for n in SAMPLED))
                if args.mergekit:
                    mk = tmp / "mergekit"
                    r = run([args.mergekit, "--model", str(merged), "--base-model", str(w["base"]), "--out-path",
                             str(mk), "--max-rank", "16", "--quiet"], "mergekit-extract-lora --max-rank 16",
                            check=False)
                    lines.append(line("mergekit-extract-lora --max-rank 16, 22 layers", r)
                                 + (f" (exit {r['code']}: {r['stderr'].strip().splitlines()[-1][:200]})"
                                    if r["returncode"] else ""))
                    ours = runs[22]
                    lines.append(f"  ratio: mergekit takes {r['wall_s'] / ours['wall_s']:.1f}x the wall time and "
                                 f"{r['maxrss_mb'] / ours['maxrss_mb']:.2f}x the peak RSS of ours")
                    if (mk / "adapter_model.safetensors").exists():
                        chk = run(me("check", str(w["base"]), str(merged), str(mk), "16"), "mergekit's error")
                        lines.append("  mergekit's relative error on the same modules: " + ", ".join(
                            f"{m['ours']:.6f}" for m in chk["data"]["modules"]))
                    # mergekit writes bf16 factors: ours in bf16 too, for the same-dtype error comparison
                    bf = tmp / "r16_L22_bf16"
                    r = run(extract_cmd(w["base"], merged, bf, "--rank", "16", "--dtype", "bf16"),
                            "extract --rank 16 --dtype bf16")
                    lines.append(line("loratool extract --rank 16 --dtype bf16, 22 layers", r))
                    chk = run(me("check", str(w["base"]), str(merged), str(bf), "16"), "our bf16 error")
                    lines.append("  our relative error on the same modules, bf16 factors as mergekit's: " + ", ".join(
                        f"{m['ours']:.6f}" for m in chk["data"]["modules"]))
        lines.append(f"peak RSS 22 vs 11 layers: {runs[22]['maxrss_mb']:.0f} MB vs {runs[11]['maxrss_mb']:.0f} MB "
                     f"(ratio {runs[22]['maxrss_mb'] / runs[11]['maxrss_mb']:.2f}; model size ratio ~1.8)")
        w = workload(cache, 22)
        merged = merged_of(w, Path(cache).expanduser() / "tinyllama-L22")
        r = run(extract_cmd(w["base"], merged, tmp / "rel", "--rel-error", "0.3"), "extract --rel-error 0.3")
        d = r["data"]
        ranks: dict[int, int] = {}
        for m in d["modules"]:
            ranks[m["rank"]] = ranks.get(m["rank"], 0) + 1
        lines.append(line("loratool extract --rel-error 0.3, 22 layers", r)
                     + f"; ranks (rank: modules) {dict(sorted(ranks.items()))}, max rel. error "
                       f"{d['max_relative_error']:.4f}")
        if args.peft_check:
            w = workload(cache, 11)
            merged = merged_of(w, Path(cache).expanduser() / "tinyllama-L11")
            rel = tmp / "rel11"
            run(extract_cmd(w["base"], merged, rel, "--rel-error", "0.3"), "extract --rel-error 0.3 (11 layers)")
            r = run(me("peft", str(w["base"]), str(rel)), "PEFT loads it")
            lines.append(f"PEFT PeftModel.from_pretrained on the 11-layer --rel-error 0.3 output: "
                         f"{r['data']['modules']} sampled modules, max relative difference of get_delta_weight "
                         f"to our factors {r['data']['max_rel_diff']:.2e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines.append(f"(1-minute load average {os.getloadavg()[0]:.1f} at end; other processes share these cores)")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
