"""--base-precision on a GPT-2 base (Conv1D layers, (in, out) weights): transformers quantizes such
a layer as the Linear it stands for, its weight transposed first, so a QLoRA adapter of GPT-2 was
trained against dequant(quant(Wᵀ))ᵀ. The merge, its report and parity follow that (issue 16)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from loratool.errors import UsageError  # noqa: E402
from loratool.merge.api import _merge  # noqa: E402
from loratool.merge.parity import check_parity  # noqa: E402

# transformers, PEFT and bitsandbytes are imported by the tests, not at collection: importing
# triton (which they may) before tests/kernels sets TRITON_INTERPRET breaks those kernels' tests
# when both are collected in one run


@pytest.fixture
def F():
    return pytest.importorskip("bitsandbytes.functional")

CONV1D = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
          "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]


def _gpt2(tmp_path, n_embd=64):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.GPT2Config(n_embd=n_embd, n_layer=1, n_head=2, vocab_size=96, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
    base = tmp_path / "base"
    model.save_pretrained(base)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                      fan_in_fan_out=True, init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    return base, adapter


def _expected(F, base, adapter, spec_kw, name):
    """round(float32(dequant(quant(Wᵀ)))ᵀ + ΔW) with bitsandbytes' own quantization; ΔW in the base
    layout (PEFT's Conv1D delta, (B @ A)ᵀ · s)."""
    from tests.bnbref import dequantize_4bit

    w = load_file(str(base / "model.safetensors"))[name]
    packed, state = F.quantize_4bit(w.T.contiguous(), **spec_kw)
    deq = dequantize_4bit(packed, state).T
    a = load_file(str(adapter / "adapter_model.safetensors"))
    k = "base_model.model." + name[: -len(".weight")]
    delta = ((a[k + ".lora_B.weight"].float() @ a[k + ".lora_A.weight"].float()) * 2.0).T
    return (deq.float() + delta).to(torch.bfloat16)


@pytest.mark.parametrize("precision,spec_kw", [
    ("nf4", dict(blocksize=64, quant_type="nf4", compress_statistics=False)),
    ("nf4,double-quant", dict(blocksize=64, quant_type="nf4", compress_statistics=True)),
    ("fp4", dict(blocksize=64, quant_type="fp4", compress_statistics=False)),
])
def test_conv1d_weights_merge_onto_their_transposed_round_trip(tmp_path, F, precision, spec_kw):
    from tests.bnbref import dequantize_4bit

    base, adapter = _gpt2(tmp_path)
    kept = CONV1D  # inputs 64 and 256: whole blocks of 64
    res = _merge(base, [str(adapter)], tmp_path / "out", engine="torch", base_precision=precision, block_bytes=4096)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in kept:
        assert torch.equal(got[name].view(torch.int16), _expected(F, base, adapter, spec_kw, name).view(torch.int16)), name
    assert sorted(q.name for q in res.quantization) == sorted(kept)
    for q in res.quantization:  # ‖W − dequant(quant(Wᵀ))ᵀ‖
        w = load_file(str(base / "model.safetensors"))[q.name]
        packed, state = F.quantize_4bit(w.T.contiguous(), **spec_kw)
        err = torch.linalg.vector_norm(w.double() - dequantize_4bit(packed, state).T.double()).item()
        assert q.quant_norm == pytest.approx(err, rel=1e-5) and q.quant_norm > 0
    # the numpy engine takes the same base; parity checks against it, and the plain merge is elsewhere
    _merge(base, [str(adapter)], tmp_path / "auto", base_precision=precision)
    auto = load_file(str(tmp_path / "auto" / "model.safetensors"))
    for name in kept:
        assert torch.equal(auto[name].view(torch.int16), got[name].view(torch.int16)), name
    report = check_parity(base, tmp_path / "out", [str(adapter)])
    assert report.ok and report.base_precision == res.base_precision
    _merge(base, [str(adapter)], tmp_path / "plain", engine="torch")
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert not all(torch.equal(plain[n], got[n]) for n in kept)


def test_conv1d_inputs_not_whole_blocks_are_refused(tmp_path):
    base, adapter = _gpt2(tmp_path)
    with pytest.raises(UsageError, match="Conv1D weight .* not whole blocks of 128"):
        _merge(base, [str(adapter)], tmp_path / "out", base_precision="fp4,blocksize=128")


def test_a_gpt2_checkpoint_stored_in_4_bits_is_refused_in_one_line(tmp_path, cli):
    """transformers saves a GPT-2's Conv1D weights in 4 bits transposed, as (out, in) Linear
    weights; read as they are, the merge would write them transposed (and apply a square one's
    delta the wrong way round). Refused, naming the 16-bit route, until they are read back."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    base, adapter = _gpt2(tmp_path)
    q = transformers.GPT2LMHeadModel.from_pretrained(
        base, quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        dtype=torch.bfloat16, device_map="cpu")
    q.save_pretrained(tmp_path / "base4")
    r = cli("merge", "--base", tmp_path / "base4", "--adapters", adapter, "-o", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    assert "gpt2 checkpoint stored in 4 bits" in r.stderr and "--base-precision nf4,blocksize=64" in r.stderr
