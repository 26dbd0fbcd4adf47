"""Module kinds (loratool/kinds): the layout rules, LoRA and DoRA, and the seam itself.

The seam test defines a toy kind here (``FullDelta``: the delta stored whole, no low-rank form),
registers it, and runs validate's structure and fit checks, the manifest's fit check, the merge
plan and inspect on an adapter that holds it, with no change anywhere else. (Merging it for real
needs the engines to take the kind's ``delta_rows``; they still branch on LoRA's factors.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from safetensors.torch import save_file

from loratool.adapter import Adapter, LoraModule
from loratool.adapter_specs import AdapterSpec
from loratool.checkpoint import BaseCheckpoint
from loratool.inspection import inspect_adapter
from loratool.kinds import KINDS, AdapterModule, DoraModule, LayerKind, Problem, module_of, register_kind
from loratool.kinds import layout
from loratool.kinds.base import Magnitudes
from loratool.kinds.dora import rescale
from loratool.manifest import _fit_problems
from loratool.merge.plan import Action, plan_merge
from loratool.merge.specs import LoadedAdapter
from loratool.validation import Findings, check_base, check_structure

L = LayerKind
OUT, IN, R = 6, 5, 3


@dataclass
class FullDelta(AdapterModule):
    """A toy kind: the 2-D delta (out, in) stored whole, scale = alpha."""

    module_kind: ClassVar[str] = "full-delta"
    required: ClassVar[frozenset[str]] = frozenset({"delta_weight"})

    name: str
    kind: LayerKind
    delta_weight: torch.Tensor
    alpha: float = 1.0
    use_rslora: bool = False
    config_rank: int | None = None
    config_alpha: float | None = None
    source_keys: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return min(self.delta_weight.shape)

    @property
    def scale(self) -> float:
        return self.alpha

    @property
    def base_weight_shape(self) -> tuple[int, ...]:
        out, *rest = self.delta_weight.shape
        return layout.base_shape(self.kind, out, math.prod(rest))

    def tensors(self):
        return {"delta_weight": self.delta_weight}

    def structure_problems(self):
        if self.delta_weight.dim() == 2:
            return []
        return [Problem("LT106", f"delta_weight {list(self.delta_weight.shape)} is not 2-D")]

    def delta(self, dtype=None):
        d = self.delta_weight.to(dtype or torch.float32) * self.scale
        return layout.to_base(self.kind, d, self.base_weight_shape)

    def magnitudes(self, loaded=None):
        v = float(self.delta_weight.abs().max())
        return Magnitudes(v, v, "delta_weight", 0.0, 0.0)


@pytest.fixture
def toy_kind():
    register_kind(FullDelta)
    yield FullDelta
    del KINDS[FullDelta.module_kind]


def _lora(layer: LayerKind, name: str = "m", bias: bool = False, **kw) -> LoraModule:
    g = torch.Generator().manual_seed(0)
    if layer is L.CONV2D:
        a, b = torch.randn(R, IN, 3, 3, generator=g), torch.randn(OUT, R, 1, 1, generator=g)
    else:
        a, b = torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)
    kw.setdefault("lora_B_bias", torch.randn(OUT, generator=g) if bias else None)
    return module_of(name=name, kind=layer, lora_A=a, lora_B=b, alpha=6.0, **kw)


# -- layout, LoRA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layer,shape", [(L.LINEAR, (OUT, IN)), (L.CONV1D, (IN, OUT)),
                                         (L.EMBEDDING, (IN, OUT)), (L.CONV2D, (OUT, IN, 3, 3))])
def test_lora_delta_is_peft_layout(layer, shape):
    m = _lora(layer)
    assert type(m) is LoraModule and not m.use_dora and m.base_weight_shape == shape
    d = m.delta(torch.float64)
    a, b = m.lora_A.double(), m.lora_B.double()
    if layer is L.CONV2D:
        want = (b.squeeze(3).squeeze(2) @ a.reshape(R, -1)).reshape(shape)
    else:
        want = (b @ a).T if layer in (L.CONV1D, L.EMBEDDING) else b @ a
    torch.testing.assert_close(d, want * m.scale, rtol=0, atol=1e-12)
    lr = m.low_rank(torch.float64)
    assert lr.scale == m.scale
    assert torch.equal(layout.to_base(layer, (lr.B2 @ lr.A2) * lr.scale, shape), d)
    rows = shape[0]
    for i, j in ((0, 2), (2, rows)):
        torch.testing.assert_close(m.delta_rows(i, j, torch.float64), d[i:j], rtol=0, atol=1e-12)
    if layout.row_blocked(layer):
        left, right = layout.block_factors(layer, lr.B2, lr.A2, 1, 3)
        torch.testing.assert_close((left @ right) * lr.scale, d[1:3], rtol=0, atol=1e-12)


@pytest.mark.parametrize("layer", list(L))
def test_one_fit_check(layer):
    m = _lora(layer, name="model.layers.0.self_attn.k_proj")
    shape = m.base_weight_shape
    assert m.fit(shape, "w").ok
    missing = m.fit(None)
    assert missing.check == "LT301" and not missing.mergeable
    assert missing.message == "the base has no tensor model.layers.0.self_attn.k_proj.weight"
    flipped = m.fit(shape[::-1], "w")
    if layer in (L.LINEAR, L.CONV1D):  # PEFT's dispatch_default flips fan_in_fan_out
        assert flipped.check == "LT303" and flipped.mergeable
        assert flipped.layer is (L.CONV1D if layer is L.LINEAR else L.LINEAR)
        assert "fan_in_fan_out=True" in flipped.message
    else:
        assert flipped.check == "LT302" and not flipped.mergeable and flipped.layer is layer
    other = m.fit((shape[0] + 1, *shape[1:]), "w")
    assert other.check == "LT302" and f"the adapter's {layer.value} delta has {list(shape)}" in other.message
    assert "lora_A [" in other.message
    # k/v heads: the same input size, another output size
    if layer is L.LINEAR:
        assert "num_key_value_heads" in m.fit((OUT * 2, IN), "w").message


def test_with_factors_keeps_alpha_and_the_bias_contribution():
    m = _lora(L.LINEAR, bias=True)
    lr = m.low_rank(torch.float64)
    new = m.with_factors(lr.B2[:, :2], lr.A2[:2])
    assert type(new) is LoraModule and new.rank == 2 and new.alpha == m.alpha and new.config_rank == 2
    assert new.lora_A.dtype == m.lora_A.dtype and new.source_keys == {}
    torch.testing.assert_close(new.lora_B_bias * new.scale, m.lora_B_bias * m.scale)


def test_lora_structure_problems():
    bad_conv = module_of(name="c", kind=L.CONV2D, lora_A=torch.zeros(R, IN), lora_B=torch.zeros(OUT, R),
                         alpha=1.0, lora_B_bias=torch.zeros(OUT + 1))
    assert [p.check for p in bad_conv.structure_problems()] == ["LT106", "LT109"]
    assert "fit no conv2d layer (expected A (r, in, kh, kw) and B (out, r, 1, 1))" in bad_conv.structure_problems()[0].message
    assert _lora(L.LINEAR, bias=True).structure_problems() == []


# -- DoRA -----------------------------------------------------------------------------------------

def test_module_of_picks_dora_by_its_magnitude():
    m = _lora(L.LINEAR, bias=True, magnitude=torch.ones(OUT))
    assert type(m) is DoraModule and m.use_dora and isinstance(m, LoraModule)
    assert list(m.tensors()) == ["lora_A", "lora_B", "magnitude", "lora_B_bias"]
    assert m.structure_problems() == []
    assert m.merge_problem(1.0, 1) is None
    assert "weight 0.5" in m.merge_problem(0.5, 1) and "unmerge" in m.merge_problem(1.0, -1)
    wrong = _lora(L.LINEAR, magnitude=torch.ones(OUT + 1), lora_B_bias=torch.ones(2))
    assert [p.check for p in wrong.structure_problems()] == ["LT108", "LT109"]
    assert type(_lora(L.LINEAR, magnitude=None)) is LoraModule
    with pytest.raises(ValueError, match="no module kind"):
        module_of(name="x", kind=L.LINEAR, lora_A=torch.zeros(1, 1), alpha=1.0)


@pytest.mark.parametrize("layer", list(L))
def test_dora_rescale_is_m_over_the_output_norm(layer):
    m = _lora(layer)
    w = torch.randn(m.base_weight_shape, dtype=torch.float64)
    v = w + m.delta(torch.float64)
    mag = torch.rand(OUT, dtype=torch.float64) + 0.5
    merged = v * rescale(layer, mag, v, 0, v.shape[0])
    if layer in (L.CONV1D, L.EMBEDDING):  # outputs are columns
        torch.testing.assert_close(merged.norm(dim=0), mag)
    else:
        torch.testing.assert_close(merged.reshape(OUT, -1).norm(dim=1), mag)
    if layer is L.LINEAR:  # row blocks take their rows of m
        torch.testing.assert_close(v[2:4] * rescale(layer, mag, v[2:4], 2, 4), merged[2:4], rtol=0, atol=0)


def test_dora_rescale_is_the_merge_engines(base, tmp_path):
    """``dora.rescale`` gives the engine's DoRA factor bit for bit, so the engine can call it."""
    from loratool.merge.engines import TensorMath

    names = {"lin": L.LINEAR, "gpt": L.CONV1D, "emb": L.EMBEDDING, "conv": L.CONV2D}
    mag = torch.rand(OUT) + 0.5
    adapter = Adapter(format="peft", path=tmp_path / "a",
                      modules={n: _lora(k, name=n, magnitude=mag) for n, k in names.items()})
    plan = plan_merge(base, [LoadedAdapter(AdapterSpec(tmp_path / "a"), adapter)])
    for t in plan.tensors():
        if t.action is Action.MERGE:
            math_ = TensorMath(t, torch.float32)
            w = base.ref(t.name).load()
            v = math_.values(w, 0, t.shape[0])
            assert t.dora and torch.equal(rescale(t.kind, math_.magnitude, v, 0, t.shape[0]),
                                          math_.dora_factor(v, 0, t.shape[0])), t.name


# -- the seam: a kind defined here goes through validate, manifest, plan and inspect ----------------

@pytest.fixture
def base(tmp_path):
    g = torch.Generator().manual_seed(3)
    t = {"lin.weight": torch.randn(OUT, IN, generator=g), "gpt.weight": torch.randn(IN, OUT, generator=g),
         "emb.weight": torch.randn(IN, OUT, generator=g), "lora.weight": torch.randn(OUT, IN, generator=g),
         "conv.weight": torch.randn(OUT, IN, 3, 3, generator=g), "norm.weight": torch.ones(OUT)}
    path = tmp_path / "model.safetensors"
    save_file(t, str(path), metadata={"format": "pt"})
    return BaseCheckpoint(path)


def _toy(name, layer=L.LINEAR, shape=(OUT, IN)):
    return module_of(name=name, kind=layer, delta_weight=torch.randn(shape, generator=torch.Generator().manual_seed(1)),
                     alpha=0.5)


def test_a_new_kind_needs_no_other_change(toy_kind, base, tmp_path):
    modules = {"lin": _toy("lin"), "gpt": _toy("gpt"),  # gpt: a Linear delta on a Conv1D base
               "emb": _toy("emb", L.EMBEDDING), "lora": _lora(L.LINEAR, name="lora")}
    assert type(modules["lin"]) is toy_kind
    adapter = Adapter(format="peft", modules=modules, path=tmp_path / "adapter")

    f = Findings()
    check_structure(adapter, f)
    check_base(adapter, base, f)
    assert [(x.id, x.module) for x in f.items] == [("LT303", "gpt")], f.items
    assert _fit_problems(adapter, base) == []

    plan = plan_merge(base, [LoadedAdapter(AdapterSpec(tmp_path / "adapter"), adapter)])
    merged = {t.name: t for t in plan.tensors() if t.action is Action.MERGE}
    assert sorted(merged) == ["emb.weight", "gpt.weight", "lin.weight", "lora.weight"]
    term = merged["gpt.weight"].terms[0]
    assert type(term.module) is toy_kind and term.module.kind is L.CONV1D and term.coef == 0.5
    assert merged["gpt.weight"].kind is L.CONV1D and merged["emb.weight"].kind is L.EMBEDDING

    report = inspect_adapter(adapter, spectrum=True)
    assert report.kinds == {"embedding": 1, "linear": 3}
    row = next(r for r in report.modules if r.name == "emb")
    assert row.base_shape == [IN, OUT] and row.a_shape == [OUT, IN] and row.rank == min(OUT, IN)
    want = torch.linalg.svdvals(modules["emb"].delta_weight.double() * 0.5)
    torch.testing.assert_close(torch.tensor(row.spectrum.singular_values, dtype=torch.float64), want)
    toy = modules["lin"]
    torch.testing.assert_close(toy.delta_rows(1, 3), toy.delta()[1:3])

    # the merge engine takes the new kind through the seam too: W + weight · delta, rounded once
    from loratool.checkpoint import BaseCheckpoint
    from loratool.merge.executor import execute

    execute(plan, tmp_path / "out", block_bytes=64)
    out = BaseCheckpoint(tmp_path / "out")
    for name, mod in (("lin", modules["lin"]), ("gpt", modules["gpt"]), ("emb", modules["emb"])):
        w = base.read(f"{name}.weight")
        delta = merged[f"{name}.weight"].terms[0].module.delta()  # in the layout the plan chose (gpt: Conv1D)
        want = (w.float() + delta).to(w.dtype)
        assert torch.equal(out.read(f"{name}.weight"), want), name


def test_a_new_kind_that_does_not_fit(toy_kind, base, tmp_path):
    adapter = Adapter(format="peft", path=tmp_path / "adapter",
                      modules={"lin": _toy("lin", shape=(OUT + 1, IN)), "nowhere": _toy("nowhere"),
                               "lora": _toy("lora", shape=(OUT, IN, 1))})
    f = Findings()
    check_structure(adapter, f)
    check_base(adapter, base, f)
    assert sorted((x.id, x.module) for x in f.items) == [("LT106", "lora"), ("LT301", "nowhere"),
                                                         ("LT302", "lin")]
    lin = next(x for x in f.items if x.module == "lin")
    assert lin.message == (f"module lin: base tensor lin.weight has shape [{OUT}, {IN}], the adapter's linear "
                           f"delta has [{OUT + 1}, {IN}] (delta_weight [{OUT + 1}, {IN}])")
    problems = _fit_problems(adapter, base)
    assert len(problems) == 2 and any("the base has no tensor nowhere.weight" in p for p in problems)
    from loratool.errors import MisfitError

    with pytest.raises(MisfitError, match="delta_weight .* is not 2-D") as e:
        plan_merge(base, [LoadedAdapter(AdapterSpec(tmp_path / "adapter"), adapter)])
    assert "module 'nowhere': the base has no tensor nowhere.weight" in str(e.value)
