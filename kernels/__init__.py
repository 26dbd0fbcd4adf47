"""Merge kernels, installed as ``loratool.kernels``: Triton on CUDA, the torch reference elsewhere; and
the C loops of the CPU paths.

    from loratool.kernels.merge import merge, dora_merge

    merge(W, Bs, As, coeffs, out=None)                  W + Σ cᵢ Bᵢ Aᵢ, float32 math, one rounding
    dora_merge(W, Bs, As, coeffs, magnitude, out=None)  DoRA: m[:, None] · V / ‖V‖_row
    requant_merge(W, Bs, As, coeffs, spec, scale=None)  dequant(quant(W)) + Σ cᵢ Bᵢ Aᵢ (bitsandbytes'
                                                        4-bit round trip of each tile, then the merge)

    from loratool.kernels.dequant4 import dequantize_4bit
    dequantize_4bit(packed, scale, numel, dtype, spec)  a weight stored in 4 bits, as bitsandbytes

    from loratool.kernels import cpu                    the C loops on the CPU (cpu.c, cpu_body.h):
    cpu.roundtrip, cpu.absmax, cpu.parity_block,        an optional extension whose references are
    cpu.kth_largest_abs                                 numpy paths (None where it does not run)

``merge.py`` holds the Triton merge kernel, its launchers (``merge_triton``, ``dora_merge_triton``,
``requant_merge_triton``) and the dispatchers above; ``dequant4.py`` the dequantization kernel;
``reference.py`` the torch references (``merge_reference``, ``dora_merge_reference``,
``requant_reference``) and the float64 oracles (``merge_exact``, ``dora_merge_exact``).

Nothing is re-exported here: importing this package imports neither torch nor triton and touches no
GPU, and a package attribute ``merge`` would be shadowed by the submodule of the same name as soon
as that is imported. Import from the submodules.
"""
