"""LyCORIS kinds whose ΔW depends on the base weight (OFT, IA3, GLoRA; loratool/kinds/lycoris_based.py):
read from files lycoris-lora writes itself (fixtures/lycoris_nets.py ``BASED_CASES``), ΔW from the base
rows against lycoris's own ``get_diff_weight`` in float64, the merge within one rounding of
W + ΔW (OFT cut at its block boundaries), and the commands without a base refusing with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")

from fixtures import lycoris_nets as fx  # noqa: E402
from loratool.formats import load_adapter  # noqa: E402

SEED = 47
ALGORITHM = {"diag-oft": "OFT", "ia3": "IA3", "glora": "GLoRA"}


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """case -> (path of the file lycoris saved, the network (applied; float64 but for OFT), the model)."""
    d = tmp_path_factory.mktemp("lycoris_based")
    out = fx.write_networks(d, fx.BASED_CASES, SEED)
    for case, (_, net, model) in out.items():
        if fx.BASED_CASES[case][0] != "diag-oft":  # lycoris's Cayley transform mixes dtypes (``.float().inverse()``): float32 only
            net.to(torch.float64)
            model.to(torch.float64)
    out["_base"] = d / "base"
    return out


def _name(lora_name: str) -> str:
    from loratool.formats.kohya import module_name

    return module_name(lora_name)[0]


def _reference(lm) -> "torch.Tensor":
    """ΔW in float64 as lycoris applies it (its forward's delta is get_diff_weight for these kinds)."""
    with torch.no_grad():
        return lm.get_diff_weight()[0].reshape(lm.org_weight.shape).double()


def _rtol(case: str) -> float:
    # OFT: lycoris computes R in float32 only (it inverts I − Q with ``.float().inverse()``)
    return 2.0 ** -18 if case.startswith("diag_oft") else 1e-12


CASES = list(fx.BASED_CASES)


@pytest.mark.parametrize("case", CASES)
def test_delta_from_base_is_lycoris_diff_weight(nets, case):
    path, net, model = nets[case]
    adapter = load_adapter(path)
    assert not adapter.problems and len(adapter.modules) == len(fx.LAYERS)
    for lm in net.loras:
        m = adapter.modules[_name(lm.lora_name)]
        assert m.needs_base and m.algorithm == ALGORITHM[fx.BASED_CASES[case][0]]
        assert m.structure_problems() == []
        w = lm.org_weight.detach().double()
        assert m.fit(tuple(w.shape)).ok  # the dimensions the tensors do not say come from the base
        assert tuple(m.base_weight_shape) == tuple(w.shape)
        ref = _reference(lm).numpy()
        ours = m.delta_from_base(w.numpy(), 0, w.shape[0])
        assert ours.dtype == np.float64
        rtol = _rtol(case)
        np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()), err_msg=m.name)
        if m.row_quantum() > 1 or m.algorithm != "OFT":  # row blocks give the same rows
            q = m.row_quantum()
            half = (w.shape[0] // 2) // q * q
            part = m.delta_from_base(w.numpy()[half:], half, w.shape[0])
            np.testing.assert_array_equal(part, ours[half:])


@pytest.mark.parametrize("case", CASES)
def test_merge_is_within_one_rounding(nets, case, tmp_path):
    from loratool.checkpoint import BaseCheckpoint
    from loratool.merge.api import merge

    path, net, _ = nets[case]
    merge(nets["_base"], [str(path)], tmp_path / "out")
    out = BaseCheckpoint(tmp_path / "out")
    base = BaseCheckpoint(nets["_base"])
    for lm in net.loras:
        target = _name(lm.lora_name) + ".weight"
        w = base.read(target).double()
        d = _reference(lm).reshape(w.shape)
        v = w + d
        got = out.read(target).double()
        # one float32 rounding of the sum and one of the delta, plus the reference's own error
        tol = v.abs() * 2.0 ** -24 + 2 * 2.0 ** -24 * d.abs() + _rtol(case) * float(d.abs().max())
        assert bool(((got - v).abs() <= tol).all()), (target, float(((got - v).abs() - tol).max()))
        assert not torch.equal(got, w)  # the merge changed it


def test_oft_row_blocks_are_cut_at_block_boundaries(nets):
    """A merge's row spans of an OFT module start at multiples of its block size, even when the
    engine's block would not (R mixes the rows of a block)."""
    from loratool.merge.engines import tensor_spans
    from types import SimpleNamespace

    from loratool.merge.plan import Action, Term

    m = next(iter(load_adapter(nets["diag_oft"][0]).modules.values()))
    b = m.row_quantum()
    assert b == 4
    # the attributes of a TensorPlan that tensor_spans reads
    t = SimpleNamespace(shape=(4000, 64), numel=4000 * 64, action=Action.MERGE, kind=m.kind, dora=False,
                        transform=None, terms=[Term(m, 1.0, 1.0, "x")])
    spans = tensor_spans(t, block_bytes=37 * 64 * 4)  # 37 rows: rounded to 64 by the engine
    assert spans[0][0] == 0 and spans[-1][1] == 4000 and len(spans) > 10
    assert all(i % b == 0 and j % b == 0 for i, j in spans)


def test_validate_and_inspect_name_the_algorithm(nets):
    from loratool.inspection import inspect_path

    for case, (algo, _) in fx.BASED_CASES.items():
        r = inspect_path(nets[case][0], modules=True)
        assert r.algorithms == {ALGORITHM[algo]: len(fx.LAYERS)}, (case, r.algorithms)


def test_validate_passes(nets):
    from loratool.validation import validate

    for case in CASES:
        rep = validate(nets[case][0], base=nets["_base"])
        errors = [f for f in rep.findings if f.severity == "error"]
        assert not errors, (case, errors)


def test_convert_refuses_with_the_reason(nets, tmp_path, cli):
    r = cli("convert", nets["diag_oft"][0], "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "depends on the base weight" in lines[0] and "--base BASE" in lines[0], r.stderr
    assert "loratool merge" in lines[0] and lines[0].count("module ") == 1, r.stderr


def _converted(nets, case, tmp_path, **kw):
    """The case converted to kohya LoRA with ``convert(base=...)``: (result, adapter read back)."""
    from loratool.convert import convert

    res = convert(nets[case][0], "kohya", tmp_path / f"{case}.safetensors", base=nets["_base"], **kw)
    return res, load_adapter(res.output)


@pytest.mark.parametrize("case", CASES)
def test_convert_with_base_is_exact(nets, case, tmp_path):
    """convert --base: at the numerical rank the LoRA's delta is lycoris's get_diff_weight within
    float32 rounding of the factors (and the reference's own error, for OFT)."""
    path, net, _ = nets[case]
    res, out = _converted(nets, case, tmp_path)
    assert {c.algorithm for c in res.conversions} == {ALGORITHM[fx.BASED_CASES[case][0]]}
    assert len(res.conversions) == len(fx.LAYERS) == len(out.modules)
    for lm in net.loras:
        m = out.modules[_name(lm.lora_name)]
        assert m.module_kind == "lora" and m.scale == 1.0
        ref = _reference(lm)
        got = m.delta(torch.float64).reshape(ref.shape)
        b, a = (torch.from_numpy(x.astype(np.float64)) for x in m.factors_2d())
        # one float32 rounding of each factor: |ΔB||A| + |B||ΔA| ≤ 2·2⁻²⁴·|B||A|
        tol = 2.0 ** -22 * (b.abs() @ a.abs()).reshape(ref.shape) + _rtol(case) * float(ref.abs().max())
        assert bool(((got - ref).abs() <= tol).all()), (m.name, float(((got - ref).abs() - tol).max()))
        conv = next(c for c in res.conversions if c.module == m.name)
        assert conv.relative_error < 1e-12 and conv.rank == m.rank


@pytest.mark.parametrize("case", CASES)
def test_convert_with_base_at_lower_rank_is_optimal(nets, case, tmp_path):
    """At rank 2 each module's reported error, and the written LoRA's actual error, are the dense
    SVD's optimal truncation error of lycoris's ΔW, within 1e-6 relative."""
    path, net, _ = nets[case]
    res, out = _converted(nets, case, tmp_path, rank=2)
    for lm in net.loras:
        m = out.modules[_name(lm.lora_name)]
        ref = _reference(lm).reshape(lm.org_weight.shape[0], -1).numpy()
        S = np.linalg.svd(ref, compute_uv=False)
        best = float(np.sqrt((S[2:] ** 2).sum()))
        conv = next(c for c in res.conversions if c.module == m.name)
        assert conv.rank == m.rank == 2 and conv.exact_rank >= 2
        assert abs(conv.error - best) <= 1e-6 * best, (m.name, conv.error, best)
        actual = float(np.linalg.norm(m.delta(torch.float64).reshape(ref.shape).numpy() - ref))
        assert abs(actual - best) <= 1e-6 * best, (m.name, actual, best)


def test_convert_with_base_cli(nets, tmp_path, cli):
    r = cli("convert", nets["glora"][0], "--to", "peft", "-o", tmp_path / "p", "--base", nets["_base"],
            "--energy", "0.9", "--json")
    assert r.returncode == 0, r.stderr
    import json

    conv = json.loads(r.stdout)["conversions"]
    assert len(conv) == len(fx.LAYERS) and all(c["algorithm"] == "GLoRA" for c in conv)
    assert all(0 < c["relative_error"] ** 2 <= 0.1 + 1e-12 for c in conv)
    assert len(load_adapter(tmp_path / "p").modules) == len(fx.LAYERS)


def test_convert_with_a_base_that_lacks_the_tensor(nets, tmp_path, cli):
    from safetensors.torch import save_file

    model = fx.tiny_unet(SEED)
    sd = {f"unet.{k}": v.contiguous() for k, v in model.state_dict().items() if "to_q" not in k}
    (tmp_path / "b").mkdir()
    save_file(sd, str(tmp_path / "b" / "model.safetensors"))
    r = cli("convert", nets["ia3"][0], "--to", "kohya", "-o", tmp_path / "k.safetensors", "--base", tmp_path / "b")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "to_q" in lines[0] and "the base has no tensor" in lines[0], r.stderr


def test_bad_shapes_are_specific_findings(tmp_path):
    from safetensors.torch import save_file

    o = "lora_unet_down_blocks_0_attentions_0_proj_out"
    g = "lora_unet_down_blocks_0_attentions_0_proj_in"
    t = {f"{o}.oft_blocks": torch.ones(4, 4, 3), f"{o}.alpha": torch.tensor(0.0),
         f"{g}.a1.weight": torch.ones(64, 4), f"{g}.a2.weight": torch.ones(3, 64), f"{g}.b1.weight": torch.ones(64, 4),
         f"{g}.b2.weight": torch.ones(4, 64), f"{g}.alpha": torch.tensor(2.0)}
    path = tmp_path / "bad.safetensors"
    save_file(t, str(path))
    a = load_adapter(path, tolerant=True)
    msgs = {p.module: p.message for p in a.problems}
    assert "OFT oft_blocks has shape [4, 4, 3], expected [blocks, b, b]" in msgs[o]
    assert "GLoRA factors disagree on the rank" in msgs[g]


def test_parity_checks_base_dependent_merges(nets, tmp_path):
    """parity recomputes ΔW from the base rows for OFT, IA3 and GLoRA: a merge passes, and a
    merged tensor changed by a few ulps fails."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from loratool.merge import check_parity, merge

    for case in CASES:
        out = tmp_path / case
        merge(nets["_base"], str(nets[case][0]), out, device="cpu")
        report = check_parity(nets["_base"], out, [str(nets[case][0])])
        assert report.ok, (case, [lay for lay in report.layers if not lay.ok])
    f = next((tmp_path / case).glob("*.safetensors"))  # the last case's merge, its report's tensor
    tensors = load_file(f)
    name = next(lay.name for lay in report.layers if lay.action == "merge")
    tensors[name] = (tensors[name].astype(np.float64) * (1 + 1e-3)).astype(tensors[name].dtype)
    save_file(tensors, f)
    assert not check_parity(nets["_base"], tmp_path / case, [str(nets[case][0])]).ok
