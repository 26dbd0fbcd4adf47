"""Benchmark workloads, generated once into a cache directory and reused.

A TinyLlama-1.1B-shaped base (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 KV heads,
vocab 32000, untied embeddings) with random bf16 weights made by transformers, and LoRA adapters
made and saved by PEFT itself (all-linear, init_lora_weights=False). Nothing is downloaded.

    from bench.workload import workload
    w = workload()            # {"base": Path, "r16_a": Path, "r16_b": Path, "r64": Path}
    w2 = workload(layers=2)   # the same shapes with 2 of the 22 layers (for slow references)

Run as a script to build the cache: ``python bench/workload.py [--layers 22] [--cache DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("LORATOOL_BENCH_CACHE", "~/.cache/loratool-bench")).expanduser()

TINYLLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

# name -> (rank, alpha, seed)
ADAPTERS = {"r16_a": (16, 32, 1), "r16_b": (16, 32, 2), "r64": (64, 128, 3)}


def _done(d: Path) -> bool:
    return (d / ".done").exists()


def _mark(d: Path, info: dict) -> None:
    (d / ".done").write_text(json.dumps(info) + "\n")


def make_base(out: Path, layers: int = 22, seed: int = 0) -> Path:
    """A random-weight bf16 LlamaForCausalLM, saved with max_shard_size 2GB (reused if present)."""
    if _done(out):
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers})
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    # Built directly in bf16 (parameters allocated in the default dtype): 2.2 GB for 1.1B
    # parameters instead of 4.4 GB in float32 followed by a cast.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model = model.to(torch.bfloat16).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), max_shard_size="2GB")
    _mark(out, {"layers": layers, "params": sum(p.numel() for p in model.parameters()),
                "seconds": round(time.perf_counter() - t0, 1)})
    return out


def make_adapters(base: Path, out_dir: Path, adapters: dict = ADAPTERS) -> dict[str, Path]:
    """PEFT adapters of ``base`` (all-linear, init_lora_weights=False), one directory each."""
    paths = {name: out_dir / name for name in adapters}
    todo = {n: spec for n, spec in adapters.items() if not _done(paths[n])}
    if not todo:
        return paths
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    for name, (r, alpha, seed) in todo.items():
        torch.manual_seed(seed)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False)
        pm = get_peft_model(model, cfg)
        pm.save_pretrained(str(paths[name]))
        _mark(paths[name], {"r": r, "alpha": alpha, "seed": seed})
        model = pm.unload()  # the base again, without LoRA layers
    return paths


def workload(cache: Path | str = DEFAULT_CACHE, layers: int = 22) -> dict[str, Path]:
    root = Path(cache).expanduser() / f"tinyllama-L{layers}"
    base = make_base(root / "base", layers)
    return {"base": base, **make_adapters(base, root)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args()
    for k, v in workload(args.cache, args.layers).items():
        print(f"{k}: {v}")
