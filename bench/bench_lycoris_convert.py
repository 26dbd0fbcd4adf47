"""Benchmark: convert every LoKr module of an SDXL-sized LyCORIS LoKr network to LoRA at rank 32
(issue 15), against a dense SVD of each ΔW (numpy.linalg.svd) in the same run.

Workload (built here, seeded; nothing downloaded): a LyCORIS LoKr network in the kohya layout
(lora_unet_…, lokr_w1 + lokr_w2_a/lokr_w2_b, alpha; float16 as trainers save it) on the SDXL
UNet's layers, with their diffusers names and shapes: every transformer block's attn1/attn2
projections (640/1280, to_k/to_v of attn2 from 2048), ff.net.0.proj (5120×640, 10240×1280),
ff.net.2 (640×2560, 1280×5120), the attentions' proj_in/proj_out, the resnets' time_emb_proj and
3×3 conv1/conv2 (320…1280 channels, up-block inputs 960…2560), conv_shortcut (1×1), down/upsampler
convs: 800 modules. LoKr as LyCORIS makes it with factor F (default 8) and dim 16: W1 (a, b) full,
W2 (c, d[·3·3]) = lokr_w2_a (c, 16) @ lokr_w2_b (16, d[·9]); out = a·c, in = b·d.

Measured:
  1. `loratool convert NET --to kohya --rank 32 --json` as a user runs it (whole process: read,
     convert every module, write), in a child process (wall, CPU, peak RSS);
  2. in this process, one module after another, single-threaded: loratool's ``module_to_lora``
     (the LoKr SVD from the factors' SVDs) against the dense route (ΔW in float64, then
     ``numpy.linalg.svd`` and the rank-32 truncation), on a sample of S modules per distinct shape
     (--per-shape; all of them with --per-shape 0), extrapolated to the whole network from each
     shape's mean time × its count (labelled). Each sampled module's rank-32 error is checked
     against the dense SVD's optimal truncation error (relative difference < 1e-6).

    .venv/bin/python bench/bench_lycoris_convert.py [--factor 8] [--per-shape 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import run_child  # noqa: E402

RANK, DIM, ALPHA = 32, 16, 8.0


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's (and PEFT's) ``factorization``: (m, n), m <= n, m·n = dimension, m as close to
    ``factor`` as divides (-1: near the square root)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def sdxl_layers() -> list[tuple[str, int, int, int]]:
    """(diffusers name under the UNet, out, in, kernel) of the SDXL UNet layers LoKr targets."""
    layers: list[tuple[str, int, int, int]] = []

    def attention(prefix: str, dim: int, blocks: int) -> None:
        layers.append((f"{prefix}.proj_in", dim, dim, 0))
        layers.append((f"{prefix}.proj_out", dim, dim, 0))
        for t in range(blocks):
            b = f"{prefix}.transformer_blocks.{t}"
            for attn, kv_in in (("attn1", dim), ("attn2", 2048)):
                layers.append((f"{b}.{attn}.to_q", dim, dim, 0))
                layers.append((f"{b}.{attn}.to_k", dim, kv_in, 0))
                layers.append((f"{b}.{attn}.to_v", dim, kv_in, 0))
                layers.append((f"{b}.{attn}.to_out.0", dim, dim, 0))
            layers.append((f"{b}.ff.net.0.proj", dim * 8, dim, 0))
            layers.append((f"{b}.ff.net.2", dim, dim * 4, 0))

    def resnet(prefix: str, cin: int, cout: int) -> None:
        layers.append((f"{prefix}.conv1", cout, cin, 3))
        layers.append((f"{prefix}.time_emb_proj", cout, 1280, 0))
        layers.append((f"{prefix}.conv2", cout, cout, 3))
        if cin != cout:
            layers.append((f"{prefix}.conv_shortcut", cout, cin, 1))

    # down: (channels, attention blocks per attention or 0)
    cin = 320
    for i, (ch, tb) in enumerate(((320, 0), (640, 2), (1280, 10))):
        for j in range(2):
            resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else ch, ch)
            if tb:
                attention(f"down_blocks.{i}.attentions.{j}", ch, tb)
        cin = ch
        if i < 2:
            layers.append((f"down_blocks.{i}.downsamplers.0.conv", ch, ch, 3))
    resnet("mid_block.resnets.0", 1280, 1280)
    attention("mid_block.attentions.0", 1280, 10)
    resnet("mid_block.resnets.1", 1280, 1280)
    skips = [320, 320, 320, 640, 640, 640, 1280, 1280, 1280]  # the down path's outputs, popped in reverse
    prev = 1280
    for i, (ch, tb) in enumerate(((1280, 10), (640, 2), (320, 0))):
        for j in range(3):
            skip = skips.pop()
            resnet(f"up_blocks.{i}.resnets.{j}", prev + skip, ch)
            prev = ch
            if tb:
                attention(f"up_blocks.{i}.attentions.{j}", ch, tb)
        if i < 2:
            layers.append((f"up_blocks.{i}.upsamplers.0.conv", ch, ch, 3))
    return layers


def build_network(path: Path, factor: int, seed: int) -> list[tuple[str, int, int, int]]:
    """Write the LoKr network (float16, kohya keys) to ``path``; return its layers."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    layers = sdxl_layers()
    for name, out, in_, k in layers:
        a, c = factorization(out, factor)
        b, d = factorization(in_, factor)
        kk = k * k if k else 1
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lokr_w1"] = (rng.standard_normal((a, b)) * 0.1).astype(np.float16)
        tensors[f"{key}.lokr_w2_a"] = (rng.standard_normal((c, DIM)) * 0.1).astype(np.float16)
        tensors[f"{key}.lokr_w2_b"] = (rng.standard_normal((DIM, d * kk)) * 0.1).astype(np.float16)
        if k:  # LyCORIS saves a conv's decomposed W2 factor 4-D: (r, d, kh, kw)
            tensors[f"{key}.lokr_w2_b"] = tensors[f"{key}.lokr_w2_b"].reshape(DIM, d, k, k)
        tensors[f"{key}.alpha"] = np.array(ALPHA, dtype=np.float16)
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya",
                                            "ss_network_args": f'{{"algo": "lokr", "factor": {factor}}}'})
    return layers


def dense_route(m, rank: int):
    """ΔW in float64, its full SVD, the rank-``rank`` factors and the truncation error."""
    import numpy as np

    d = m._d2(np.float64) * m.scale
    U, S, Vh = np.linalg.svd(d, full_matrices=False)
    root = np.sqrt(S[:rank])
    b, a = U[:, :rank] * root, root[:, None] * Vh[:rank]
    return b, a, math.sqrt(float((S[rank:] ** 2).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factor", type=int, default=8)
    ap.add_argument("--per-shape", type=int, default=2, help="dense SVDs per distinct shape (0: every module)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lycoris_convert.txt")
    args = ap.parse_args()

    import numpy as np

    from loratool.convert import module_to_lora
    from loratool.formats import load_adapter

    load0 = os.getloadavg()[0]
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    with tempfile.TemporaryDirectory() as tmp:
        net = Path(tmp) / "sdxl_lokr.safetensors"
        layers = build_network(net, args.factor, args.seed)
        adapter = load_adapter(net)
        mods = list(adapter.modules.values())
        assert len(mods) == len(layers) and {m.module_kind for m in mods} == {"lokr"}
        convs = sum(1 for m in mods if m.kind.value == "conv2d")
        say(f"== loratool convert: SDXL-sized LyCORIS LoKr network (factor {args.factor}, dim {DIM}, float16): "
            f"{len(mods)} modules ({len(mods) - convs} linear, {convs} conv), {net.stat().st_size / 1e6:.1f} MB; "
            f"{os.cpu_count()} CPUs, 1-min load {load0:.1f} at start ==")
        exact = sorted({m.exact_rank for m in mods})
        say(f"exact LoRA rank of the modules (rank(W1)·rank(W2)): {exact}; converted at rank {RANK}")

        # 1. the CLI, whole process
        out = Path(tmp) / "lora.safetensors"
        cmd = [sys.executable, "-m", "loratool", "convert", str(net), "--to", "kohya", "-o", str(out),
               "--rank", str(RANK), "--json"]
        r = run_child(cmd, "loratool convert")
        conv = r["data"].get("conversions", [])
        worst = max((c["relative_error"] for c in conv), default=float("nan"))
        say(f"loratool convert --to kohya --rank {RANK} (whole process)  {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s "
            f"CPU, peak RSS {r['maxrss_mb']:6.0f} MB; {len(conv)} modules converted, largest relative error "
            f"{worst:.4f}, output {out.stat().st_size / 1e6:.1f} MB")

        # 2. per module, in process, one after another (numpy with its BLAS threads, both routes): ours on every module, dense on a sample per shape
        ours_t: dict[tuple, list[float]] = defaultdict(list)
        for m in mods:
            t0 = time.perf_counter()
            module_to_lora(m, rank=RANK)
            ours_t[tuple(m.base_weight_shape)].append(time.perf_counter() - t0)
        ours_total = sum(sum(v) for v in ours_t.values())
        say(f"loratool module_to_lora, every module, one after another     {ours_total:7.2f} s "
            f"({1e3 * ours_total / len(mods):.1f} ms a module)")

        by_shape: dict[tuple, list] = defaultdict(list)
        for m in mods:
            by_shape[tuple(m.base_weight_shape)].append(m)
        dense_t: dict[tuple, list[float]] = defaultdict(list)
        worst_excess, sampled = 0.0, 0
        for shape, ms in sorted(by_shape.items(), key=lambda kv: -math.prod(kv[0])):
            for m in ms if args.per_shape == 0 else ms[: args.per_shape]:
                t0 = time.perf_counter()
                _, _, want = dense_route(m, RANK)
                dense_t[shape].append(time.perf_counter() - t0)
                _, c = module_to_lora(m, rank=RANK)
                worst_excess = max(worst_excess, abs(c.error - want) / want if want else abs(c.error))
                sampled += 1
        dense_sample = sum(sum(v) for v in dense_t.values())
        ours_sample = sum(sum(ours_t[s][: len(dense_t[s])]) for s in dense_t)
        dense_full = sum(np.mean(dense_t[s]) * len(by_shape[s]) for s in by_shape)
        label = "measured" if args.per_shape == 0 else f"extrapolated from {sampled} sampled modules"
        say(f"dense route (ΔW float64 + numpy.linalg.svd + truncation), {sampled} sampled modules  {dense_sample:7.2f} s; "
            f"loratool on the same modules {ours_sample:.3f} s: {dense_sample / ours_sample:.0f}× faster")
        say(f"dense route, whole network ({label})                 {dense_full:7.1f} s vs loratool "
            f"{ours_total:.2f} s measured: {dense_full / ours_total:.0f}× faster")
        say(f"rank-{RANK} error vs the dense SVD's optimal truncation error, {sampled} sampled modules: largest relative "
            f"difference {worst_excess:.2e} ({'ok' if worst_excess < 1e-6 else 'FAIL'}, limit 1e-6)")
        say("per shape (out, in[, kh, kw]): modules, loratool ms a module, dense s a module")
        for shape in sorted(by_shape, key=lambda s: -math.prod(s)):
            say(f"  {str(list(shape)):22s} {len(by_shape[shape]):4d}  {1e3 * np.mean(ours_t[shape]):7.2f} ms  "
                f"{np.mean(dense_t[shape]):7.3f} s")
        say(f"(1-minute load average {os.getloadavg()[0]:.1f} at end; other processes share these cores)")
        say("command: .venv/bin/python bench/bench_lycoris_convert.py " + " ".join(sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
