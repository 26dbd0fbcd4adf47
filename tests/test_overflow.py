"""Numbers that cannot overflow silently (issue 11).

A finite but huge scale (lora_alpha or alpha_pattern 1e300) or factor (a float64 lora_B element
of 1e308, a float32 one near float32's largest value) used to make ``merge`` write tensors of
Inf/NaN with exit 0, and ``validate`` pass them with a warning. Now:

* ``merge``/``unmerge`` refuse them before writing anything (``merge.check_overflow``), one line,
  exit 2, nothing at OUT;
* every engine checks every written block for Inf/NaN where the base is finite (the last guard:
  ``npmerge.PlainMath`` on the numpy path, ``merge._check_block`` behind torch on the CPU and
  CUDA), which catches what the factors alone cannot tell (a base near the dtype's largest value);
* ``validate`` reports them as errors (LT207, exit 1).

Bases and adapters are tinybase's (Llama-shaped, a few KB).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool import merge as M
from loratool.merge import numpy_engine as npmerge
from loratool.checkpoint import BaseCheckpoint
from loratool.errors import InputError
from loratool.validation import CHECKS, validate
from tests.tinybase import base_tensors, save_adapter, save_base

Q0 = "model.layers.0.self_attn.q_proj"
PREFIX = "base_model.model."
ENGINES = {"default": {}, "torch": {"LORATOOL_MERGE_ENGINE": "torch"}}


def _base(d, dtype=torch.float32, edit=None):
    t = base_tensors()
    if edit is not None:
        edit(t)
    return save_base(d, {k: v.to(dtype) for k, v in t.items()})


def _adapter(d, config=None, factors=None, dtype=None, r=4, alpha=8):
    """tinybase's adapter (q_proj and v_proj of both layers), with ``config`` keys set and
    ``factors(tensors)`` applied, its factors stored as ``dtype`` (default float32)."""
    save_adapter(d, r=r, alpha=alpha)
    if config:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(config)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if factors is not None or dtype is not None:
        t = load_file(str(d / "adapter_model.safetensors"))
        if dtype is not None:
            t = {k: v.to(dtype) for k, v in t.items()}
        if factors is not None:
            factors(t)
        save_file(t, str(d / "adapter_model.safetensors"))
    return d


def _lora_b(module=Q0, value=None, row=0, dtype=None):
    def edit(t):
        k = f"{PREFIX}{module}.lora_B.weight"
        if dtype is not None:
            t[k] = t[k].to(dtype)
        t[k][row, :] = value
    return edit


def _refused(cli, tmp_path, args, *needles, env=None):
    """Run ``loratool ARGS``; it must fail with exit 2, one line naming ``needles``, no
    traceback, and leave nothing at OUT nor beside it."""
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    p = cli(*args, "-o", out, "--quiet", env=env)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error: "), p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary output left either
    return lines[0]


def _lt207(path, module=None):
    r = validate(path)
    assert r.exit_code == 1 and not r.passed
    found = [f for f in r.findings if f.id == "LT207"]
    assert found and all(f.severity.value == "error" and f.check == CHECKS["LT207"] == "overflow" for f in found)
    if module is not None:
        assert [f.module for f in found] == [module]
    assert "LT204" not in {f.id for f in r.findings}  # the overflow replaces the old warning
    return found


# -- huge scales --------------------------------------------------------------------------------

@pytest.mark.parametrize("base_dtype,name", [(torch.bfloat16, "bfloat16"), (torch.float32, "float32")])
def test_huge_lora_alpha_is_refused(cli, tmp_path, base_dtype, name):
    base = _base(tmp_path / "base", base_dtype)
    adapter = _adapter(tmp_path / "adapter", config={"lora_alpha": 1e300})
    line = _refused(cli, tmp_path, ["merge", "--base", base, "--adapters", adapter, "--allow-base-mismatch"],
                    str(adapter), f"module '{Q0}'", "scale 2.5e+299", f"overflows {name}", "lora_alpha",
                    "the merge would write Inf")
    assert "and 2 more" in line  # four modules, two shown: still one line
    assert len(_lt207(adapter)) == 4
    # unmerge runs the same arithmetic with the opposite sign: refused the same way
    _refused(cli, tmp_path, ["unmerge", "--merged", base, "--adapters", adapter],
             str(adapter), "scale 2.5e+299")


def test_huge_alpha_pattern_names_its_module(cli, tmp_path):
    base = _base(tmp_path / "base", torch.bfloat16)
    adapter = _adapter(tmp_path / "adapter", config={"alpha_pattern": {"layers.1.self_attn.v_proj": 1e300}})
    line = _refused(cli, tmp_path, ["merge", "--base", base, "--adapters", adapter, "--allow-base-mismatch"],
                    "module 'model.layers.1.self_attn.v_proj'", "overflows bfloat16 (max 3.39e+38)", "alpha 1e+300")
    assert Q0 not in line
    _lt207(adapter, module="model.layers.1.self_attn.v_proj")


def test_a_merge_weight_can_make_the_scale_overflow(cli, tmp_path):
    """The scale that counts is weight · alpha/r, the coefficient the merge multiplies by."""
    base = _base(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter")
    _refused(cli, tmp_path, ["merge", "--base", base, "--adapters", f"{adapter}:1e38", "--allow-base-mismatch"],
             "scale 2e+38", "overflows float32")
    assert validate(adapter).exit_code == 0  # the adapter itself is fine


# -- huge factors -------------------------------------------------------------------------------

def test_float64_factor_past_float32_range_is_refused(cli, tmp_path):
    """1e308 is finite in float64 (so not LT201) but Inf once upcast to float32, PEFT's dtype."""
    base = _base(tmp_path / "base", torch.bfloat16)
    adapter = _adapter(tmp_path / "adapter", factors=_lora_b(value=1e308, dtype=torch.float64))
    _refused(cli, tmp_path, ["merge", "--base", base, "--adapters", adapter, "--allow-base-mismatch"],
             f"module '{Q0}'", f"{PREFIX}{Q0}.lora_B.weight holds 1e+308", "float32's largest value")
    found = _lt207(adapter, module=Q0)
    assert "holds 1e+308" in found[0].message


@pytest.mark.parametrize("value,clause", [(1e38, "lora_B @ lora_A reaches"),  # B·A itself overflows float32
                                          (2e37, "× factors overflows bfloat16")])  # only once scaled by 2
def test_float32_factor_whose_products_overflow_is_refused(cli, tmp_path, value, clause):
    """A finite float32 lora_B row (1e38 and 2e37; 1e308 would be Inf in float32 already, LT201)
    whose products with lora_A, or with the scale, overflow."""
    base = _base(tmp_path / "base", torch.bfloat16)
    adapter = _adapter(tmp_path / "adapter", factors=_lora_b(value=value))
    _refused(cli, tmp_path, ["merge", "--base", base, "--adapters", adapter, "--allow-base-mismatch"],
             f"module '{Q0}'", clause)
    found = _lt207(adapter, module=Q0)
    assert "float32" in found[0].message or "bfloat16" in found[0].message


def test_the_output_dtype_sets_the_limit(cli, tmp_path):
    """A delta of about 1e5 fits float32 and bfloat16 but not float16: merged into a float32 base
    it is written (and validate passes the float32 adapter); with --dtype fp16 it is refused, and
    the same factors saved as float16 fail validate (float16 adapters are applied in float16)."""
    base = _base(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter", factors=_lora_b(value=1e4))
    p = cli("merge", "--base", base, "--adapters", adapter, "-o", tmp_path / "ok", "--quiet", "--allow-base-mismatch")
    assert p.returncode == 0, p.stderr
    assert validate(adapter).exit_code == 0
    _refused(cli, tmp_path, ["merge", "--base", base, "--adapters", adapter, "--dtype", "fp16",
                             "--allow-base-mismatch"], f"module '{Q0}'", "overflows float16 (max 6.55e+04)")
    half = _adapter(tmp_path / "half", factors=_lora_b(value=1e4), dtype=torch.float16)
    assert "overflows float16" in _lt207(half, module=Q0)[0].message


def test_adapters_that_overflow_only_together(cli, tmp_path):
    base = _base(tmp_path / "base")
    big = _lora_b(value=1.2e37)  # scale 2 · Σ_k max|B[:,k]|·max|A[k,:]| ≈ 2.3e38 each: fine alone, not twice
    a = _adapter(tmp_path / "a", factors=big)
    b = _adapter(tmp_path / "b", factors=big)
    for d in (a, b):
        plan = M.plan_merge(BaseCheckpoint(base), M.load_adapters(M._specs(str(d))))
        M.check_overflow(plan)  # alone: no complaint
    _refused(cli, tmp_path, ["merge", "--base", base, "--adapters", f"{a},{b}", "--allow-base-mismatch"],
             f"base tensor '{Q0}.weight'", "together reach", "lower the weights")


# -- the last guard: the base's own values push the merge past the dtype -------------------------

def _near_max(t):
    t[f"{Q0}.weight"][0, :] = 3.35e38  # finite in float32 and bfloat16, close to both maxima


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
def test_every_engine_refuses_a_block_that_overflows(cli, tmp_path, engine, base_dtype):
    """lora_B row 0 at 1e37 passes the bound on the factors (scale · Σ ≈ 1.6e38), but added to a
    base row at 3.35e38 it overflows: the last guard stops the merge, on the numpy path (where the
    probe vouches for numpy's GEMM here) and on torch's."""
    base = _base(tmp_path / "base", base_dtype, edit=_near_max)
    adapter = _adapter(tmp_path / "adapter", factors=_lora_b(value=1e37))
    plan = M.plan_merge(BaseCheckpoint(base), M.load_adapters(M._specs(str(adapter))))
    M.check_overflow(plan)
    _refused(cli, tmp_path, ["merge", "--base", base, "--adapters", adapter, "--allow-base-mismatch"],
             f"tensor '{Q0}.weight'", "Inf/NaN values where the base is finite", "base 3.35e+38",
             "nothing was written", str(adapter), env=ENGINES[engine])


def test_a_cast_that_overflows_is_refused(cli, tmp_path):
    """--dtype fp16 of a float32 base holding 1e5 (an untouched tensor, converted only)."""
    def edit(t):
        t["model.embed_tokens.weight"][3, 4] = 1e5
    base = _base(tmp_path / "base", edit=edit)
    adapter = _adapter(tmp_path / "adapter")
    _refused(cli, tmp_path, ["merge", "--base", base, "--adapters", adapter, "--dtype", "fp16",
                             "--allow-base-mismatch"],
             "tensor 'model.embed_tokens.weight'", "converting it to float16", "[3, 4]", "--dtype")


def test_inf_already_in_the_base_is_kept(cli, tmp_path):
    """The guard is about what the merge adds: Inf/NaN that the base holds are written as before,
    by both engines alike."""
    def edit(t):
        t[f"{Q0}.weight"][2, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    base = _base(tmp_path / "base", torch.bfloat16, edit=edit)
    adapter = _adapter(tmp_path / "adapter")
    outs = []
    for name, env in ENGINES.items():
        p = cli("merge", "--base", base, "--adapters", adapter, "-o", tmp_path / name, "--quiet",
                "--allow-base-mismatch", env=env)
        assert p.returncode == 0, p.stderr
        outs.append(BaseCheckpoint(tmp_path / name).ref(f"{Q0}.weight").load())
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    assert outs[0][2, 0] == float("inf") and outs[0][2, 1] == float("-inf") and outs[0][2, 2].isnan()
    assert torch.isfinite(outs[0][3:]).all()


def test_plain_math_guard(tmp_path):
    """npmerge's guard, on any CPU (the GEMM is irrelevant here): Inf where the base is finite
    raises NonFiniteBlock with the first place; overflow of the rounding alone (a float32 value
    that bfloat16 cannot hold) counts; Inf in the base does not."""
    cols, rank = 32, 2
    engine = npmerge.PlainMath.__new__(npmerge.PlainMath)
    engine.src_dtype, engine.cols, engine.coef = "F32", cols, None
    engine.b = np.ones((12, rank), np.float32)
    engine.a = np.full((rank, cols), 1e37, np.float32)  # delta 2e37 everywhere
    w = np.zeros((4, cols), np.float32)
    w[1, 5] = 3.3e38  # + 2e37 = 3.5e38: past float32's largest value
    for dtype in ("F32", "BF16"):
        engine.dtype = dtype
        with pytest.raises(npmerge.NonFiniteBlock) as e:
            engine.rows(w.copy(), 8, 12)
        assert (e.value.row, e.value.col, e.value.count, e.value.value) == (9, 5, 1, float("inf"))
    engine.dtype = "BF16"
    w[1, 5] = 3.38e38  # + 2e36 = 3.40e38: below float32's max, past bfloat16's (rounds to inf)
    engine.a = np.full((rank, cols), 1e36, np.float32)
    with pytest.raises(npmerge.NonFiniteBlock):
        engine.rows(w.copy(), 0, 4)
    engine.dtype = "F32"
    engine.rows(w.copy(), 0, 4)  # fits float32
    w[1, 5] = np.inf
    assert np.isinf(engine.rows(w.copy(), 0, 4)[1, 5])
    engine.guard = False
    w[1, 5] = 3.4e38
    engine.a = np.full((rank, cols), 1e37, np.float32)
    assert np.isinf(engine.rows(w.copy(), 0, 4)[1, 5])  # unguarded: the arithmetic as torch's


def test_torch_block_guard():
    """merge._check_block, the guard behind every torch engine (CUDA blocks arrive on the CPU)."""
    base = np.zeros((3, 4), np.float32)
    base[2, 1] = np.inf
    w = torch.from_numpy(base)
    ok = w.clone()
    M._check_block(_tensor_plan(), w, ok.to(torch.bfloat16), 0)  # the base's own Inf: fine
    bad = ok.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(InputError) as e:
        M._check_block(_tensor_plan(), w, bad.to(torch.bfloat16), 10)
    assert e.value.exit_code == 2 and "[11, 3]" in str(e.value) and "1 Inf/NaN" in str(e.value)


def test_every_torch_engine_goes_through_the_guard():
    """The executor checks what any torch engine returns: the CUDA engine (``_CudaMath``, its rows
    already rounded by the Triton kernel) hands its blocks to the same ``_compute_block``."""
    class Overflowing:  # stands in for _CudaMath, which needs a GPU
        def rows(self, w, i, j):
            return torch.full(w.shape, float("inf"), dtype=torch.bfloat16)

    t = _tensor_plan()
    with pytest.raises(InputError) as e:
        M._compute_block(t, Overflowing(), bytearray(2 * 8), 16, 4, 6)
    assert "8 Inf/NaN values where the base is finite (first at [4, 0]" in str(e.value)


def _tensor_plan():
    """A TensorPlan of a (2, 4) bfloat16 tensor, as far as the guard and _compute_block look."""
    class _File:
        path = "base.safetensors"

    class _Src:
        file, dtype, shape = _File(), "BF16", (2, 4)

    return M.TensorPlan("w", _Src(), "BF16", M.Action.MERGE, terms=[])


def test_normal_adapters_pass_the_checks(fixtures_dir):
    """The fixtures (PEFT-made, every kind) pass the bound; test_merge shows they merge as before."""
    for name in ("llama_r8", "llama_r8_bf16", "llama_dora", "llama_rslora_patterns", "llama_bias",
                 "llama_embed_mts", "gpt2_conv1d"):
        assert not [f for f in validate(fixtures_dir / name).findings if f.id == "LT207"], name
        if name in ("llama_bias", "gpt2_conv1d"):
            continue  # their bases are built in test_merge
        plan = M.plan_merge(BaseCheckpoint(fixtures_dir / "base_llama"),
                            M.load_adapters(M._specs(str(fixtures_dir / name))))
        M.check_overflow(plan)


def test_deltas_into_disjoint_rows_are_bounded_apart():
    """Terms that add into disjoint rows of one tensor (q, k, v fused, ``Term.rows``) never meet:
    two at 0.6 of float16's largest value each pass when their rows differ, and are refused
    together when they are the same rows."""
    from types import SimpleNamespace

    class _Module:  # a module fine on its own: its delta's bound is 0.6 of float16's largest value
        name, use_dora = "m", False

        def tensors(self):
            return {}

        def magnitudes(self):
            return SimpleNamespace(products=0.6 * 65504, bias=0.0)

        def scale_overflow(self, *args):
            return None

        def overflow(self, *args):
            return None

    m, c = _Module(), 1.0

    class _Plan:
        def __init__(self, rows):
            self.t = _tensor_plan()
            self.t.dtype = "F16"
            self.t.terms = [M.Term(m, c, 1.0, "a", rows=rows[0]), M.Term(m, c, 1.0, "b", rows=rows[1])]

        def tensors(self):
            return [self.t]

    M.check_overflow(_Plan([(0, 4), (4, 8)]))  # q and k: each alone under the limit
    with pytest.raises(InputError, match="together reach"):
        M.check_overflow(_Plan([(0, 4), (0, 4)]))
    with pytest.raises(InputError, match="together reach"):
        M.check_overflow(_Plan([None, (4, 8)]))  # a whole-tensor term meets every block


def test_the_guard_names_the_whole_tensors_row_for_a_piece(tmp_path):
    """A block of a fused tensor's piece (rows [2, 4) of it) that comes out Inf is reported at
    the row of the whole tensor, not of the piece."""
    from loratool.merge.overflow import _nonfinite_error
    from loratool.merge.plan import rows_ref
    from loratool.safetensors_io import SafetensorsFile

    save_file({"w": torch.zeros(6, 4)}, str(tmp_path / "b.safetensors"))
    piece = rows_ref(SafetensorsFile(tmp_path / "b.safetensors").ref("w"), 2, 4)
    assert piece.first_row == 2 and piece.shape == (2, 4)
    t = M.TensorPlan("w", piece, "F32", M.Action.MERGE, terms=[])
    assert "first at [3, 1]" in _nonfinite_error(t, 1, 1, 1, float("inf"), 0.0).message
