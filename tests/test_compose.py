"""loratool.compose and `loratool compose`, with PEFT's add_weighted_adapter and merge_utils as
the oracle."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from loratool.cli import main
from loratool.compose import compose_adapters, compose_paths
from loratool.errors import InputError, UsageError
from loratool.formats import load_adapter
from loratool.compose_methods.delta import merge_deltas
from loratool.lowrank import RankRule
from loratool.safetensors_io import SafetensorsFile
from peft_oracle import load_peft, lora_modules, make_adapter, optimal, peft_deltas, rel

W = (0.7, -0.3)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two llama adapters with different ranks, alphas and targets (q,v / q,k,o)."""
    d = tmp_path_factory.mktemp("pair")
    a = make_adapter(d / "a", 1, r=8, alpha=16, targets=("q_proj", "v_proj"))
    b = make_adapter(d / "b", 2, r=4, alpha=4, targets=("q_proj", "k_proj", "o_proj"))
    return a, b


def weighted_sum(a, b, weights=W, model="llama", dtype=torch.float32):
    """Σ wᵢ·ΔWᵢ from PEFT's get_delta_weight, over the union of targets."""
    pm = load_peft(a, model, dtype=dtype, extra={"b": b})
    da, db = peft_deltas(pm), peft_deltas(pm, "b")
    out = {}
    for name in set(da) | set(db):
        out[name] = sum(w * d[name] for w, d in zip(weights, (da, db)) if name in d)
    return out


def test_cat_equals_peft_cat(pair, tmp_path):
    a, b = pair
    report = compose_paths([(str(a), W[0]), (str(b), W[1])], tmp_path / "cat", method="cat")
    pm = load_peft(a, extra={"b": b})
    pm.add_weighted_adapter(["default", "b"], list(W), "cat", combination_type="cat")
    expected = peft_deltas(pm, "cat")
    got = peft_deltas(load_peft(tmp_path / "cat"))
    assert set(got) == set(expected)
    for name in expected:
        assert rel(got[name], expected[name]) < 1e-6, name
    ranks = {m.name.split(".")[-1]: m.new_rank for m in report.modules}
    assert ranks == {"q_proj": 12, "v_proj": 8, "k_proj": 4, "o_proj": 4}
    assert report.max_relative_error == 0.0


def test_linear_is_the_exact_weighted_sum_in_float64(pair):
    a, b = pair
    out, report = compose_adapters([load_adapter(a), load_adapter(b)], W, "linear", RankRule(rank=12),
                                   dtype=torch.float64)
    expected = weighted_sum(a, b, dtype=torch.float64)
    assert set(out.modules) == set(expected)
    for name, m in out.modules.items():
        assert m.scale == 1.0 and m.alpha == m.rank
        assert rel(m.delta(torch.float64), expected[name]) < 1e-12, name
    assert report.max_relative_error < 1e-12
    # v/k/o_proj have Σrᵢ < 12: kept whole, and said so
    assert len(report.warnings) == 1 and "6 of 8 modules" in report.warnings[0]


@pytest.mark.parametrize("model,targets", [("llama", ("q_proj", "v_proj")), ("kinds", ("lin", "conv", "emb"))])
def test_linear_truncation_is_optimal_and_loads_in_peft(tmp_path, model, targets):
    a = make_adapter(tmp_path / "a", 3, model=model, r=8, alpha=16, targets=targets)
    b = make_adapter(tmp_path / "b", 4, model=model, r=8, alpha=8, targets=targets, use_rslora=True)
    report = compose_paths([(str(a), W[0]), (str(b), W[1])], tmp_path / "lin")  # default: rank 8
    got_pm = load_peft(tmp_path / "lin", model)
    got = peft_deltas(got_pm)
    expected = weighted_sum(a, b, model=model)
    rows = {m.name: m for m in report.modules}
    pm = load_peft(a, model, extra={"b": b})
    if model == "llama":
        pm.add_weighted_adapter(["default", "b"], list(W), "svd", combination_type="svd", svd_rank=8)
        pm.add_weighted_adapter(["default", "b"], list(W), "plinear", combination_type="linear")
        peft_svd, peft_linear = peft_deltas(pm, "svd"), peft_deltas(pm, "plinear")
    for name, M in expected.items():
        best, err = optimal(M, 8)
        assert rows[name].new_rank == 8 and rows[name].input_ranks == [8, 8]
        assert rows[name].relative_error == pytest.approx(err, rel=1e-6)
        assert rel(got[name], best) < 2e-6, name
        assert rel(got[name], M) == pytest.approx(err, rel=1e-5)
        if model == "llama":
            assert rel(got[name], peft_svd[name]) < 1e-4, name  # what PEFT's dense SVD finds
            assert rel(peft_linear[name], M) > 0.1  # PEFT's "linear" is not the weighted sum (#3004)
    for mod in lora_modules(got_pm).values():
        assert mod.scaling["default"] == 1.0


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_delta_methods_match_peft_svd_variants(tmp_path, method):
    a = make_adapter(tmp_path / "a", 5, r=8, alpha=16, targets=("q_proj", "o_proj"))
    b = make_adapter(tmp_path / "b", 6, r=8, alpha=8, targets=("q_proj", "o_proj"))
    adapters = [load_adapter(a), load_adapter(b)]
    pm = load_peft(a, extra={"b": b})
    pm.add_weighted_adapter(["default", "b"], list(W), "full", combination_type=method + "_svd", svd_rank=64,
                            density=0.4)
    # full rank (64 = min(d, k)): the truncation is exact, so the merge itself is compared
    full, _ = compose_adapters(adapters, W, method, RankRule(rank=64), density=0.4)
    for name, expected in peft_deltas(pm, "full").items():
        assert rel(full.modules[name].delta(), expected) < 1e-5, name
    # rank 8: a randomized SVD of the merged delta, near the optimal truncation of it
    out, report = compose_adapters(adapters, W, method, RankRule(rank=8), density=0.4)
    da, db = peft_deltas(pm), peft_deltas(pm, "b")
    for row in report.modules:
        M = merge_deltas([da[row.name], db[row.name]], W, method, 0.4)
        best, err = optimal(M, 8)
        got = rel(out.modules[row.name].delta(), M)
        assert row.relative_error == pytest.approx(got, rel=1e-4)
        assert err - 1e-6 <= got <= err * 1.01, row.name


def test_dare_is_seeded_and_reproducible(pair, tmp_path):
    a, b = pair
    specs = [(str(a), W[0]), (str(b), W[1])]
    for name, seed in (("s1", 1), ("s1bis", 1), ("s2", 2)):
        compose_paths(specs, tmp_path / name, method="dare_ties", density=0.5, seed=seed)
    files = {n: SafetensorsFile(tmp_path / n / "adapter_model.safetensors") for n in ("s1", "s1bis", "s2")}
    keys = files["s1"].keys()
    assert all(files["s1"].read_bytes(k) == files["s1bis"].read_bytes(k) for k in keys)
    assert any(files["s1"].read_bytes(k) != files["s2"].read_bytes(k) for k in keys)
    # density 1 prunes nothing: dare_linear is then the weighted sum, truncated like linear
    dl, _ = compose_adapters([load_adapter(a), load_adapter(b)], W, "dare_linear", RankRule(rank=12), density=1.0)
    expected = weighted_sum(a, b)
    for name, m in dl.modules.items():
        assert rel(m.delta(), expected[name]) < 1e-5, name


@pytest.mark.filterwarnings("ignore:.*invalid shape")  # PEFT's own warning on saving lora_B.bias
def test_lora_bias_is_summed_exactly(tmp_path):
    a = make_adapter(tmp_path / "a", 7, model="kinds", r=4, alpha=8, targets=("lin",), lora_bias=True)
    b = make_adapter(tmp_path / "b", 8, model="kinds", r=2, alpha=2, targets=("lin", "conv"))
    compose_paths([(str(a), W[0]), (str(b), W[1])], tmp_path / "out", method="cat")
    src = lora_modules(load_peft(a, "kinds"))["lin"]
    out = lora_modules(load_peft(tmp_path / "out", "kinds"))
    want = W[0] * src.lora_B["default"].bias * src.scaling["default"]
    torch.testing.assert_close(out["lin"].lora_B["default"].bias * out["lin"].scaling["default"], want,
                               rtol=1e-6, atol=1e-7)
    assert not out["conv"].lora_B["default"].bias.any()  # no input has one: zero, not random


def test_refusals(pair, tmp_path):
    a, b = pair
    dora = make_adapter(tmp_path / "dora", 9, r=4, targets=("q_proj",), use_dora=True)
    mts = make_adapter(tmp_path / "mts", 10, r=4, targets=("q_proj",), modules_to_save=["lm_head"])
    A, B = load_adapter(a), load_adapter(b)
    with pytest.raises(InputError, match="is a DoRA adapter"):
        compose_adapters([A, load_adapter(dora)], W)
    with pytest.raises(InputError, match="modules_to_save differ"):
        compose_adapters([A, load_adapter(mts)], W)
    name = "model.layers.0.self_attn.q_proj"
    wrong = dataclasses.replace(B, modules={**B.modules, name: dataclasses.replace(
        B.modules[name], lora_B=torch.zeros(48, 4))})
    with pytest.raises(InputError, match="different models"):
        compose_adapters([A, wrong], W)
    with pytest.raises(UsageError, match="keeps every component"):
        compose_adapters([A, B], W, "cat", RankRule(rank=4))
    with pytest.raises(UsageError, match="needs --density"):
        compose_adapters([A, B], W, "ties")
    with pytest.raises(UsageError, match="takes --rank only"):
        compose_adapters([A, B], W, "ties", RankRule(energy=0.9), density=0.5)


def test_cli_compose(pair, tmp_path, capsys):
    a, b = pair
    with pytest.raises(SystemExit) as e:
        main(["compose", "--adapters", f"{a}:0.7,{b}:0.3", "-o", str(tmp_path / "out"), "--energy", "0.95",
              "--max-rank", "6", "--json"])
    assert e.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "linear" and [i["weight"] for i in report["inputs"]] == [0.7, 0.3]
    assert all(m["new_rank"] <= 6 for m in report["modules"])
    load_peft(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        main(["compose", "--adapters", f"{a},{tmp_path / 'missing'}:0.5", "-o", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "missing" in err


def test_kohya_inputs_give_a_kohya_output(tmp_path):
    from peft_oracle import kohya_file

    a = kohya_file(tmp_path / "a.safetensors", 1, rank=4, alpha=4.0)
    b = kohya_file(tmp_path / "b.safetensors", 2, rank=8, alpha=2.0)
    report = compose_paths([(str(a), W[0]), (str(b), W[1])], tmp_path / "out.safetensors", rule=RankRule(rank=12))
    out, A, B = (load_adapter(p) for p in (tmp_path / "out.safetensors", a, b))
    assert report.format == out.format == "kohya"
    for name, m in out.modules.items():
        M = W[0] * A.modules[name].delta(torch.float64) + W[1] * B.modules[name].delta(torch.float64)
        assert m.rank == 12 and m.alpha == 12 and m.dtypes() == {"F16"}
        assert rel(m.delta(torch.float64), M) < 2e-3, name  # exact up to float16 factors


# -- adapters of different models (issue 13) ------------------------------------------------------

def _renamed(src, dst, **fields):
    """A copy of the PEFT adapter ``src`` whose adapter_config.json says ``fields``."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(fields)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("fa,fb,what", [
    ({"base_model_name_or_path": "google/gemma-3-270m-it"}, {"base_model_name_or_path": "bigscience/bloom-560m"},
     "base 'google/gemma-3-270m-it' vs 'bigscience/bloom-560m'"),
    ({"base_model_name_or_path": "distilbert/distilgpt2"}, {"base_model_name_or_path": "openai-community/gpt2"},
     "base 'distilbert/distilgpt2' vs 'openai-community/gpt2'"),
    ({"task_type": "CAUSAL_LM"}, {"task_type": "SEQ_CLS"}, "task type CAUSAL_LM vs SEQ_CLS"),
])
def test_adapters_of_different_models_are_refused(pair, tmp_path, capsys, fa, fb, what):
    a = _renamed(pair[0], tmp_path / "a", **fa)
    b = _renamed(pair[1], tmp_path / "b", **fb)
    with pytest.raises(SystemExit) as e:
        main(["compose", "--adapters", f"{a},{b}", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert f"{a} and {b} are for different models: {what}" in err and "--allow-different-bases" in err
    assert not (tmp_path / "out").exists()
    # the override composes them, and the output's lineage says what was overridden
    with pytest.raises(SystemExit) as e:
        main(["compose", "--adapters", f"{a},{b}", "-o", str(tmp_path / "out"), "--allow-different-bases", "--json"])
    assert e.value.code == 0
    captured = capsys.readouterr()
    assert what in captured.err and "--allow-different-bases" in captured.err
    from loratool.manifest import load_manifest

    step = load_manifest(tmp_path / "out").lineage[-1]
    assert step.operation == "composed" and what in step.base_mismatch
    assert step.params["allow_different_bases"] is True


def test_one_base_under_two_names_composes(pair, tmp_path):
    a = _renamed(pair[0], tmp_path / "a", base_model_name_or_path="/models/Llama-3.2-1B/", task_type="causal_lm")
    b = _renamed(pair[1], tmp_path / "b", base_model_name_or_path="meta-llama/Llama-3.2-1B", task_type="CAUSAL_LM")
    c = _renamed(pair[1], tmp_path / "c", base_model_name_or_path=None, task_type=None)  # records nothing
    out, report = compose_adapters([load_adapter(p) for p in (a, b, c)], (1.0, 1.0, 1.0))
    assert out.base_model == "/models/Llama-3.2-1B/" and not any("different" in w for w in report.warnings)


def test_manifests_recording_different_bases_are_refused(fixtures_dir, tmp_path):
    import shutil

    from loratool.manifest import record_manifest

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(fixtures_dir / "llama_r8", a)
    shutil.copytree(fixtures_dir / "llama_r8", b)
    record_manifest(a, base=fixtures_dir / "base_llama")
    record_manifest(b, base=fixtures_dir / "base_llama_other")  # same shapes, other weights
    with pytest.raises(InputError, match="their manifests record different bases"):
        compose_adapters([load_adapter(a), load_adapter(b)], W)
    record_manifest(b, base=fixtures_dir / "base_llama")
    compose_adapters([load_adapter(a), load_adapter(b)], W)


def test_cli_compose_sv_fro_keeps_the_smallest_rank_holding_that_norm(pair, tmp_path, capsys):
    """--sv-fro (kohya's sv_fro) on compose as on resize: per module, the smallest k with
    sqrt(Σₖσ²/Σσ²) ≥ F, from the exact sum's singular values."""
    import numpy as np

    a, b = pair
    with pytest.raises(SystemExit) as e:
        main(["compose", "--adapters", f"{a}:0.7,{b}:0.3", "-o", str(tmp_path / "out"), "--sv-fro", "0.9", "--json"])
    assert e.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert "sv_fro" in report["rule"] or "fro" in report["rule"].lower()
    exact, _ = compose_adapters([load_adapter(a), load_adapter(b)], W, "cat", None)
    for m in report["modules"]:
        s = np.linalg.svd(exact.modules[m["name"]].delta(torch.float64).reshape(
            exact.modules[m["name"]].delta(torch.float64).shape[0], -1).numpy(), compute_uv=False)
        share = np.sqrt(np.cumsum(s**2) / np.sum(s**2))
        assert m["new_rank"] == int(np.searchsorted(share, 0.9 - 1e-12) + 1), m
