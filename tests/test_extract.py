"""`loratool extract` (issue 17): a LoRA adapter from a base and its fine-tune.

The round trip merges the fixtures' r=8 adapter into the tiny bf16 Llama with loratool's own
merge, extracts it again and compares every module with a dense float64 SVD of (merged − base);
synthetic pairs (numpy, safetensors) cover rank rules, layouts, refusals and the budget.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from loratool.adapter import float_values
from loratool.checkpoint import BaseCheckpoint
from loratool.errors import BaseMismatchError, UsageError
from loratool.extract import extract
from loratool.extract_ranks import Accuracy, ExtractRule, allocate, factors, range_finder
from loratool.formats import load_adapter
from loratool.kinds.layout import TRANSPOSED_LAYOUT


def _delta(merged: BaseCheckpoint, base: BaseCheckpoint, name: str) -> np.ndarray:
    return float_values(merged.ref(name)).astype(np.float64) - float_values(base.ref(name)).astype(np.float64)


def _module_delta(m) -> np.ndarray:
    """A module's delta in the base layout, from its factors (numpy, float64)."""
    B2, A2, scale = m.low_rank()
    d = B2.astype(np.float64) @ A2.astype(np.float64) * scale
    return d.T if m.kind in TRANSPOSED_LAYOUT else d.reshape(m.base_weight_shape)


def _optimal(D: np.ndarray, k: int) -> float:
    S = np.linalg.svd(D.reshape(D.shape[0], -1), compute_uv=False)
    return float(np.sqrt((S[k:] ** 2).sum() / (S ** 2).sum()))


def _digests(*dirs: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def round_trip(fixtures_dir, tmp_path_factory):
    """(base, merged, adapter, extracted output, report): llama_r8 merged into base_llama by
    loratool's merge (bf16, another shard layout), then extracted at rank 8."""
    from loratool.merge.api import merge

    tmp = tmp_path_factory.mktemp("extract")
    base, adapter = fixtures_dir / "base_llama", fixtures_dir / "llama_r8"
    merged = tmp / "merged"
    merge(base, str(adapter), merged, max_shard_size="100KB")
    before = _digests(base, merged)
    out = tmp / "out"
    report = extract(base, merged, out, ExtractRule(rank=8))
    assert _digests(base, merged) == before  # inputs never modified
    return base, merged, adapter, out, report


def test_round_trip_recovers_the_adapter_up_to_bf16_rounding(round_trip):
    base, merged, adapter, out, report = round_trip
    cb, cm = BaseCheckpoint(base), BaseCheckpoint(merged)
    original, extracted = load_adapter(adapter), load_adapter(out)
    assert set(extracted.modules) == set(original.modules) and len(original.modules) == 14
    rows = {m.name: m for m in report.modules}
    assert report.num_modules == 14 and report.num_dropped == 0 and report.num_unchanged == 2  # embed, lm_head
    for name, m in extracted.modules.items():
        assert m.rank == 8 and m.alpha == 8 and m.scale == 1.0
        D = _delta(cm, cb, name + ".weight")  # what the merge added, rounded to bf16
        true = _module_delta(original.modules[name])  # the adapter's own delta
        ours = _module_delta(m)
        err = np.linalg.norm(ours - D) / np.linalg.norm(D)
        opt = _optimal(D, 8)
        assert 0 < opt <= err <= opt + 1e-3 and err <= opt * (1 + 1e-3), (name, err, opt)
        # the rank-8 truncation takes away rounding noise: closer to the adapter than the merge is
        assert np.linalg.norm(ours - true) <= np.linalg.norm(D - true), name
        assert np.linalg.norm(ours - true) / np.linalg.norm(true) < 4e-3, name
        # the report's error is the written factors' (before their fp32 rounding), and its
        # optimal estimate is the dense SVD's
        assert rows[name].relative_error == pytest.approx(err, rel=1e-4)
        assert rows[name].optimal_error == pytest.approx(opt, rel=1e-3)


def test_round_trip_manifest_pins_base_and_names_tuned(round_trip):
    from loratool.fingerprint import fingerprint_base
    from loratool.manifest import check_base, load_manifest

    base, merged, _, out, _ = round_trip
    man = load_manifest(out)
    assert man.base.content == fingerprint_base(base).content
    (step,) = man.lineage
    assert [i.digest for i in step.inputs] == [fingerprint_base(base).content, fingerprint_base(merged).content]
    assert step.params["extracted_from"] == "merged" and step.params["rule"] == "rank 8"
    assert check_base(out, base).status == "match"
    with pytest.raises(BaseMismatchError):
        check_base(out, merged)


def test_round_trip_loads_in_peft(round_trip):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base, merged, _, out, report = round_trip
    cb, cm = BaseCheckpoint(base), BaseCheckpoint(merged)
    model = transformers.LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, str(out))
    errors = {m.name: m.relative_error for m in report.modules}
    seen = 0
    for name, layer in pm.named_modules():
        if isinstance(layer, LoraLayer):
            module = name.removeprefix("base_model.model.")
            D = _delta(cm, cb, module + ".weight")
            got = layer.get_delta_weight("default").double().numpy()
            assert np.linalg.norm(got - D) / np.linalg.norm(D) == pytest.approx(errors[module], rel=1e-4)
            seen += 1
    assert seen == 14


# -- synthetic pairs --------------------------------------------------------------------------------

def _save(d: Path, tensors: dict[str, np.ndarray], shards: int = 1, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
    else:
        wm = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(d / fname))
            wm.update({n: fname for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (d / "config.json").write_text(json.dumps(config or {"model_type": "llama", "vocab_size": 40,
                                                         "tie_word_embeddings": False}))
    return d


def _spectral(rng, d: int, n: int, s: np.ndarray) -> np.ndarray:
    U, _ = np.linalg.qr(rng.standard_normal((d, len(s))))
    V, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (U * s) @ V.T


@pytest.fixture
def pair(tmp_path):
    """BASE (one file) and TUNED (3 shards): three linear layers with different spectra, an
    embedding, a conv, a changed norm and an unchanged layer."""
    rng = np.random.default_rng(0)
    base = {"model.layers.0.q_proj.weight": rng.standard_normal((48, 40)),
            "model.layers.0.k_proj.weight": rng.standard_normal((40, 48)),
            "model.layers.0.o_proj.weight": rng.standard_normal((48, 48)),
            "model.layers.0.unchanged.weight": rng.standard_normal((16, 16)),
            "model.embed_tokens.weight": rng.standard_normal((40, 24)),
            "model.conv.weight": rng.standard_normal((8, 4, 3, 3)),
            "model.layers.0.q_proj.bias": np.zeros(48),
            "model.norm.weight": np.ones(24)}
    base = {k: v.astype(np.float32) for k, v in base.items()}
    deltas = {"model.layers.0.q_proj.weight": _spectral(rng, 48, 40, np.array([3.0, 2.0])),
              "model.layers.0.k_proj.weight": _spectral(rng, 40, 48, np.array([3.0, 2.5, 2.0, 1.5, 1.2, 1.0])),
              "model.layers.0.o_proj.weight": _spectral(rng, 48, 48, 0.6 ** np.arange(30)),
              "model.embed_tokens.weight": _spectral(rng, 40, 24, np.array([2.0, 1.0, 0.5])),
              "model.conv.weight": _spectral(rng, 8, 36, np.array([2.0, 1.0])).reshape(8, 4, 3, 3)}
    tuned = {k: (v + deltas.get(k, 0)).astype(np.float32) for k, v in base.items()}
    tuned["model.norm.weight"] = tuned["model.norm.weight"] * np.float32(1.01)
    tuned["model.layers.0.q_proj.bias"] = tuned["model.layers.0.q_proj.bias"] + np.float32(0.5)
    return _save(tmp_path / "base", base), _save(tmp_path / "tuned", tuned, shards=3), tmp_path


def test_rel_error_picks_each_module_its_smallest_rank(pair):
    base, tuned, tmp = pair
    report = extract(base, tuned, tmp / "out", ExtractRule(rel_error=0.05))
    cb, ct = BaseCheckpoint(base), BaseCheckpoint(tuned)
    ranks = {m.name: m.rank for m in report.modules}
    for m in report.modules:
        D = _delta(ct, cb, m.name + ".weight")
        S = np.linalg.svd(D.reshape(D.shape[0], -1), compute_uv=False)
        errs = np.sqrt(np.maximum(1 - np.cumsum(S ** 2) / (S ** 2).sum(), 0))
        assert m.rank == int(np.argmax(errs <= 0.05)) + 1, m.name
        assert m.relative_error <= 0.05
    assert ranks == {"model.conv": 2, "model.embed_tokens": 3, "model.layers.0.k_proj": 6, "model.layers.0.o_proj": 6,
                     "model.layers.0.q_proj": 2}
    # the written adapter has those ranks (rank_pattern/alpha_pattern), alpha = rank
    config = json.loads((tmp / "out" / "adapter_config.json").read_text())
    adapter = load_adapter(tmp / "out")
    assert {n: m.rank for n, m in adapter.modules.items()} == ranks
    assert all(m.alpha == m.rank for m in adapter.modules.values())
    assert config["rank_pattern"] and config["alpha_pattern"] == {k: v for k, v in config["rank_pattern"].items()}
    # layouts: the embedding's factors are PEFT's lora_embedding_A (k, num) / _B (dim, k)
    emb = adapter.modules["model.embed_tokens"]
    assert emb.kind.value == "embedding" and tuple(emb.lora_A.shape) == (3, 40) and tuple(emb.lora_B.shape) == (24, 3)
    D = _delta(ct, cb, "model.embed_tokens.weight")
    rows = {m.name: m for m in report.modules}
    assert np.linalg.norm(_module_delta(emb) - D) / np.linalg.norm(D) == pytest.approx(
        rows["model.embed_tokens"].relative_error, rel=1e-3, abs=1e-6)
    # the conv's: A (k, in, kh, kw), B (out, k, 1, 1); exact at its rank
    conv = adapter.modules["model.conv"]
    assert conv.kind.value == "conv2d" and tuple(conv.lora_A.shape) == (2, 4, 3, 3)
    assert tuple(conv.lora_B.shape) == (8, 2, 1, 1)
    D = _delta(ct, cb, "model.conv.weight")
    assert np.linalg.norm(_module_delta(conv) - D) / np.linalg.norm(D) < 1e-5
    # the changed norm and bias are reported, the unchanged layer counted
    dropped = {d.name: d for d in report.dropped}
    assert sorted(dropped) == ["model.layers.0.q_proj.bias", "model.norm.weight"]
    assert not any(d.saved for d in report.dropped)
    assert dropped["model.norm.weight"].relative_change == pytest.approx(0.01, rel=1e-4)
    assert report.num_unchanged == 1


def test_save_dropped_writes_modules_to_save(pair):
    base, tuned, tmp = pair
    report = extract(base, tuned, tmp / "out", ExtractRule(rank=2), save_dropped="modules_to_save")
    saved = {d.name: d.saved for d in report.dropped}
    # q_proj has LoRA factors: PEFT cannot also save it whole
    assert saved == {"model.layers.0.q_proj.bias": False, "model.norm.weight": True}
    config = json.loads((tmp / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm"]
    saved = load_adapter(tmp / "out").modules_to_save["model.norm.weight"]
    assert np.array_equal(float_values(saved), float_values(BaseCheckpoint(tuned).ref("model.norm.weight")))


def test_budget_spends_rank_where_error_drops_most(pair):
    base, tuned, tmp = pair
    budget = 10 * (48 + 40) * 4  # ten ranks of the 48×40 layers (fp32)
    report = extract(base, tuned, tmp / "out", ExtractRule(budget=budget), targets="q_proj,k_proj,o_proj")
    cost = {m.name: (m.shape[0] + m.shape[1]) * 4 for m in report.modules}
    assert sum(m.rank * cost[m.name] for m in report.modules) <= budget
    # the greedy optimum from the exact spectra
    cb, ct = BaseCheckpoint(base), BaseCheckpoint(tuned)
    names = sorted(cost)
    spectra = [np.linalg.svd(_delta(ct, cb, n + ".weight"), compute_uv=False) for n in names]
    want = allocate([cost[n] for n in names], spectra, [len(s) for s in spectra], budget)
    assert {m.name: m.rank for m in report.modules} == dict(zip(names, want))
    assert len(set(want)) > 1


def test_range_finder_is_near_optimal_on_a_slow_spectrum():
    rng = np.random.default_rng(3)
    s = 1 / np.sqrt(np.arange(1, 121))
    M = _spectral(rng, 200, 150, s).astype(np.float32)
    rule = ExtractRule(rank=10)
    sk, k = range_finder(M, lambda S, t: rule.choose(S, t, M.shape), 10, Accuracy(1e-3), np.random.default_rng(0))
    U, S, Vh = factors(sk, k)
    err = np.linalg.norm(M - (U * S) @ Vh) / np.linalg.norm(M)
    opt = np.sqrt((s[10:] ** 2).sum() / (s ** 2).sum())
    assert k == 10 and sk.passes > 3 and opt <= err <= opt * (1 + 2e-3)


@pytest.mark.parametrize("change,expected", [
    ("shape", "model.layers.0.q_proj.weight has shape [48, 40] in BASE, [48, 39] in TUNED"),
    ("missing", "tensor model.layers.0.unchanged.weight is in BASE but not in TUNED"),
    ("vocab", "vocabulary differs: model.embed_tokens.weight has 40 rows in BASE, 41 in TUNED"),
    ("dtype", "model.norm.weight is F32 in BASE, F16 in TUNED"),
    ("tied", "model.lm_head.weight is in TUNED only"),
])
def test_mismatches_are_refused_before_any_work(pair, change, expected):
    base, _, tmp = pair
    tensors = {n: float_values(r).copy() for n, r in BaseCheckpoint(base).items()}
    if change == "shape":
        tensors["model.layers.0.q_proj.weight"] = tensors["model.layers.0.q_proj.weight"][:, :39].copy()
    elif change == "missing":
        del tensors["model.layers.0.unchanged.weight"]
    elif change == "vocab":
        tensors["model.embed_tokens.weight"] = np.concatenate([tensors["model.embed_tokens.weight"],
                                                               np.zeros((1, 24), np.float32)])
    elif change == "dtype":
        tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float16)
    else:
        tensors["model.lm_head.weight"] = tensors["model.embed_tokens.weight"]
    bad = _save(tmp / f"bad_{change}", tensors)
    calls = []
    with pytest.raises(BaseMismatchError) as e:
        extract(base, bad, tmp / "out", ExtractRule(rank=2), progress=lambda n, t: calls.append(n))
    assert expected in e.value.message and "\n" not in e.value.message and e.value.exit_code == 3
    assert not calls and not (tmp / "out").exists()


def test_cli_refuses_in_one_line_and_never_imports_torch(pair, cli):
    base, tuned, tmp = pair
    bad = _save(tmp / "bad", {n: float_values(r).copy()[:1] for n, r in BaseCheckpoint(base).items()})
    p = cli("extract", "--base", base, "--tuned", bad, "-o", tmp / "x", "--rank", "2")
    assert p.returncode == 3 and len(p.stderr.strip().splitlines()) == 1 and "is not a fine-tune" in p.stderr
    p = cli("extract", "--base", base, "--tuned", tuned, "-o", tmp / "x", "--rank", "2", "--sv-cumulative", "0.9")
    assert p.returncode == 2 and "--sv-cumulative needs" in p.stderr
    # numpy only: a fresh interpreter runs the command and must not have imported torch
    run = ("import sys\nfrom loratool.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
           "    assert not e.code, f'exit {e.code}'\nif 'torch' in sys.modules:\n    sys.exit(9)\n")
    p = subprocess.run([sys.executable, "-c", run, "extract", "--base", str(base), "--tuned", str(tuned), "-o",
                        str(tmp / "cli"), "--energy", "0.99", "--json", "-q"], capture_output=True, text=True,
                       timeout=120, cwd=tmp)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout)
    assert report["num_modules"] == 5 and report["rule"] == "energy 0.99"
    assert all(m["energy_kept"] >= 0.99 for m in report["modules"])


def test_rule_options_are_checked_together():
    with pytest.raises(UsageError) as e:
        ExtractRule.from_options(rank=4, rel_error=2.0, min_rank=5, max_rank=3)
    msg = e.value.message
    assert "give one rank rule" in msg and "--rel-error must be in (0, 1)" in msg and "--min-rank 5" in msg
    # kohya's sv_fro F is the energy rule at F²
    fro, energy = ExtractRule.from_options(sv_fro=0.9), ExtractRule.from_options(energy=0.81)
    S = np.array([5.0, 3.0, 2.0, 1.0, 0.5])
    assert fro.describe() == "sv-fro 0.9" and fro.choose(S[:3], float((S ** 2).sum()), (10, 10)) == \
        energy.choose(S[:3], float((S ** 2).sum()), (10, 10)) == 2


def test_targets_are_peft_target_modules():
    from loratool.extract_pairs import _selector

    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"]
    assert [n for n in names if _selector("q_proj,up_proj")(n)] == [names[0], names[2]]  # names or dot-suffixes
    assert [n for n in names if _selector(r".*layers\.0\..*_proj")(n)] == names[:2]  # a regex: the whole name
    with pytest.raises(UsageError):
        _selector(" , ")


# -- the torch path (CUDA's, forced onto the CPU) -----------------------------------------------

def _compare_backends(a, b):
    """Same ranks and sketches, errors within 1e-6 relative. A delta of exactly that rank leaves an
    error of float32 rounding noise (< 1e-6), whose digits (and the passes the stopping rule spends
    on it) depend on the BLAS: there both errors must be noise."""
    assert [m.name for m in a.modules] == [m.name for m in b.modules]
    for x, y in zip(a.modules, b.modules):
        assert (x.rank, x.method, x.sketch_size) == (y.rank, y.method, y.sketch_size), x.name
        if x.relative_error < 1e-6:
            assert y.relative_error < 1e-6 and y.optimal_error < 1e-6, x.name
            continue
        assert x.num_passes == y.num_passes, x.name
        assert y.relative_error == pytest.approx(x.relative_error, rel=1e-6), x.name
        assert y.optimal_error == pytest.approx(x.optimal_error, rel=1e-6), x.name


def test_torch_path_matches_numpy_on_the_round_trip(round_trip):
    pytest.importorskip("torch")
    base, merged, _, out, report = round_trip
    t = extract(base, merged, out.parent / "torch", ExtractRule(rank=8), device="cpu-torch")
    assert report.device == "numpy on the CPU" and t.device == "torch on cpu"
    _compare_backends(report, t)
    a, b = load_adapter(out), load_adapter(out.parent / "torch")
    for name, m in a.modules.items():  # the same factors, up to float32 rounding of the products
        np.testing.assert_allclose(_module_delta(b.modules[name]), _module_delta(m), rtol=0, atol=1e-6 * np.abs(
            _module_delta(m)).max())


@pytest.mark.parametrize("rule", [ExtractRule(rel_error=0.05), ExtractRule(energy=0.999, max_rank=12),
                                  ExtractRule(budget=10 * (48 + 40) * 4)], ids=["rel_error", "energy", "budget"])
def test_torch_path_matches_numpy_on_every_rule(pair, rule):
    pytest.importorskip("torch")
    base, tuned, tmp = pair
    a = extract(base, tuned, tmp / "np", rule, device="cpu")
    b = extract(base, tuned, tmp / "torch", rule, device="cpu-torch")
    _compare_backends(a, b)
    assert {d.name for d in a.dropped} == {d.name for d in b.dropped}


def test_cuda_path_matches_numpy(pair):
    """Runs only where torch sees a GPU (skipped elsewhere): the same checks as on the CPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    base, tuned, tmp = pair
    a = extract(base, tuned, tmp / "np", ExtractRule(rel_error=0.05), device="cpu")
    b = extract(base, tuned, tmp / "cuda", ExtractRule(rel_error=0.05), device="auto")
    assert b.device == "torch on cuda"
    _compare_backends(a, b)


def test_range_finder_is_written_once_for_both_backends():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    M = _spectral(rng, 120, 90, 1 / np.sqrt(np.arange(1, 61))).astype(np.float32)
    rule = ExtractRule(rel_error=0.6)
    k_of = lambda S, t: rule.choose(S, t, M.shape)  # noqa: E731
    sa, ka = range_finder(M, k_of, 4, Accuracy(1e-3), np.random.default_rng(0))
    sb, kb = range_finder(torch.from_numpy(M), k_of, 4, Accuracy(1e-3), np.random.default_rng(0))
    assert isinstance(sb.left, torch.Tensor) and ka == kb and sa.passes == sb.passes > 2
    np.testing.assert_allclose(sb.S, sa.S, rtol=1e-5)
    (Ua, Sa, Va), (Ub, Sb, Vb) = factors(sa, ka), factors(sb, kb)
    assert isinstance(Ub, np.ndarray) and Ub.dtype == np.float64
    np.testing.assert_allclose((Ub * Sb) @ Vb, (Ua * Sa) @ Va, atol=1e-5)


def test_device_choices():
    from loratool.extract import _backend

    assert _backend("cpu") is None and _backend("cpu-torch") == "cpu"
    with pytest.raises(UsageError, match="--device must be one of auto, cpu, cuda"):
        _backend("tpu")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():  # refused in one line, never a test that needs a GPU
        with pytest.raises(UsageError, match="--device cuda: no CUDA device is available"):
            _backend("cuda")
        assert _backend("auto") is None


# -- lora_bias ----------------------------------------------------------------------------------

@pytest.fixture
def biased(tmp_path):
    """Two linear layers with biases (one changed by realistic amounts, one unchanged) and a
    bias-less one; TUNED changes every weight and q_proj's bias, plus k_proj's bias at one element
    no BASE + d reaches in float32 (1.0 → 2⁻³⁰)."""
    rng = np.random.default_rng(5)
    base = {"model.layers.0.q_proj.weight": rng.standard_normal((48, 40)),
            "model.layers.0.q_proj.bias": rng.standard_normal(48) * 0.1,
            "model.layers.0.k_proj.weight": rng.standard_normal((40, 48)),
            "model.layers.0.k_proj.bias": rng.standard_normal(40) * 0.1,
            "model.layers.0.o_proj.weight": rng.standard_normal((48, 48)),
            "model.norm.weight": np.ones(24)}
    base = {k: v.astype(np.float32) for k, v in base.items()}
    base["model.layers.0.k_proj.bias"][0] = 1.0
    tuned = {k: v.copy() for k, v in base.items()}
    for n, (d, k) in {"q_proj": (48, 40), "k_proj": (40, 48), "o_proj": (48, 48)}.items():
        tuned[f"model.layers.0.{n}.weight"] += _spectral(rng, d, k, np.array([2.0, 1.0])).astype(np.float32)
    qb = tuned["model.layers.0.q_proj.bias"]
    qb += (qb * rng.standard_normal(48) * 0.3).astype(np.float32)  # within a factor 2: exact differences
    qb[:4] = [0.25, -0.125, 0.0, 3.0]  # sign flips and a zero: still reachable
    tuned["model.layers.0.k_proj.bias"][0] = np.float32(2.0 ** -30)
    tuned["model.norm.weight"] *= np.float32(1.01)
    return _save(tmp_path / "base", base), _save(tmp_path / "tuned", tuned), tmp_path


def test_lora_bias_writes_tuned_minus_base_and_peft_merges_it_exactly(biased):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel

    base, tuned, tmp = biased
    report = extract(base, tuned, tmp / "out", ExtractRule(rank=2), save_dropped="lora_bias",
                     targets="q_proj,k_proj")
    assert {m.name: m.lora_bias for m in report.modules} == {"model.layers.0.k_proj": True,
                                                             "model.layers.0.q_proj": True}
    assert [d.name for d in report.dropped] == ["model.norm.weight"]
    assert report.warnings == ["model.layers.0.k_proj.bias: 1 element of TUNED's bias cannot be reached as BASE + "
                               "lora_B.bias in BASE's dtype (they changed by more than half their value); PEFT's "
                               "merge misses them by up to 9.31e-10"]
    config = json.loads((tmp / "out" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    cb, ct = BaseCheckpoint(base), BaseCheckpoint(tuned)
    adapter = load_adapter(tmp / "out")
    bq = float_values(adapter.modules["model.layers.0.q_proj"].lora_B_bias)
    assert bq.dtype == np.float32 and np.array_equal(
        bq, float_values(ct.ref("model.layers.0.q_proj.bias")) - float_values(cb.ref("model.layers.0.q_proj.bias")))

    layers = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(40, 48), "k_proj": torch.nn.Linear(48, 40),
                                  "o_proj": torch.nn.Linear(48, 48, bias=False)})
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([layers])
    model.load_state_dict({n: torch.from_numpy(float_values(cb.ref(n)).copy()) for n, _ in cb.items()
                           if n.startswith("model.layers.")}, strict=True)
    merged = PeftModel.from_pretrained(model, str(tmp / "out")).merge_and_unload()
    got = merged.model.layers[0]
    assert torch.equal(got.q_proj.bias.detach(), torch.from_numpy(float_values(ct.ref("model.layers.0.q_proj.bias")).copy()))
    kb, want = got.k_proj.bias.detach().numpy(), float_values(ct.ref("model.layers.0.k_proj.bias"))
    assert np.array_equal(kb[1:], want[1:]) and kb[0] != want[0] and abs(kb[0] - want[0]) <= 2.0 ** -30
    for n in ("q_proj", "k_proj"):  # and the weights are TUNED's up to the rank-2 factors' float32 rounding
        w = getattr(got, n).weight.detach().numpy()
        np.testing.assert_allclose(w, float_values(ct.ref(f"model.layers.0.{n}.weight")), atol=1e-5)


def test_lora_bias_refusals_and_the_bias_less_warning(pair):
    base, tuned, tmp = pair
    with pytest.raises(UsageError, match=r"PEFT cannot load lora_bias=True with an embedding module "
                                         r"\(model.embed_tokens\)"):
        extract(base, tuned, tmp / "out", ExtractRule(rank=2), save_dropped="lora_bias")
    # a format whose writer's check has no place for a lora_B bias is refused before any work (a
    # pipeline's components, as kohya needs them); kohya's check, as its Format will register it
    import dataclasses

    from loratool.extract import _check_bias_writable
    from loratool.formats import get_format
    from loratool.formats.kohya import check_writable

    kohya = dataclasses.replace(get_format("kohya"), check_writable=check_writable)
    with pytest.raises(UsageError, match="--save-dropped lora_bias: a kohya adapter has no place for a lora_B bias"):
        _check_bias_writable(kohya, tmp / "out", ("unet", "text_encoder"))
    _check_bias_writable(get_format("diffusers"), tmp / "out", ("unet", "text_encoder"))  # it has one
    with pytest.raises(UsageError, match="--save-dropped must be none, or one or more of"):
        extract(base, tuned, tmp / "out", ExtractRule(rank=2), save_dropped="none,lora_bias")
    assert not (tmp / "out").exists()
    report = extract(base, tuned, tmp / "out", ExtractRule(rank=2), targets="q_proj,k_proj",
                     save_dropped="modules_to_save,lora_bias")
    assert {m.name: m.lora_bias for m in report.modules} == {"model.layers.0.k_proj": False,
                                                             "model.layers.0.q_proj": True}
    assert {d.name: d.saved for d in report.dropped} == {"model.norm.weight": True}
    assert report.warnings == ["lora_bias=True applies to every module in PEFT: 1 modules have no bias in BASE (e.g. "
                               "model.layers.0.k_proj); PEFT loads them with a zero lora_B bias, but its "
                               "merge_and_unload refuses them (loratool merge does not)"]
    adapter = load_adapter(tmp / "out")
    assert np.array_equal(float_values(adapter.modules["model.layers.0.q_proj"].lora_B_bias), np.full(48, 0.5, np.float32))
    assert adapter.modules["model.layers.0.k_proj"].lora_B_bias is None and list(adapter.modules_to_save) == [
        "model.norm.weight"]
