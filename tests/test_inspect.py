import json

import pytest
import torch

from loratool.formats import load_adapter
from loratool.inspection import inspect_adapter, inspect_path


def test_summary_of_an_all_linear_adapter(fixtures_dir):
    r = inspect_path(fixtures_dir / "llama_r8")
    assert r.format == "peft"
    assert r.num_modules == 14  # 2 layers × 7 linear projections
    assert r.targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (r.rank, r.alpha, r.scale) == (8, 16.0, 2.0)
    assert r.base_model == "loratool-fixtures/tiny-llama"
    assert r.dtypes == {"F32": 28}
    assert not (r.use_dora or r.use_rslora or r.lora_bias)
    # parameters: r·(in + out) per module
    dims = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
            "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    assert r.num_params == 2 * sum(8 * (i + o) for i, o in dims.values())
    assert r.file_size == (fixtures_dir / "llama_r8" / "adapter_model.safetensors").stat().st_size + \
        (fixtures_dir / "llama_r8" / "adapter_config.json").stat().st_size
    assert r.modules is None


def test_patterns_flags_and_extras(fixtures_dir):
    r = inspect_path(fixtures_dir / "llama_rslora_patterns", modules=True)
    assert r.rank is None and r.rank_counts == {"2": 1, "4": 2, "8": 11}
    assert r.scale is None and r.use_rslora
    q0 = next(m for m in r.modules if m.name == "model.layers.0.self_attn.q_proj")
    assert q0.rank == 4 and q0.scale == pytest.approx(16 / 2)
    assert inspect_path(fixtures_dir / "llama_dora").use_dora
    assert inspect_path(fixtures_dir / "llama_bias").lora_bias
    e = inspect_path(fixtures_dir / "llama_embed_mts")
    assert e.kinds == {"embedding": 1, "linear": 2}
    assert e.modules_to_save == ["lm_head.weight"]
    assert inspect_path(fixtures_dir / "llama_r8_bf16").dtypes == {"BF16": 28}


def test_spectrum_equals_full_svd_of_the_delta(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "llama_rslora_patterns")
    r = inspect_adapter(adapter, spectrum=True)
    for m in r.modules:
        delta = adapter.modules[m.name].delta(torch.float64)
        full = torch.linalg.svdvals(delta)[: m.rank]
        torch.testing.assert_close(torch.tensor(m.spectrum.singular_values, dtype=torch.float64), full,
                                   rtol=1e-9, atol=1e-12)
        energy = full ** 2 / (full ** 2).sum()
        cum = torch.cumsum(energy, 0)
        assert m.spectrum.effective_rank_90 == int((cum < 0.9 - 1e-12).sum()) + 1
        assert m.spectrum.effective_rank_99 == int((cum < 0.99 - 1e-12).sum()) + 1
        assert m.spectrum.top_energy == pytest.approx(float(energy[0]))


def test_spectrum_of_a_zero_delta(fixtures_dir):
    r = inspect_path(fixtures_dir / "broken" / "zero_B", spectrum=True)
    s = r.modules[0].spectrum
    assert s.effective_rank_90 == 0 and s.top_energy == 0.0 and max(s.singular_values) == 0.0


def test_json_output(cli, fixtures_dir):
    p = cli("inspect", "--json", fixtures_dir / "gpt2_conv1d")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["num_modules"] == 8 and data["kinds"] == {"conv1d": 8}
    p = cli("inspect", "--spectrum", fixtures_dir / "llama_r8")
    assert p.returncode == 0 and "r90%" in p.stdout and "components holding 90%/99% of the energy" in p.stdout
