"""PEFT is the oracle: what loratool reads must mean what PEFT means, and what it writes must load
in PEFT and give the same outputs."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fixtures.generate import SEED, make_gpt2, make_llama
from loratool.adapter import LayerKind
from loratool.formats import detect_format, load_adapter, write_adapter

PEFT_FIXTURES = ["llama_r8", "llama_r8_bf16", "llama_dora", "llama_rslora_patterns", "llama_bias",
                 "llama_embed_mts", "gpt2_conv1d"]


def _model_for(name):
    return make_gpt2(SEED) if name.startswith("gpt2") else make_llama(SEED)


def _peft_model(name, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_model_for(name), str(path)).eval()


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("name", PEFT_FIXTURES)
def test_reader_agrees_with_peft(fixtures_dir, name):
    path = fixtures_dir / name
    assert detect_format(path) == "peft"
    adapter = load_adapter(path)
    layers = _lora_layers(_peft_model(name, path))
    assert set(adapter.modules) == set(layers)
    for mod_name, layer in layers.items():
        m = adapter.modules[mod_name]
        assert m.rank == layer.r["default"]
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        ours = m.delta(torch.float32)
        theirs = layer.get_delta_weight("default").float()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        if m.use_dora:
            mag = layer.lora_magnitude_vector["default"].weight.detach()
            assert torch.equal(m.magnitude.load().to(mag.dtype), mag)
    expected_kinds = {"gpt2_conv1d": LayerKind.CONV1D}
    if name in expected_kinds:
        assert {m.kind for m in adapter.modules.values()} == {expected_kinds[name]}
    if name == "llama_embed_mts":
        assert adapter.modules["model.embed_tokens"].kind is LayerKind.EMBEDDING
        assert list(adapter.modules_to_save) == ["lm_head.weight"]


def test_rank_and_alpha_patterns(fixtures_dir):
    a = load_adapter(fixtures_dir / "llama_rslora_patterns")
    m = a.modules
    assert m["model.layers.0.self_attn.q_proj"].rank == 4
    assert m["model.layers.1.mlp.down_proj"].rank == 2
    assert m["model.layers.0.mlp.down_proj"].rank == 8
    assert m["model.layers.1.self_attn.v_proj"].alpha == 3
    assert m["model.layers.0.mlp.up_proj"].alpha == 32
    assert m["model.layers.1.mlp.up_proj"].alpha == 16
    assert m["model.layers.0.self_attn.q_proj"].scale == pytest.approx(16 / 4 ** 0.5)


@pytest.mark.parametrize("name", PEFT_FIXTURES)
def test_round_trip_loads_in_peft_with_same_outputs(fixtures_dir, tmp_path, name):
    src = fixtures_dir / name
    out = tmp_path / "copy"
    write_adapter(load_adapter(src), out, "peft")
    # every tensor byte for byte, same keys
    a = load_file(str(src / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the config means the same to PEFT: same outputs
    x = torch.randint(0, 90, (2, 7))
    with torch.no_grad():
        y1 = _peft_model(name, src)(x).logits
        y2 = _peft_model(name, out)(x).logits
    assert torch.equal(y1, y2)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"


def test_written_patterns_reproduce_per_module_scales(fixtures_dir, tmp_path):
    """Changing per-module ranks/alphas must come out as rank_pattern/alpha_pattern that PEFT
    applies to exactly those modules."""
    adapter = load_adapter(fixtures_dir / "llama_r8")
    m = adapter.modules["model.layers.1.self_attn.k_proj"]
    m.alpha = 5.0
    m.lora_A = m.A()[:3].clone()
    m.lora_B = m.B()[:, :3].clone()
    out = write_adapter(adapter, tmp_path / "patched", "peft")
    layers = _lora_layers(_peft_model("llama_r8", out))
    for name, layer in layers.items():
        assert layer.r["default"] == adapter.modules[name].rank
        assert layer.scaling["default"] == pytest.approx(adapter.modules[name].scale)
