"""PEFT's LoHa and LoKr adapters (peft_type LOHA/LOKR; loratool/formats/peft.py, kinds/loha.py,
kinds/lokr.py), made by PEFT itself on the tiny Llama (fixtures/peft_lycoris.py): the delta is
PEFT's ``get_delta_weight`` (scale alpha / r, LoKr's too), the merge is within one rounding of
PEFT's ``merge_and_unload``, and ``convert`` writes a LoRA that PEFT loads with the same deltas.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from fixtures import peft_lycoris as fx  # noqa: E402
from loratool.formats import load_adapter  # noqa: E402

SEED = 1234  # fixtures/generate.py's: fx.make builds on the same weights as base_llama
ALGORITHM = {"loha": "LoHa", "lokr_one": "LoKr", "lokr_both": "LoKr", "lokr_full": "LoKr"}
BF16_ULP = 2.0 ** -7  # bfloat16's spacing relative to the leading power of two (8-bit significand)
F32_EPS = 2.0 ** -24


def _bf16_ulp(x: "torch.Tensor") -> "torch.Tensor":
    """The spacing of bfloat16 values around each element of ``x`` (float64)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -126)))
    return torch.exp2(e) * BF16_ULP


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """case -> (the directory PEFT saved, {module: PEFT's get_delta_weight in float64})."""
    import warnings

    from peft.tuners.lycoris_utils import LycorisLayer

    d = tmp_path_factory.mktemp("peft_lycoris")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in fx.CASES:
            pm = fx.make(case, SEED)
            pm.save_pretrained(str(d / case))
            pm.double()
            refs = {}
            with torch.no_grad():
                for name, layer in pm.named_modules():
                    if isinstance(layer, LycorisLayer):
                        refs[name.removeprefix("base_model.model.")] = layer.get_delta_weight("default")
            out[case] = (d / case, refs)
    return out


@pytest.mark.parametrize("case", fx.CASES)
def test_delta_is_peft_get_delta_weight(adapters, case):
    path, refs = adapters[case]
    adapter = load_adapter(path)
    assert adapter.format == "peft" and adapter.problems == []
    assert set(adapter.modules) == set(refs)
    for name, m in adapter.modules.items():
        assert m.algorithm == ALGORITHM[case] and m.structure_problems() == []
        ref = refs[name]
        ours = m.delta(torch.float64)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()), msg=name)
    if case == "lokr_full":  # both factors full: PEFT's alpha / r (3/64), where LyCORIS's forward pass has 1
        assert {m.layout_name for m in adapter.modules.values()} == {"full"}
        assert {m.scale for m in adapter.modules.values()} == {3 / 64}
    if case == "loha":  # rank_pattern and alpha_pattern: q_proj rank 2 (scale 6/2), layer 1's down_proj 2/4
        m = adapter.modules
        assert m["model.layers.0.self_attn.q_proj"].rank == 2 and m["model.layers.0.self_attn.q_proj"].scale == 3.0
        assert m["model.layers.1.mlp.down_proj"].scale == 0.5 and m["model.layers.0.mlp.down_proj"].scale == 1.5


@pytest.mark.parametrize("case", fx.CASES)
def test_merge_is_within_one_rounding_of_peft(adapters, case, fixtures_dir, tmp_path):
    """loratool's merge into the bf16 base against PEFT's merge_and_unload of the same adapter on the
    same base (bf16 += float32 ΔW: one rounding), and against W + ΔW in float64."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratool.checkpoint import BaseCheckpoint
    from loratool.merge.api import merge

    path, refs = adapters[case]
    base_dir = fixtures_dir / "base_llama"
    merge(base_dir, [str(path)], tmp_path / "out")
    ours = BaseCheckpoint(tmp_path / "out")
    base = BaseCheckpoint(base_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)
    peft_sd = PeftModel.from_pretrained(model, str(path)).merge_and_unload().state_dict()
    for name, ref in refs.items():
        target = name + ".weight"
        w = base.read(target).double()
        v = w + ref
        got = ours.read(target)
        assert got.dtype == torch.bfloat16
        got = got.double()
        theirs = peft_sd[target].double()
        # the same rounding of (nearly) the same float32 sum: equal, or one bfloat16 step apart
        assert bool(((got - theirs).abs() <= _bf16_ulp(v)).all()), target
        assert float((got == theirs).double().mean()) > 0.99, target
        # one rounding of W + ΔW (half a step), plus ΔW's float32 arithmetic
        tol = 0.5 * _bf16_ulp(v) + 16 * F32_EPS * float(ref.abs().max())
        assert bool(((got - v).abs() <= tol).all()), (target, float(((got - v).abs() - tol).max()))
    untouched = [k for k in peft_sd if k.removesuffix(".weight") not in refs][:5]
    for k in untouched:
        assert torch.equal(ours.read(k), peft_sd[k]), k


@pytest.mark.parametrize("case", fx.CASES)
def test_convert_is_exact_and_loads_in_peft_as_lora(adapters, case, tmp_path):
    """convert --to peft at full rank: a plain LoRA (peft_type LORA) that PEFT loads on the tiny
    Llama and whose get_delta_weight is PEFT's LoHa/LoKr delta, to float32 rounding."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from fixtures.generate import make_llama
    from loratool.convert import convert

    path, refs = adapters[case]
    out = tmp_path / "lora"
    result = convert(path, "peft", out)
    assert {c.module for c in result.conversions} == set(refs)
    assert all(c.algorithm == ALGORITHM[case] and c.relative_error < 1e-12 for c in result.conversions)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "alpha" not in cfg and "init_weights" not in cfg
    assert {m.module_kind for m in load_adapter(out).modules.values()} == {"lora"}
    pm = PeftModel.from_pretrained(make_llama(SEED), str(out))
    seen = set()
    with torch.no_grad():
        for name, layer in pm.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            name = name.removeprefix("base_model.model.")
            ref = refs[name]
            got = layer.get_delta_weight("default").double()
            k = layer.r["default"]
            assert got.shape == ref.shape
            tol = 8 * F32_EPS * math.sqrt(k) * float(ref.abs().max())
            assert float((got - ref).abs().max()) <= tol, (name, float((got - ref).abs().max()), tol)
            seen.add(name)
    assert seen == set(refs)


def test_convert_at_lower_rank_is_the_optimal_truncation(adapters, tmp_path):
    """--rank below the exact rank: the error is the dense SVD's truncation error (Eckart–Young),
    and PEFT applies exactly the LoRA written."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from fixtures.generate import make_llama
    from loratool.convert import convert

    path, refs = adapters["lokr_both"]
    k = 3
    out = tmp_path / "lora3"
    result = convert(path, "peft", out, rank=k)
    errors = {c.module: c for c in result.conversions}
    pm = PeftModel.from_pretrained(make_llama(SEED), str(out))
    with torch.no_grad():
        for name, layer in pm.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            name = name.removeprefix("base_model.model.")
            ref = refs[name].numpy()
            S = np.linalg.svd(ref, compute_uv=False)
            want = math.sqrt(float((S[k:] ** 2).sum()))
            c = errors[name]
            assert c.rank == k == layer.r["default"] and c.exact_rank > k
            assert abs(c.error - want) <= 1e-6 * want, (name, c.error, want)
            got = layer.get_delta_weight("default").double().numpy()
            actual = float(np.linalg.norm(got - ref))
            assert abs(actual - want) <= 1e-6 * want + 1e-6 * float(np.linalg.norm(ref)), (name, actual, want)


@pytest.mark.parametrize("case", fx.CASES)
def test_inspect_names_the_algorithm(adapters, case):
    from loratool.inspection import inspect_path

    path, refs = adapters[case]
    r = inspect_path(path, modules=True)
    assert r.algorithms == {ALGORITHM[case]: len(refs)}
    assert {m.algorithm for m in r.modules} == {ALGORITHM[case]}
    for m in r.modules:
        assert list(m.base_shape) == list(refs[m.name].shape)


def test_findings_are_specific(adapters, tmp_path):
    """A config rank the LoKr factors do not have (LT103), LoRA tensors under a LOHA config, a
    peft_type loratool does not read, and writing LoHa as PEFT LoRA without converting."""
    from loratool.errors import FormatError, UsageError
    from loratool.formats import write_adapter
    from loratool.validation import validate

    src = adapters["lokr_one"][0]
    bad = tmp_path / "r3"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3}))
    report = validate(bad)
    lt103 = [f for f in report.findings if f.id == "LT103"]
    assert lt103 and "config asks for rank 3" in lt103[0].message and "lokr_w2_b has rank 2" in lt103[0].message

    ia3 = tmp_path / "ia3"
    shutil.copytree(src, ia3)
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(FormatError, match="peft_type is 'IA3', not LORA, LOHA or LOKR"):
        load_adapter(ia3)

    mixed = tmp_path / "mixed"
    shutil.copytree(src, mixed)
    (mixed / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LOHA"}))
    a = load_adapter(mixed, tolerant=True)
    assert not a.modules and a.problems
    assert "LoKr tensors (lokr_w1, lokr_w2_a, lokr_w2_b) in an adapter whose adapter_config.json says peft_type LOHA" \
        in a.problems[0].message

    loha = load_adapter(adapters["loha"][0])
    with pytest.raises(UsageError, match="is LoHa; `loratool convert --to peft` writes it as a LoRA"):
        write_adapter(loha, tmp_path / "w", "peft")


def test_vllm_target_refuses_loha_and_lokr(adapters, fixtures_dir):
    """vLLM loads LoRA (and refuses DoRA): a LoHa or LoKr adapter is refused for its algorithm
    (LT408), with the convert command that fixes it; a plain LoRA gets no LT408."""
    from loratool.validation import validate

    for case, algorithm in (("loha", "LoHa"), ("lokr_one", "LoKr")):
        r = validate(adapters[case][0], target="vllm")
        found = [f for f in r.findings if f.id == "LT408"]
        assert len(found) == 1 and algorithm in found[0].message and "loratool convert" in found[0].message
        assert not r.passed
    assert "LT408" not in {f.id for f in validate(fixtures_dir / "llama_r8", target="vllm").findings}
