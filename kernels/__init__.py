"""Merge kernels, installed as ``loratool.kernels``: Triton on CUDA, the torch reference elsewhere.

    from loratool.kernels.merge import merge, dora_merge

    merge(W, Bs, As, coeffs, out=None)                  W + Σ cᵢ Bᵢ Aᵢ, float32 math, one rounding
    dora_merge(W, Bs, As, coeffs, magnitude, out=None)  DoRA: m[:, None] · V / ‖V‖_row

``merge.py`` holds the Triton kernel, its launchers (``merge_triton``, ``dora_merge_triton``) and
the dispatchers above; ``reference.py`` the torch references (``merge_reference``,
``dora_merge_reference``) and the float64 oracles (``merge_exact``, ``dora_merge_exact``).

Nothing is re-exported here: importing this package imports neither torch nor triton and touches no
GPU, and a package attribute ``merge`` would be shadowed by the submodule of the same name as soon
as that is imported. Import from the submodules.
"""
