"""Benchmark the fused LoRA merge kernel on a GPU (kernels/merge.py); needs CUDA.

    .venv/bin/python bench/bench_kernel.py --out bench/results/kernel_h100.json

For the projection shapes of TinyLlama-1.1B (bf16, r=16, one adapter) it measures:
  * merge_triton: the whole call (factor concatenation on the host side + the kernel) and the kernel
    alone (factors prepared once), both writing into a preallocated output;
  * the effective bandwidth of the kernel, (bytes of W read + bytes of W' written) / time, as a
    fraction of the copy bandwidth measured in the same run by ``out.copy_(W)`` of the same size
    (the same bytes moved: the ceiling for a one-pass merge);
  * dora_merge_triton (two passes over W, so its ideal is 1.5× the copy time);
  * the torch reference (merge_reference on the same GPU tensors);
  * the accuracy of the kernel: the largest error against the float64 merge, in bf16 ulps of the
    exact value (≤ 0.5 for a correctly rounded result; float32 accumulation adds a hair);
  * requant_merge_triton at nf4 (merge --base-precision nf4: each tile replaced by bitsandbytes'
    dequant(quant(W)) before the deltas, tables prepared once): kernel time and fraction of the
    copy, and whether its round trip alone (no adapters) equals the torch reference's bits;
  * dequantize_4bit_triton of the same weight stored in 4 bits (packed nf4): its time against a
    copy of the 16-bit weight (it reads a quarter of those bytes and writes them once).

Times are medians from triton.testing.do_bench, which flushes the L2 cache before each run.
Prints a table and writes the numbers as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

# TinyLlama-1.1B: hidden 2048, intermediate 5632, 4 k/v heads of 64 -> (out, in) per projection
SHAPES = {
    "q_proj/o_proj": (2048, 2048),
    "k_proj/v_proj": (256, 2048),
    "gate_proj/up_proj": (5632, 2048),
    "down_proj": (2048, 5632),
}


def _ulps_bf16(out, exact):
    import torch

    _, e = torch.frexp(exact.abs())
    ulp = torch.exp2((torch.clamp(e - 1, min=-126) - 7).to(torch.float64))
    return ((out.double() - exact).abs() / ulp).max().item()


def bench_shape(name, shape, rank, dtype, seed=0):
    import torch
    import triton.testing

    from loratool.kernels.merge import (  # the private launcher too: kernel-only timing
        STORE,
        _block_r,
        _concat_factors,
        _launch,
        dora_merge_triton,
        merge_triton,
        requant_merge_triton,
    )
    from loratool.kernels.reference import merge_exact, merge_reference

    g = torch.Generator(device="cuda").manual_seed(seed)
    out_f, in_f = shape
    W = torch.randn(out_f, in_f, device="cuda", generator=g).to(dtype)
    B = (0.02 * torch.randn(out_f, rank, device="cuda", generator=g)).to(dtype)
    A = (0.02 * torch.randn(rank, in_f, device="cuda", generator=g)).to(dtype)
    coeffs = [2.0]  # alpha/r = 32/16
    magnitude = torch.linalg.vector_norm(W.float(), dim=1) * 1.1
    out = torch.empty_like(W)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    # autotune first (and check the result), outside the timed runs
    merge_triton(W, [B], [A], coeffs, out=out)
    ulps = _ulps_bf16(out, merge_exact(W, [B], [A], coeffs))
    dora_merge_triton(W, [B], [A], coeffs, magnitude, out=out)

    block_r = _block_r(rank)
    Bcat, Acat, R_pad = _concat_factors(W, [B], [A], coeffs, block_r)
    moved = 2 * W.numel() * W.element_size()  # W read once + W' written once
    t_copy = bench(lambda: out.copy_(W))
    t_kernel = bench(lambda: _launch(W, Bcat, Acat, R_pad, out, STORE, None, None, block_r))
    t_call = bench(lambda: merge_triton(W, [B], [A], coeffs, out=out))
    t_dora = bench(lambda: dora_merge_triton(W, [B], [A], coeffs, magnitude, out=out))
    t_torch = bench(lambda: merge_reference(W, [B], [A], coeffs))

    # merge --base-precision nf4: the QUANT prologue, tables prepared once (as the engine's blocks
    # get them), and the round trip alone against the torch reference's bits
    from loratool.kernels.dequant4 import dequantize_4bit_triton
    from loratool.kernels.reference import requant_reference, requant_tables
    from loratool.quant import bnb

    spec = bnb.QuantSpec("nf4", 64, False)
    tables = requant_tables(W, spec)
    requant_merge_triton(W, [B], [A], coeffs, spec, out=out)  # autotune
    t_requant = bench(lambda: _launch(W, Bcat, Acat, R_pad, out, STORE, None, None, block_r,
                                      quant=(*tables, spec.blocksize)))
    alone = requant_merge_triton(W, [], [], [], spec)
    requant_exact = bool(torch.equal(alone.view(torch.int16), requant_reference(W, spec).view(torch.int16)))
    # a 4-bit weight dequantized: packed codes of the round trip (any codes time the same)
    packed = torch.randint(0, 256, (W.numel() // 2,), dtype=torch.uint8, device="cuda", generator=g)
    t_dequant = bench(lambda: dequantize_4bit_triton(packed, tables[0], W.numel(), dtype, spec))
    gbps = lambda ms: moved / (ms * 1e-3) / 1e9  # noqa: E731
    return {
        "name": name, "shape": list(shape), "rank": rank, "dtype": str(dtype).removeprefix("torch."),
        "bytes_moved": moved,
        "copy_ms": t_copy, "copy_GBps": gbps(t_copy),
        "kernel_ms": t_kernel, "kernel_GBps": gbps(t_kernel), "kernel_fraction_of_copy": t_copy / t_kernel,
        "call_ms": t_call, "call_fraction_of_copy": t_copy / t_call,
        "dora_ms": t_dora, "dora_vs_copy": t_dora / t_copy,
        "torch_reference_ms": t_torch, "speedup_vs_torch": t_torch / t_kernel,
        "max_error_bf16_ulps": ulps,
        "requant_ms": t_requant, "requant_fraction_of_copy": t_copy / t_requant,
        "requant_round_trip_equals_reference": requant_exact,
        "dequant4_ms": t_dequant, "dequant4_vs_copy": t_dequant / t_copy,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("bench_kernel: torch is not installed; run it from the project's virtualenv", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernel: no CUDA device is present; this benchmark measures the Triton kernel on a "
              "GPU. Run it on a machine with an NVIDIA GPU (the CPU path is the torch reference, which "
              "tests/kernels covers).", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_kernel: triton is not installed; `pip install triton` (Linux) and run again",
              file=sys.stderr)
        return 2

    rows = [bench_shape(name, shape, args.rank, torch.bfloat16) for name, shape in SHAPES.items()]

    header = (f"{'module':<18} {'shape':>11} {'copy ms':>8} {'kernel ms':>9} {'% copy':>7} {'call ms':>8} "
              f"{'dora ms':>8} {'torch ms':>9} {'vs torch':>8} {'ulps':>5} {'nf4 ms':>7} {'% copy':>7} "
              f"{'exact':>5} {'deq4 ms':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<18} {'x'.join(map(str, r['shape'])):>11} {r['copy_ms']:8.4f} {r['kernel_ms']:9.4f} "
              f"{100 * r['kernel_fraction_of_copy']:6.1f}% {r['call_ms']:8.4f} {r['dora_ms']:8.4f} "
              f"{r['torch_reference_ms']:9.4f} {r['speedup_vs_torch']:7.1f}× {r['max_error_bf16_ulps']:5.2f} "
              f"{r['requant_ms']:7.4f} {100 * r['requant_fraction_of_copy']:6.1f}% "
              f"{'yes' if r['requant_round_trip_equals_reference'] else 'NO':>5} {r['dequant4_ms']:8.4f}")

    report = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "rank": args.rank, "timing": "triton.testing.do_bench median, L2 flushed",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
