"""LyCORIS kinds (LoCon+Tucker, LoHa, LoKr, full; loratool/kinds/loha.py, lokr.py, lycoris_misc.py):
read from files that lycoris-lora writes itself (fixtures/lycoris_nets.py), the delta against
lycoris's own forward pass in float64, the merge within one rounding of W + ΔW, and conversion to
plain LoRA (exact at the exact rank, the optimal truncation below it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")

from fixtures import lycoris_nets as fx  # noqa: E402
from loratool.formats import load_adapter  # noqa: E402
from loratool.kinds.lycoris_base import LycorisModule  # noqa: E402

SEED = 31


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """case -> (path of the file lycoris saved, the network (float64, applied), the float64 model)."""
    d = tmp_path_factory.mktemp("lycoris")
    out = fx.write_networks(d, fx.CASES, SEED)
    for _, net, model in out.values():
        net.to(torch.float64)
        model.to(torch.float64)
    out["_base"] = d / "base"
    return out


def _name(lora_name: str) -> str:
    from loratool.formats.kohya import module_name

    return module_name(lora_name)[0]


def _reference(lm, algo: str) -> "torch.Tensor":
    """ΔW in float64 as lycoris's forward pass applies it (the scale once)."""
    with torch.no_grad():
        if algo in ("loha", "lokr"):
            return lm.get_weight(lm.shape) * lm.scalar
        return lm.get_diff_weight()[0]


CASES = list(fx.CASES)


@pytest.mark.parametrize("case", CASES)
def test_delta_is_lycoris_forward_pass(nets, case):
    path, net, model = nets[case]
    algo = fx.CASES[case][0]
    adapter = load_adapter(path)
    assert len(adapter.modules) == len(fx.LAYERS)
    for lm in net.loras:
        m = adapter.modules[_name(lm.lora_name)]
        assert m.structure_problems() == []
        ref = _reference(lm, algo).reshape(lm.shape if hasattr(lm, "shape") else -1)
        ours = m._d2(np.float64) * m.scale if isinstance(m, LycorisModule) else None
        if ours is None:  # plain LoRA/LoCon: the LoRA kind
            ours = m.delta(torch.float64).numpy()
        # full: the file holds W_trained - W rounded to float32 once (lycoris saves the difference)
        rtol = 2.0 ** -24 if algo == "full" else 1e-12
        np.testing.assert_allclose(ours.reshape(ref.shape), ref.numpy(), rtol=rtol, atol=rtol * float(ref.abs().max()),
                                   err_msg=m.name)
        # the forward pass: y = op(x, W + ΔW) (DoRA: rescaled rows), lycoris's own module
        if algo in ("loha", "lokr") and lm.scale != 1:  # get_diff_weight scales twice (issue 15): not ours
            with torch.no_grad():
                double = lm.get_diff_weight()[0].reshape(ref.shape)
            torch.testing.assert_close(double, ref * lm.scale)


@pytest.mark.parametrize("case", ["loha", "loha_tucker", "lokr_full", "lokr_one", "lokr_both", "lokr_tucker",
                                  "locon_tucker", "full", "loha_dora"])
def test_merge_is_within_one_rounding(nets, case, tmp_path):
    from loratool.checkpoint import BaseCheckpoint
    from loratool.merge.api import merge

    path, net, model = nets[case]
    algo = fx.CASES[case][0]
    merge(nets["_base"], [str(path)], tmp_path / "out")
    out = BaseCheckpoint(tmp_path / "out")
    base = BaseCheckpoint(nets["_base"])
    for lm in net.loras:
        target = _name(lm.lora_name) + ".weight"
        w = base.read(target).double()
        v = w + _reference(lm, algo).reshape(w.shape)
        delta = (v - w).abs().max()
        roundings = 1
        if getattr(lm, "wd", False):  # DoRA: m / ‖V‖ per output row, in float32 (norm, divide, multiply)
            from lycoris.functional.general import _weight_decompose

            with torch.no_grad():
                v = _weight_decompose(v, lm.dora_scale.detach().double(), 1, lm.wd_on_out)
            roundings = 4
        got = out.read(target).double()
        # one float32 rounding of the sum, plus the float32 arithmetic of the delta itself (PEFT's:
        # factors upcast to float32, a few roundings of |ΔW|'s size where W + ΔW cancels)
        tol = v.abs() * roundings * 2.0 ** -24 + 8 * 2.0 ** -24 * delta
        assert bool(((got - v).abs() <= tol).all()), (target, float(((got - v).abs() - tol).max()))


@pytest.mark.parametrize("case", ["loha", "loha_tucker", "lokr_full", "lokr_one", "lokr_both", "lokr_tucker",
                                  "locon_tucker", "full"])
def test_convert_exact_then_optimal(nets, case):
    from loratool.convert import module_to_lora

    adapter = load_adapter(nets[case][0])
    for m in adapter.modules.values():
        if not isinstance(m, LycorisModule):
            continue
        dense = m._d2(np.float64) * m.scale
        S = np.linalg.svd(dense, compute_uv=False)
        lora, conv = module_to_lora(m)
        got = lora.delta(torch.float64).numpy().reshape(dense.shape)
        assert conv.rank <= m.exact_rank and conv.relative_error < 1e-12
        assert np.abs(got - dense).max() <= 8 * 2.0 ** -24 * np.abs(dense).max() * math.sqrt(conv.rank), m.name
        k = max(1, conv.rank // 2)
        lora_k, conv_k = module_to_lora(m, rank=k)
        want = math.sqrt(float((S[k:] ** 2).sum()))
        assert conv_k.rank == k
        assert abs(conv_k.error - want) <= 1e-6 * want, (m.name, conv_k.error, want)
        got_k = lora_k.delta(torch.float64).numpy().reshape(dense.shape)
        actual = float(np.linalg.norm(got_k - dense))
        assert abs(actual - want) <= 1e-6 * want + 1e-6 * np.linalg.norm(dense), (m.name, actual, want)


def test_lokr_singular_values_are_products(nets):
    m = next(m for m in load_adapter(nets["lokr_one"][0]).modules.values() if m.module_kind == "lokr")
    dense = m._d2(np.float64) * m.scale
    S = np.linalg.svd(dense, compute_uv=False)
    ours = m.singular_values()
    assert len(ours) == m.exact_rank == 16  # rank(W1)·rank(W2), not min(out, in) = 64
    np.testing.assert_allclose(ours, S[: len(ours)], rtol=1e-10, atol=1e-12 * S[0])
    assert S[len(ours):].max() <= 1e-12 * S[0]


def test_convert_cli_writes_lora_that_reads_back(nets, tmp_path, cli):
    out = tmp_path / "k.safetensors"
    r = cli("convert", nets["loha"][0], "--to", "kohya", "-o", out, "--rank", "8")
    assert r.returncode == 0, r.stderr
    assert "LyCORIS modules made LoRA" in r.stdout
    back = load_adapter(out)
    assert {m.module_kind for m in back.modules.values()} == {"lora"}
    src = load_adapter(nets["loha"][0])
    for name, m in back.modules.items():
        assert m.rank <= 8 and tuple(m.base_weight_shape) == tuple(src.modules[name].base_weight_shape)


def test_structure_findings_are_specific(tmp_path):
    from safetensors.torch import save_file

    n = "lora_unet_down_blocks_0_resnets_0_conv1"
    t = {f"{n}.lora_down.weight": torch.ones(4, 16, 1, 1), f"{n}.lora_up.weight": torch.ones(32, 4, 1, 1),
         f"{n}.lora_mid.weight": torch.ones(3, 4, 3, 3), f"{n}.alpha": torch.tensor(4, dtype=torch.int64)}
    o = "lora_unet_down_blocks_0_attentions_0_proj_out"
    t[f"{o}.oft_blocks"] = torch.ones(4, 4, 4)
    t[f"{o}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "bad.safetensors"
    save_file(t, str(path))
    a = load_adapter(path, tolerant=True)
    assert not a.problems  # diag-OFT reads (its merge: tests/test_lycoris_based.py)
    assert a.modules["unet.down_blocks.0.attentions.0.proj_out"].algorithm == "OFT"
    m = a.modules["unet.down_blocks.0.resnets.0.conv1"]
    assert m.alpha == 4.0  # an integer alpha (DyLoRA) reads
    (p,) = m.structure_problems()
    assert p.check == "LT106" and "Tucker core lora_mid has shape [3, 4, 3, 3], expected [4, 4, kh, kw]" in p.message


def test_convert_json_lists_each_conversion_with_its_error(nets, tmp_path, capsys):
    """convert --json carries what the text prints: each LyCORIS module made LoRA, its exact rank,
    the rank written and the error."""
    import json

    from loratool.cli import main

    src = nets["loha"][0]
    with pytest.raises(SystemExit) as e:
        main(["convert", str(src), "--to", "peft", "-o", str(tmp_path / "p"), "--rank", "2", "--json"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["conversions"] and all(c["algorithm"] == "LoHa" and c["rank"] <= 2 for c in out["conversions"])
    assert any(c["exact_rank"] > 2 and c["relative_error"] > 0 for c in out["conversions"])


def test_inspect_names_the_algorithm_per_module(nets):
    from loratool.inspection import inspect_path

    for case, algorithm in (("loha", "LoHa"), ("lokr_both", "LoKr"), ("locon_tucker", "LoCon+Tucker")):
        r = inspect_path(nets[case][0], modules=True)
        assert algorithm in r.algorithms, (case, r.algorithms)
        assert {m.algorithm for m in r.modules} <= {algorithm, "LoRA"}
        assert sum(r.algorithms.values()) == r.num_modules
