"""``merge --output-precision`` (issue 16): the merged weights of a 4-bit base written back in 4 bits.

The reference is bitsandbytes itself: the 4-bit tensors of the output are ``quantize_4bit`` of the
merged 16-bit values (the same merge written in 16 bits), byte for byte, serialised as
``QuantState.as_dict(packed=True)``; untouched 4-bit weights are the base's bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.errors import UsageError
from loratool.merge.api import _merge
from tests.tinybase import base_tensors, save_adapter, save_base

F = pytest.importorskip("bitsandbytes.functional")
from tests.bnbref import canonical, dequantize_4bit  # noqa: E402  (after the skip)

LAYERS = [f"model.layers.{i}." for i in range(2)]
MERGED = [p + m for p in LAYERS for m in ("self_attn.q_proj.weight", "self_attn.v_proj.weight")]  # the adapter's
QUANTIZED = MERGED + [p + "mlp.up_proj.weight" for p in LAYERS]  # held in 4 bits by the base


@pytest.fixture
def base(tmp_path):
    # up_proj (untouched, copied raw) is 25 x 16: 400 values, a short last block
    t = {k: (v * 0.05).to(torch.bfloat16) for k, v in base_tensors(inter=25).items()}
    return save_base(tmp_path / "base", t)


def _adapter(d, tiny: float = 1.0):
    d = save_adapter(d, r=4, alpha=8)
    if tiny != 1.0:
        t = load_file(str(d / "adapter_model.safetensors"))
        save_file({k: v * tiny if "lora_B" in k else v for k, v in t.items()}, str(d / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    return d


def _save_4bit(src, dst, quant_type="nf4", blocksize=64, double_quant=True):
    """The base as transformers saves a bitsandbytes 4-bit model (QuantState.as_dict(packed=True))."""
    dst.mkdir()
    out = {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if name not in QUANTIZED:
            out[name] = w
            continue
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
        out[name] = packed
        out.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type,
                                  "llm_int8_skip_modules": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _delta(adapter, name) -> torch.Tensor:
    a = load_file(str(adapter / "adapter_model.safetensors"))
    k = "base_model.model." + name[: -len(".weight")]
    return (a[k + ".lora_B.weight"].double() @ a[k + ".lora_A.weight"].double()) * 2.0


@pytest.mark.parametrize("output,quant_type,blocksize,double_quant", [
    ("nf4,double-quant", "nf4", 64, True),
    ("fp4,blocksize=128", "fp4", 128, False),
    ("stored", "nf4", 64, True),  # as the base holds each weight
])
def test_the_4bit_output_is_bitsandbytes_quantization_of_the_merge(tmp_path, base, monkeypatch, output, quant_type,
                                                                   blocksize, double_quant):
    from loratool.checkpoint import BaseCheckpoint
    from loratool.merge import basequant

    monkeypatch.setattr(basequant, "CHUNK_BYTES", 300)  # a few blocks a chunk: the tensors are streamed

    adapter = _adapter(tmp_path / "adapter")
    q4 = _save_4bit(base, tmp_path / "base4")
    _merge(q4, str(adapter), tmp_path / "out16", block_bytes=256)  # the merged 16-bit weights M
    res = _merge(q4, str(adapter), tmp_path / "out4", output_precision=output, block_bytes=256)
    m16 = load_file(str(tmp_path / "out16" / "model.safetensors"))
    got = load_file(str(tmp_path / "out4" / "model.safetensors"))
    src = load_file(str(q4 / "model.safetensors"))
    want_keys = set()
    for name in MERGED:
        packed, state = F.quantize_4bit(m16[name], blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
        want = {name: packed, **{f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}}
        want_keys |= set(want)
        for k, v in want.items():  # packed data, absmax, quant_map, nested state, the quant state's JSON
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
        # loratool reads the output back as dequant(quant(M)), bitsandbytes' bits
        ref = BaseCheckpoint(tmp_path / "out4").ref(name)
        back = torch.frombuffer(bytearray(ref.dequantized().tobytes()), dtype=torch.int16).reshape(ref.shape)
        want_back = dequantize_4bit(packed, state).view(torch.int16)
        assert torch.equal(canonical(back, quant_type), canonical(want_back, quant_type)), name
    for name in set(QUANTIZED) - set(MERGED):  # untouched 4-bit weights: the base's bytes, with their state
        for k in [k for k in src if k == name or k.startswith(name + ".")]:
            want_keys.add(k)
            assert torch.equal(got[k], src[k]), k
    for k in set(m16) - set(QUANTIZED):  # the 16-bit tensors: as in the 16-bit merge
        assert torch.equal(got[k], m16[k]), k
    assert set(got) == (set(m16) - set(QUANTIZED)) | want_keys

    assert res.output_precision == ("stored" if output == "stored" else output.replace("nf4,", "nf4,blocksize=64,"))
    assert [q.name for q in res.requantization] == [n for n in src if n in MERGED]
    for q in res.requantization:  # ‖M − dequant(quant(M))‖ / ‖ΔW‖
        packed, state = F.quantize_4bit(m16[q.name], blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
        err = torch.linalg.vector_norm(m16[q.name].double() - dequantize_4bit(packed, state).double()).item()
        dw = torch.linalg.vector_norm(_delta(adapter, q.name)).item()
        assert q.requant_norm == pytest.approx(err, rel=1e-12) and q.delta_norm == pytest.approx(dw, rel=1e-9)
        assert q.requant_over_delta == pytest.approx(err / dw, rel=1e-9) and q.warn == (err > dw)
        assert q.precision == f"{quant_type},blocksize={blocksize}" + (",double-quant" if double_quant else "")

    cfg = json.loads((tmp_path / "out4" / "config.json").read_text())["quantization_config"]
    assert cfg["load_in_4bit"] and cfg["quant_method"] == "bitsandbytes" and cfg["llm_int8_skip_modules"] == ["lm_head"]
    assert cfg["bnb_4bit_quant_type"] == quant_type and cfg["bnb_4bit_use_double_quant"] == double_quant
    transformers = pytest.importorskip("transformers")
    ref_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                              bnb_4bit_use_double_quant=double_quant,
                                              bnb_4bit_compute_dtype=torch.bfloat16,
                                              llm_int8_skip_modules=["lm_head"]).to_dict()
    assert {k: cfg[k] for k in ref_cfg} == ref_cfg
    lineage = json.dumps(json.loads((tmp_path / "out4" / "loratool.json").read_text()))
    assert "output_precision" in lineage and "requantization" in lineage


def test_a_tiny_delta_is_outweighed_by_the_requantization(tmp_path, base, cli):
    q4 = _save_4bit(base, tmp_path / "base4")
    tiny = _adapter(tmp_path / "a", tiny=1e-4)
    res = _merge(q4, str(tiny), tmp_path / "out", output_precision="nf4,double-quant")
    assert len(res.requantization) == 4
    assert all(q.warn and q.requant_over_delta > 1 and q.requant_norm > q.delta_norm for q in res.requantization)
    assert any("4 of 4 requantized tensors" in w and "exceeds the adapter's delta" in w for w in res.warnings)
    res = _merge(q4, str(_adapter(tmp_path / "b")), tmp_path / "out2", output_precision="stored")
    assert not any(q.warn for q in res.requantization) and not any("requantized" in w for w in res.warnings)
    r = cli("merge", "--base", q4, "--adapters", tiny, "-o", tmp_path / "out3", "--output-precision", "stored", "-q")
    assert r.returncode == 0, r.stderr
    assert "‖M − dq(q(M))‖" in r.stdout and "> ΔW" in r.stdout and "requantized tensors" in r.stderr


def test_output_precision_is_checked(tmp_path, base, cli):
    adapter = _adapter(tmp_path / "a")
    with pytest.raises(UsageError, match="not stored in 4 bits"):
        _merge(base, str(adapter), tmp_path / "o1", output_precision="nf4")
    q4 = _save_4bit(base, tmp_path / "base4")
    with pytest.raises(UsageError, match="--dtype"):
        _merge(q4, str(adapter), tmp_path / "o2", output_precision="nf4", dtype="float16")
    r = cli("merge", "--base", q4, "--adapters", adapter, "-o", tmp_path / "o3", "--output-precision", "int3")
    assert r.returncode == 2 and "--output-precision" in r.stderr and "Traceback" not in r.stderr
    # keep (the default): 16-bit, no quantization_config
    res = _merge(q4, str(adapter), tmp_path / "o4", output_precision="keep")
    assert res.output_precision == "keep" and not res.requantization
    assert "quantization_config" not in json.loads((tmp_path / "o4" / "config.json").read_text())


def test_sharded_and_single_file_outputs(tmp_path):
    """The index's weight map and total size name the quant-state tensors; a single-file base works too."""
    from loratool.safetensors_io import SafetensorsFile

    b = save_base(tmp_path / "base", {k: (v * 0.05).to(torch.bfloat16) for k, v in base_tensors(inter=25).items()},
                  shards=2)
    d4, wm, every = tmp_path / "base4", {}, {}
    d4.mkdir()
    for f in sorted(set(json.loads((b / "model.safetensors.index.json").read_text())["weight_map"].values())):
        out = {}
        for name, w in load_file(str(b / f)).items():
            if name in QUANTIZED:
                packed, state = F.quantize_4bit(w, compress_statistics=True)
                out[name] = packed
                out.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
            else:
                out[name] = w
        save_file(out, str(d4 / f), metadata={"format": "pt"})
        wm.update(dict.fromkeys(out, f))
        every.update(out)
    (d4 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    (d4 / "config.json").write_text((b / "config.json").read_text())
    adapter = _adapter(tmp_path / "a")
    res = _merge(d4, str(adapter), tmp_path / "out", output_precision="stored")
    assert len(res.requantization) == 4
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = {f: SafetensorsFile(tmp_path / "out" / f) for f in set(index["weight_map"].values())}
    assert index["weight_map"] == {k: f for f, st in files.items() for k in st.keys()}
    assert set(index["weight_map"]) == set(wm)  # the base's names: every 4-bit weight with its state
    assert index["metadata"]["total_size"] == sum(st.info(k).nbytes for st in files.values() for k in st.keys())

    save_file(every, str(tmp_path / "one4.safetensors"), metadata={"format": "pt"})
    _merge(tmp_path / "one4.safetensors", str(adapter), tmp_path / "one16.safetensors")
    _merge(tmp_path / "one4.safetensors", str(adapter), tmp_path / "one.safetensors", output_precision="stored")
    m16, got = load_file(str(tmp_path / "one16.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    for name in MERGED:
        packed, state = F.quantize_4bit(m16[name], compress_statistics=True)
        assert torch.equal(got[name], packed) and all(torch.equal(got[f"{name}.{k}"], v)
                                                      for k, v in state.as_dict(packed=True).items())
    assert set(got) == set(every)
