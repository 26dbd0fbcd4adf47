"""``merge --base-precision`` and bitsandbytes 4-bit bases (issue 16): every merged element is
round(dequant(quant(W)) + ΔW), computed here independently with bitsandbytes itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.merge.api import _merge
from tests.tinybase import base_tensors, save_adapter, save_base

F = pytest.importorskip("bitsandbytes.functional")
from tests.bnbref import canonical, dequantize_4bit  # noqa: E402  (after the skip)

TARGETS = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]


@pytest.fixture
def base(tmp_path):
    t = {k: (v * 0.05).to(torch.bfloat16) for k, v in base_tensors().items()}
    return save_base(tmp_path / "base", t)


def _adapter(tmp_path, tiny: float = 1.0):
    d = save_adapter(tmp_path / "adapter", r=4, alpha=8)
    if tiny != 1.0:
        t = load_file(str(d / "adapter_model.safetensors"))
        t = {k: v * tiny if "lora_B" in k else v for k, v in t.items()}
        save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


def _expected(base_dir, adapter_dir, quant_type, blocksize, double_quant) -> dict[str, torch.Tensor]:
    """round(float32(dequant(quant(W))) + (B @ A)·s) with bitsandbytes' own quantization."""
    w = load_file(str(base_dir / "model.safetensors"))
    a = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for name in TARGETS:
        packed, state = F.quantize_4bit(w[name], blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
        deq = dequantize_4bit(packed, state)
        k = "base_model.model." + name[: -len(".weight")]
        delta = (a[k + ".lora_B.weight"] @ a[k + ".lora_A.weight"]) * 2.0
        out[name] = (deq.float() + delta).to(torch.bfloat16)
    return out


@pytest.mark.parametrize("engine", ["auto", "torch"])
@pytest.mark.parametrize("quant_type,blocksize,double_quant", [("nf4", 64, True), ("fp4", 128, False)])
def test_merge_onto_dequant_quant_is_exact(tmp_path, base, engine, quant_type, blocksize, double_quant):
    adapter = _adapter(tmp_path)
    spec = f"{quant_type},blocksize={blocksize}" + (",double-quant" if double_quant else "")
    res = _merge(base, str(adapter), tmp_path / "out", engine=engine, base_precision=spec, block_bytes=1024)
    assert res.base_precision == spec
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = _expected(base, adapter, quant_type, blocksize, double_quant)
    for name, w in want.items():
        assert torch.equal(got[name].view(torch.int16), w.view(torch.int16)), name
    src = load_file(str(base / "model.safetensors"))
    for name in set(src) - set(want):  # untouched tensors: the base's bytes
        assert torch.equal(got[name].view(torch.int16), src[name].view(torch.int16))
    assert [q.name for q in res.quantization] == TARGETS
    lineage = json.loads((tmp_path / "out" / "loratool.json").read_text())
    assert spec in json.dumps(lineage)


def _save_4bit(src_dir, dst_dir, quant_type="nf4", blocksize=64, double_quant=True):
    """A checkpoint as transformers saves a bitsandbytes 4-bit model: the targeted Linear weights
    packed, with their quant state (QuantState.as_dict(packed=True)); the rest in bf16."""
    dst_dir.mkdir()
    t = load_file(str(src_dir / "model.safetensors"))
    out = {}
    for name, w in t.items():
        if name not in TARGETS:
            out[name] = w
            continue
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
        out[name] = packed
        for k, v in state.as_dict(packed=True).items():
            out[f"{name}.{k}"] = v
    save_file(out, str(dst_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src_dir / "config.json").read_text())
    cfg["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type}
    (dst_dir / "config.json").write_text(json.dumps(cfg))
    return dst_dir


def test_a_4bit_checkpoint_merges_like_base_precision_over_its_source(tmp_path, base):
    adapter = _adapter(tmp_path)
    q4 = _save_4bit(base, tmp_path / "base4")
    res = _merge(q4, str(adapter), tmp_path / "from4", base_precision="keep")
    assert res.base_precision == "stored:nf4,blocksize=64,double-quant"
    _merge(base, str(adapter), tmp_path / "from16", base_precision="nf4,double-quant")
    a = load_file(str(tmp_path / "from4" / "model.safetensors"))
    b = load_file(str(tmp_path / "from16" / "model.safetensors"))
    assert sorted(a) == sorted(b)  # 16-bit weights, no quant state left
    for name in b:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name
    assert "quantization_config" not in json.loads((tmp_path / "from4" / "config.json").read_text())
    # parity reads the 4-bit base as the merge did (it stopped with a traceback before)
    from loratool.merge.parity import check_parity

    report = check_parity(q4, tmp_path / "from4", [str(adapter)])
    assert report.ok and len(report.layers) == len(TARGETS) and not report.untouched_mismatched
    # extract reads the 4-bit base as its 16-bit weights too: merged − base is the adapter's delta
    # (up to the bf16 rounding of the merged weights), the other weights give nothing to extract
    from loratool.extract import extract
    from loratool.extract_ranks import ExtractRule
    from loratool.formats import load_adapter

    extract(q4, tmp_path / "from4", tmp_path / "x", ExtractRule(rank=4), dtype="fp32")
    got, want = load_adapter(tmp_path / "x"), load_adapter(adapter)
    for name in TARGETS:
        module = name[:-len(".weight")]
        d = want.modules[module].delta(torch.float64)
        x = got.modules[module].delta(torch.float64)
        assert float((x - d).norm() / d.norm()) < 2e-2, name


def test_a_4bit_checkpoint_reads_as_bitsandbytes_dequantizes_it(tmp_path, base):
    from loratool.checkpoint import BaseCheckpoint

    q4 = _save_4bit(base, tmp_path / "base4", quant_type="fp4", blocksize=128, double_quant=False)
    ck = BaseCheckpoint(q4)
    assert sorted(ck.quantized) == sorted(TARGETS)
    assert not [n for n in ck.names() if "absmax" in n or "quant_" in n]
    stored = load_file(str(q4 / "model.safetensors"))
    for name in TARGETS:
        from bitsandbytes.functional import QuantState

        state = QuantState.from_dict({k[len(name) + 1:]: v for k, v in stored.items() if k.startswith(name + ".")},
                                     device=torch.device("cpu"))
        want = dequantize_4bit(stored[name], state)
        assert ck.dtype(name) == "BF16" and ck.shape(name) == tuple(want.shape)
        assert torch.equal(canonical(ck.read(name).view(torch.int16), "fp4"), canonical(want.view(torch.int16), "fp4"))
        rows = want.shape[0]  # any row range, blocks of 128 elements cut or not
        for i, j in ((0, rows), (1, 2), (3, rows - 1), (rows - 1, rows)):
            got = torch.from_numpy(ck.ref(name).rows(i, j).copy().view("<i2"))
            assert torch.equal(canonical(got, "fp4"), canonical(want[i:j].view(torch.int16), "fp4")), (name, i, j)


def test_a_tiny_delta_is_outweighed_by_the_quantization_term(tmp_path, base, cli):
    adapter = _adapter(tmp_path, tiny=1e-4)
    r = cli("merge", "--base", base, "--adapters", adapter, "-o", tmp_path / "out", "--base-precision",
            "nf4", "-q", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["base_precision"] == "nf4,blocksize=64"
    assert len(res["quantization"]) == 4 and all(q["warn"] for q in res["quantization"])
    for q in res["quantization"]:
        assert q["quant_over_delta"] > 1 and q["quant_norm"] > q["delta_norm"]
        assert q["relative_change"] == pytest.approx(q["quant_norm"] / q["base_norm"])
    assert "exceeds the adapter's delta" in r.stderr
    # a normal adapter: no warning, and the ratios are below one
    r = cli("merge", "--base", base, "--adapters", _adapter(tmp_path / "x"), "-o", tmp_path / "out2",
            "--base-precision", "nf4", "-q")
    assert r.returncode == 0, r.stderr
    assert "q > ΔW" not in r.stdout and "exceeds" not in r.stderr and "‖q‖/‖ΔW‖" in r.stdout


def test_base_precision_is_checked(tmp_path, base, cli):
    r = cli("merge", "--base", base, "--adapters", _adapter(tmp_path), "-o", tmp_path / "out",
            "--base-precision", "nf4,blocksize=100")
    assert r.returncode == 2 and "blocksize" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streamed_absmax_is_the_whole_tensors(tmp_path, monkeypatch, dtype, native):
    """Double quantization's absmax pass, over the mapped tensor in C or read a chunk at a time in
    numpy (here 3 blocks of 64, a short last block): the same vector as from the whole tensor at
    once."""
    monkeypatch.setenv("LORATOOL_NATIVE", native)
    import numpy as np

    from loratool.merge import basequant
    from loratool.quant import bnb
    from loratool.safetensors_io import SafetensorsFile

    w = (torch.randn(37, 51, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    save_file({"w": w}, str(tmp_path / "t.safetensors"))
    ref = SafetensorsFile(tmp_path / "t.safetensors").ref("w")
    monkeypatch.setattr(basequant, "CHUNK_BYTES", 3 * 64 * 2)
    got = basequant.streamed_absmax(ref, 64)
    x = bnb.from_dtype_bits(w.view(torch.int16).numpy().view(np.uint16).reshape(-1), ref.dtype)
    want = bnb.absmax_4bit(x, 64)
    assert got.shape == want.shape == (-(-37 * 51 // 64),)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_blocks_split_across_threads_merge_exactly(tmp_path, base, monkeypatch):
    """Row blocks cut into pieces of a few quantization blocks, computed in several threads (as the
    torch engine's blocks are), with the absmax pass read in small chunks: the same bits."""
    from loratool.merge import basequant

    monkeypatch.setattr(basequant, "SPLIT_MIN", 64)
    monkeypatch.setattr(basequant, "CHUNK_BYTES", 256)
    monkeypatch.setattr(basequant, "_ways", lambda: 3)
    assert basequant.split_points(1000, 64, 3) == [0, 320, 640, 1000]
    assert basequant.split_points(100, 64, 3) == [0, 100]
    adapter = _adapter(tmp_path)
    _merge(base, str(adapter), tmp_path / "out", engine="torch", base_precision="nf4,double-quant", block_bytes=4096)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, w in _expected(base, adapter, "nf4", 64, True).items():
        assert torch.equal(got[name].view(torch.int16), w.view(torch.int16)), name


def test_transforms_are_prepared_one_tensor_ahead_in_order():
    """``executor._Preparer``: each tensor's ``prepare`` result, the next one's started in the
    background as one is taken (double quantization's pass off the executor's thread), an error
    raised where the tensor is taken, and a tensor it was not told of prepared at once."""
    import threading

    from loratool.merge.executor import _Preparer

    calls = []

    class Transform:
        def prepare(self, t):
            calls.append((t.name, threading.current_thread().name))
            if t.name == "bad":
                raise ValueError("bad tensor")
            return f"apply {t.name}"

    class T:
        def __init__(self, name):
            self.name, self.transform = name, Transform()

    a, b, c, bad = T("a"), T("b"), T("c"), T("bad")
    prep = _Preparer([a, b, c, bad])
    try:
        assert [prep(a), prep(b), prep(c)] == ["apply a", "apply b", "apply c"]
        with pytest.raises(ValueError, match="bad tensor"):
            prep(bad)
        assert prep(T("other")) == "apply other"
    finally:
        prep.close()
    names = [n for n, _ in calls]
    assert names == ["a", "b", "c", "bad", "other"]
    threads = dict(calls)
    assert threads["a"] == threading.main_thread().name and threads["b"].startswith("loratool-prepare")
