"""Issue 5's resize checks on the real-shaped workload (not timed; bench_lowrank.py times it).

1. resize r=64 -> 8: the written output's relative error per module equals the optimal rank-8
   error from a dense float64 SVD of the delta (layers 0 and 21, 14 modules; ±1e-4 required).
2. --energy 0.9 on the r=16 adapter picks different ranks per module, and PEFT loads the output
   onto the base with exactly the deltas we compute.

    .venv/bin/python bench/check_resize.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from bench.workload import workload
    from loratool.formats import load_adapter

    w = workload()
    exe = str(Path(sys.executable).with_name("loratool"))
    with tempfile.TemporaryDirectory() as tmp:
        r8, e90 = Path(tmp) / "r8", Path(tmp) / "e90"
        subprocess.run([exe, "resize", str(w["r64"]), "--rank", "8", "-o", str(r8), "--json"], check=True,
                       capture_output=True)
        src, out = load_adapter(w["r64"]), load_adapter(r8)
        names = [n for n in src.modules if ".layers.0." in n or ".layers.21." in n]
        worst = 0.0
        for n in names:
            D = src.modules[n].delta(torch.float64)
            S = torch.linalg.svdvals(D)
            optimal = float((S[8:] ** 2).sum().sqrt() / (S ** 2).sum().sqrt())
            got = float(torch.linalg.matrix_norm(out.modules[n].delta(torch.float64) - D) / torch.linalg.matrix_norm(D))
            worst = max(worst, abs(got - optimal))
        print(f"resize r64 -> 8: {len(names)} modules (layers 0 and 21) against a dense float64 SVD: "
              f"max |error - optimal| = {worst:.2e} (limit 1e-4): {'ok' if worst <= 1e-4 else 'FAILED'}")

        subprocess.run([exe, "resize", str(w["r16_a"]), "--energy", "0.9", "-o", str(e90)], check=True,
                       capture_output=True)
        ours = load_adapter(e90)
        ranks = sorted({m.rank for m in ours.modules.values()})
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from transformers import AutoModelForCausalLM

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(str(w["base"]), dtype=torch.bfloat16)
            pm = PeftModel.from_pretrained(model, str(e90))
        layers = {n[len("base_model.model."):]: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
        diff = max(float((layer.get_delta_weight("default").float() - ours.modules[n].delta(torch.float32)).abs().max())
                   for n, layer in layers.items())
        peft_ranks = sorted({layer.r["default"] for layer in layers.values()})
        print(f"resize --energy 0.9 of r16_a: ranks {ranks} over {len(ours.modules)} modules; PEFT loads "
              f"{len(layers)} layers with ranks {peft_ranks}; max |PEFT delta - ours| = {diff:.1e}")


if __name__ == "__main__":
    main()
