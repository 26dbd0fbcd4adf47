"""Base identity for quantized derivatives (issue 16, item 4): a 4-bit checkpoint that bitsandbytes
made from a 16-bit base is recognised as derived from it, bit for bit; one changed element breaks
the relation and is named; the manifest check accepts an adapter pinned to either base once the
relation is recorded (``loratool fingerprint BASE4 --source BASE16``), and names that command
before."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.checkpoint import BaseCheckpoint
from loratool.errors import BaseMismatchError
from loratool.fingerprint import DerivationStore, HashCache, fingerprint_base, fingerprint_derived
from loratool.manifest import check_base, record_manifest
from loratool.quant.identity import verify_derived
from tests.tinybase import base_tensors, save_adapter, save_base

F = pytest.importorskip("bitsandbytes.functional")

TARGETS = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]
ODD = "model.layers.0.mlp.down_proj.weight"  # 9 x 7 = 63 elements: a short last block, an odd count


def _base16(d, dtype=torch.bfloat16):
    t = {k: (v * 0.05).to(dtype) for k, v in base_tensors().items()}
    t[ODD] = (torch.randn(9, 7, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    return save_base(d, t)


def _save_4bit(src, dst, quant_type="nf4", blocksize=64, double_quant=True, targets=(*TARGETS, ODD)):
    """As transformers saves a bitsandbytes 4-bit model: the targeted weights packed with their
    quant state (``QuantState.as_dict(packed=True)``), the rest as they were."""
    dst.mkdir()
    out = {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if name not in targets:
            out[name] = w
            continue
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
        out[name] = packed
        for k, v in state.as_dict(packed=True).items():
            out[f"{name}.{k}"] = v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type,
                                  "bnb_4bit_use_double_quant": double_quant}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type,blocksize,double_quant",
                         [("nf4", 64, True), ("nf4", 64, False), ("fp4", 128, True), ("fp4", 32, False)])
def test_a_bitsandbytes_4bit_base_is_recognised_as_derived(tmp_path, quant_type, blocksize, double_quant, dtype):
    b16 = _base16(tmp_path / "b16", dtype)
    q4 = _save_4bit(b16, tmp_path / "q4", quant_type, blocksize, double_quant)
    res = verify_derived(BaseCheckpoint(b16), BaseCheckpoint(q4))
    assert res.derived and res.mismatch is None and res.tensor is None
    spec = f"{quant_type},blocksize={blocksize}" + (",double-quant" if double_quant else "")
    assert res.spec == spec and sorted(res.specs[spec]) == sorted([*TARGETS, ODD])
    assert sorted(res.quantized) == sorted([*TARGETS, ODD])
    assert sorted(res.copied) == sorted(set(BaseCheckpoint(b16).names()) - {*TARGETS, ODD})


def test_one_changed_element_breaks_the_relation_and_is_named(tmp_path, monkeypatch):
    from loratool.quant import identity

    monkeypatch.setattr(identity, "CHUNK_BYTES", 128)  # read 64 elements at a time: the element is in chunk 2
    b16 = _base16(tmp_path / "b16")
    q4 = _save_4bit(b16, tmp_path / "q4")
    assert verify_derived(BaseCheckpoint(b16), BaseCheckpoint(q4)).derived  # streamed in chunks, still exact
    t = load_file(str(b16 / "model.safetensors"))
    name = TARGETS[2]
    w = t[name].clone()
    flat = w.view(-1)
    block = flat[64:128].float().abs()
    k = 64 + int(torch.argmax(torch.where(block < block.max(), block, 0)))  # large, but not its block's absmax
    flat[k] = -flat[k]  # its sign flips: another 4-bit code, the same absmax
    t[name] = w
    changed = save_base(tmp_path / "changed", t)
    res = verify_derived(BaseCheckpoint(changed), BaseCheckpoint(q4))
    assert not res.derived and res.tensor == name
    row, col = divmod(k, w.shape[1])
    assert f"element {k} (at [{row}, {col}])" in res.mismatch and "4-bit code" in res.mismatch
    assert res.quantized == [n for n in res.quantized if n != name]  # stopped at the first difference

    t = load_file(str(b16 / "model.safetensors"))  # a tensor kept in 16 bits
    t["model.norm.weight"] = t["model.norm.weight"].clone()
    t["model.norm.weight"][5] = 2.0
    res = verify_derived(BaseCheckpoint(save_base(tmp_path / "changed2", t)), BaseCheckpoint(q4))
    assert not res.derived and res.tensor == "model.norm.weight" and "element 5 " in res.mismatch

    # another quant config than the one stored is not this base's quantization either
    q4b = _save_4bit(b16, tmp_path / "q4b", double_quant=False)
    stored = load_file(str(q4b / "model.safetensors"))
    stored[TARGETS[0] + ".absmax"] = stored[TARGETS[0] + ".absmax"] * 1.0001
    save_file(stored, str(q4b / "model.safetensors"))
    res = verify_derived(BaseCheckpoint(b16), BaseCheckpoint(q4b))
    assert res.tensor == TARGETS[0] and "absmax of block 0" in res.mismatch


def test_fingerprint_source_records_the_relation(tmp_path, cli):
    b16 = _base16(tmp_path / "b16")
    q4 = _save_4bit(b16, tmp_path / "q4", "fp4", 64, False)
    cache = HashCache(tmp_path / "home")
    fp, recalled = fingerprint_derived(q4, b16, cache=cache)
    d = fp.derived_from
    assert not recalled and d.source_content == fingerprint_base(b16).content
    assert (d.base_precision, d.quantized_tensors, d.copied_tensors) == ("fp4,blocksize=64", 5, 4)
    assert DerivationStore.beside(cache).get(fp.content, d.source_content) == d
    again, recalled = fingerprint_derived(q4, b16, cache=cache)
    assert recalled and again.derived_from == d
    assert fingerprint_base(q4, cache=cache).derived_from == d  # recorded: a plain fingerprint shows it
    assert fingerprint_base(q4, cache=HashCache(tmp_path / "other")).derived_from is None

    t = load_file(str(b16 / "model.safetensors"))
    t[ODD] = t[ODD].clone()
    t[ODD][8, 6] = t[ODD][8, 6] * -1
    other = save_base(tmp_path / "other16", t)
    r = cli("fingerprint", q4, "--source", other, env={"LORATOOL_HOME": str(tmp_path / "home")})
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert repr(ODD) in r.stderr and "element 62 (at [8, 6])" in r.stderr


def test_an_adapter_pinned_to_the_16bit_base_merges_into_its_4bit_derivative(tmp_path, cli):
    b16 = _base16(tmp_path / "b16")
    q4 = _save_4bit(b16, tmp_path / "q4", targets=TARGETS)
    home = tmp_path / "home"
    env = {"LORATOOL_HOME": str(home)}
    adapter = save_adapter(tmp_path / "adapter")
    record_manifest(adapter, base=b16, cache=HashCache(home))

    r = cli("merge", "--base", q4, "--adapters", adapter, "-o", tmp_path / "out", "-q", env=env)
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"loratool fingerprint {q4} --source BASE16" in r.stderr and not (tmp_path / "out").exists()

    r = cli("fingerprint", q4, "--source", b16, "--json", env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["derived_from"]
    assert d["source_content"] == fingerprint_base(b16).content and d["base_precision"] == "nf4,blocksize=64,double-quant"

    r = cli("merge", "--base", q4, "--adapters", adapter, "-o", tmp_path / "out", "-q", env=env)
    assert r.returncode == 0, r.stderr
    assert "4-bit derivative (nf4,blocksize=64,double-quant) of the base recorded" in r.stderr
    lineage = json.loads((tmp_path / "out" / "loratool.json").read_text())
    assert lineage["base"]["derived_from"]["source_content"] == d["source_content"]

    res = check_base(adapter, q4, cache=HashCache(home))
    assert (res.status, res.structure, res.content, res.seen) == ("match", "match", "derived", "4-bit derivative")
    assert res.derivation.base_precision == d["base_precision"]
    assert check_base(adapter, b16, cache=HashCache(home)).seen == "recorded"
    with pytest.raises(BaseMismatchError, match="--source BASE16"):  # no relation recorded in this home
        check_base(adapter, q4, cache=HashCache(tmp_path / "fresh"))


def test_an_adapter_pinned_to_the_4bit_base_is_accepted_on_its_16bit_source(tmp_path):
    b16 = _base16(tmp_path / "b16")
    q4 = _save_4bit(b16, tmp_path / "q4", "fp4", 128, True, targets=TARGETS)
    home = tmp_path / "home"
    adapter = save_adapter(tmp_path / "adapter")
    record_manifest(adapter, base=q4, cache=HashCache(home))
    with pytest.raises(BaseMismatchError, match="different values"):
        check_base(adapter, b16, cache=HashCache(home))
    fingerprint_derived(q4, b16, cache=HashCache(home))
    res = check_base(adapter, b16, cache=HashCache(home))
    assert (res.status, res.content, res.seen) == ("match", "derived", "16-bit source")
    assert any("--base-precision fp4,blocksize=128,double-quant" in w for w in res.warnings)
    # a manifest recorded after the relation carries it: accepted in a home that never saw it
    record_manifest(adapter, base=q4, cache=HashCache(home))
    res = check_base(adapter, b16, cache=HashCache(tmp_path / "fresh"))
    assert (res.content, res.seen) == ("derived", "16-bit source")
    # an unrelated 16-bit base is still refused
    t = load_file(str(b16 / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"] * 2
    with pytest.raises(BaseMismatchError):
        check_base(adapter, save_base(tmp_path / "unrelated", t), cache=HashCache(home))
