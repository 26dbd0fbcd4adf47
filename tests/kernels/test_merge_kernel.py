"""The fused merge kernel (kernels/merge.py) and its torch reference against float64.

The Triton kernel runs under the interpreter on the CPU, so these tests never need a GPU.
TRITON_INTERPRET must be set before triton decorates the kernel; loratool.kernels.merge applies
``triton.jit`` on first use, and triton is imported below this line at the earliest.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from loratool.errors import UsageError  # noqa: E402
from loratool.kernels.merge import dora_merge, dora_merge_triton, merge, merge_triton  # noqa: E402
from loratool.kernels.reference import (  # noqa: E402
    dora_merge_exact,
    dora_merge_reference,
    merge_exact,
    merge_reference,
)

SHAPES = [(257, 131), (64, 48), (1, 17)]
RANKS = [(1,), (3, 17), (17, 1, 3)]  # 1 to 3 adapters; R = 1, 20, 21
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
U32 = 2.0 ** -24  # float32 unit roundoff

# (mantissa bits, smallest normal exponent) per output dtype
_FORMAT = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126)}


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64 in, float64 out), subnormals included."""
    p, emin = _FORMAT[dtype]
    _, e = torch.frexp(x.abs())
    return torch.exp2((torch.clamp(e - 1, min=emin) - p).to(torch.float64))


def _rounding(exact, out, rounding_ulps):
    return rounding_ulps * _ulp(torch.maximum(exact.abs(), out.double().abs()), out.dtype)


def _rounding_ulps(dtype, interpreted: bool) -> float:
    # One correctly rounded store is within half an ulp. The interpreter's float32 -> bfloat16 cast
    # (triton 3.9 interpreter.py, cast_impl -> _convert_float with rounding_mode=None) truncates
    # instead of rounding to nearest even as the GPU does, so bf16 from the interpreter gets one ulp.
    return 1.0 if (interpreted and dtype == torch.bfloat16) else 0.5


def _accumulation_bound(W, Bs, As, coeffs):
    """Worst-case float32 error of W + Σ cᵢ BᵢAᵢ in any summation order: (R + 4)·u·(|W| + Σ|cᵢ||Bᵢ||Aᵢ|)."""
    R = sum(B.shape[1] for B in Bs)
    mag = W.double().abs()
    for B, A, c in zip(Bs, As, coeffs):
        mag += abs(c) * B.double().abs() @ A.double().abs()
    return (R + 4) * U32 * mag


def assert_merge_close(out, W, Bs, As, coeffs, interpreted):
    exact = merge_exact(W, Bs, As, coeffs)
    tol = _rounding(exact, out, _rounding_ulps(out.dtype, interpreted)) + _accumulation_bound(W, Bs, As, coeffs)
    err = (out.double() - exact).abs()
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"{out.dtype} {tuple(W.shape)}: error {err.max().item():.3g}, {worst:.2f}× the tolerance"


def assert_dora_close(out, W, Bs, As, coeffs, magnitude, interpreted):
    exact = dora_merge_exact(W, Bs, As, coeffs, magnitude)
    e_v = _accumulation_bound(W, Bs, As, coeffs)  # elementwise bound on V in float32
    V = merge_exact(W, Bs, As, coeffs)
    norm = torch.linalg.vector_norm(V, dim=1, keepdim=True)
    # the row scale m/‖V‖: relative error from the sum of squares (N terms), the sqrt, the division
    # and the error of V itself
    rel_scale = (W.shape[1] + 8) * U32 + 2 * torch.linalg.vector_norm(e_v, dim=1, keepdim=True) / norm
    scale = magnitude.double().abs()[:, None] / norm
    tol = (_rounding(exact, out, _rounding_ulps(out.dtype, interpreted))
           + scale * e_v + exact.abs() * rel_scale)
    err = (out.double() - exact).abs()
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"{out.dtype} {tuple(W.shape)}: error {err.max().item():.3g}, {worst:.2f}× the tolerance"


def make_case(shape, ranks, dtype, seed=0):
    """W ~ N(0, 1) in ``dtype``; factors in the same dtype, scaled so the delta is O(0.1-1)."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    W = torch.randn(out_f, in_f, generator=g).to(dtype)
    Bs = [(0.5 * torch.randn(out_f, r, generator=g)).to(dtype) for r in ranks]
    As = [(0.5 * torch.randn(r, in_f, generator=g) / r ** 0.5).to(dtype) for r in ranks]
    coeffs = [0.75, -1.5, 2.0][:len(ranks)]
    magnitude = (0.5 + torch.rand(out_f, generator=g)) * in_f ** 0.5
    return W, Bs, As, coeffs, magnitude


matrix = pytest.mark.parametrize(
    "shape, ranks, dtype",
    [(s, r, d) for s in SHAPES for r in RANKS for d in DTYPES],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).removeprefix("torch."),
)


@matrix
def test_merge_triton_against_float64(shape, ranks, dtype):
    W, Bs, As, coeffs, _ = make_case(shape, ranks, dtype)
    out = merge_triton(W, Bs, As, coeffs)
    assert out.dtype == dtype and out.shape == W.shape
    assert_merge_close(out, W, Bs, As, coeffs, interpreted=True)


@matrix
def test_merge_reference_against_float64(shape, ranks, dtype):
    W, Bs, As, coeffs, _ = make_case(shape, ranks, dtype)
    out = merge_reference(W, Bs, As, coeffs)
    assert out.dtype == dtype
    assert_merge_close(out, W, Bs, As, coeffs, interpreted=False)


@matrix
def test_dora_merge_triton_against_float64(shape, ranks, dtype):
    W, Bs, As, coeffs, magnitude = make_case(shape, ranks, dtype)
    out = dora_merge_triton(W, Bs, As, coeffs, magnitude)
    assert out.dtype == dtype
    assert_dora_close(out, W, Bs, As, coeffs, magnitude, interpreted=True)


@matrix
def test_dora_merge_reference_against_float64(shape, ranks, dtype):
    W, Bs, As, coeffs, magnitude = make_case(shape, ranks, dtype)
    out = dora_merge_reference(W, Bs, As, coeffs, magnitude)
    assert_dora_close(out, W, Bs, As, coeffs, magnitude, interpreted=False)


# Explicit tiles instead of the autotuner's: 16×16 tiles and BLOCK_R=16, so R=20/21 runs the loop
# over R in two chunks and 97×37 has ragged tiles on both edges.
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_R": 16}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_triton_loops_over_rank_chunks(dtype):
    W, Bs, As, coeffs, magnitude = make_case((97, 37), (3, 17), dtype, seed=1)
    assert_merge_close(merge_triton(W, Bs, As, coeffs, config=SMALL_TILES), W, Bs, As, coeffs, True)
    assert_dora_close(dora_merge_triton(W, Bs, As, coeffs, magnitude, config=SMALL_TILES),
                      W, Bs, As, coeffs, magnitude, True)


def test_merge_triton_in_place():
    W, Bs, As, coeffs, magnitude = make_case((64, 48), (3, 17), torch.bfloat16, seed=2)
    expected = merge_triton(W, Bs, As, coeffs)
    target = W.clone()
    assert merge_triton(target, Bs, As, coeffs, out=target) is target
    assert torch.equal(target, expected)

    expected = dora_merge_triton(W, Bs, As, coeffs, magnitude)
    target = W.clone()
    dora_merge_triton(target, Bs, As, coeffs, magnitude, out=target)
    assert torch.equal(target, expected)


def test_merge_triton_strided_weight_and_other_out_dtype():
    # a Conv1D-style weight stored (in, out): the kernel reads W.T through its strides, no copy
    W, Bs, As, coeffs, _ = make_case((48, 64), (3,), torch.float16, seed=3)
    Wt = W.t().contiguous().t()
    assert not Wt.is_contiguous()
    out = torch.empty(48, 64, dtype=torch.float32)
    merge_triton(Wt, Bs, As, coeffs, out=out)
    assert_merge_close(out, W, Bs, As, coeffs, interpreted=True)
    # and a transposed output
    out_t = torch.empty(64, 48, dtype=torch.float16).t()
    merge_triton(W, Bs, As, coeffs, out=out_t)
    assert torch.equal(out_t, merge_triton(W, Bs, As, coeffs))


def test_merge_triton_without_adapters_copies_the_weight():
    W = torch.randn(33, 20).to(torch.bfloat16)
    assert torch.equal(merge_triton(W, [], [], []), W)


def test_dispatch_takes_the_torch_path_on_cpu():
    W, Bs, As, coeffs, magnitude = make_case((64, 48), (3, 17), torch.bfloat16, seed=4)
    assert torch.equal(merge(W, Bs, As, coeffs), merge_reference(W, Bs, As, coeffs))
    assert torch.equal(dora_merge(W, Bs, As, coeffs, magnitude),
                       dora_merge_reference(W, Bs, As, coeffs, magnitude))
    target = W.clone()
    merge(target, Bs, As, coeffs, out=target)
    assert torch.equal(target, merge_reference(W, Bs, As, coeffs))


def test_import_is_light_and_the_cpu_path_never_imports_triton():
    code = (
        "import sys\n"
        "import loratool.kernels, loratool.kernels.merge\n"
        "assert 'triton' not in sys.modules and 'torch' not in sys.modules, 'heavy import'\n"
        "import torch\n"
        "from loratool.kernels.merge import merge, dora_merge\n"
        "W = torch.randn(8, 4); B = torch.randn(8, 2); A = torch.randn(2, 4)\n"
        "merge(W, [B], [A], [0.5]); dora_merge(W, [B], [A], [0.5], torch.ones(8))\n"
        "assert 'triton' not in sys.modules, 'the CPU path imported triton'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_merge_triton_refuses_cpu_tensors_when_not_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    W, Bs, As, coeffs, _ = make_case((8, 8), (1,), torch.float32)
    with pytest.raises(UsageError, match=r"needs a CUDA tensor.*loratool.kernels.merge.merge"):
        merge_triton(W, Bs, As, coeffs)


@pytest.mark.parametrize("bad, message", [
    (lambda W, B, A: (W, [B], [A.t()], [1.0]), r"adapter 0 has B \(8, 2\) and A \(4, 2\); expected B \(8, r\)"),
    (lambda W, B, A: (W, [B], [A], []), "got 1 B factors, 1 A factors and 0 coefficients"),
    (lambda W, B, A: (W.double(), [B], [A], [1.0]), "dtype torch.float64; expected one of"),
    (lambda W, B, A: (W[None], [B], [A], [1.0]), r"shape \(1, 8, 4\); expected a 2-D"),
])
def test_mismatched_factors_are_reported(bad, message):
    W, B, A = torch.randn(8, 4), torch.randn(8, 2), torch.randn(2, 4)
    for fn in (merge_reference, merge_triton):
        with pytest.raises(UsageError, match=message):
            fn(*bad(W, B, A))
    with pytest.raises(UsageError, match=r"magnitude has shape \(4,\); expected \(8,\)"):
        dora_merge_triton(W, [B], [A], [1.0], torch.ones(4))


def test_parity_with_peft_merge_and_unload():
    """PEFT is the oracle for what a merge means: LoRA and DoRA on one Linear, float32."""
    from peft import LoraConfig, get_peft_model

    for use_dora in (False, True):
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(48, 40, bias=False))
        config = LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=use_dora,
                            init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        layer = peft_model.base_model.model[0]
        W = layer.base_layer.weight.detach().clone()
        B, A = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
        scale = layer.scaling["default"]
        if use_dora:
            with torch.no_grad():  # a trained magnitude, not the initial ‖W + sBA‖
                layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.5 * torch.rand(40))
            magnitude = layer.lora_magnitude_vector["default"].weight.detach().clone()
        merged = peft_model.merge_and_unload()[0].weight.detach()
        for fn in ((dora_merge_triton, dora_merge_reference) if use_dora else (merge_triton, merge_reference)):
            args = (W, [B], [A], [scale]) + ((magnitude,) if use_dora else ())
            torch.testing.assert_close(fn(*args), merged, rtol=2e-6, atol=2e-6)
