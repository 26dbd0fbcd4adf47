"""GPTQ and AWQ weights read as the tensors they dequantize to (``loratool.quant.gptq``).

The packing here is written from the formats' description, independently of the module: a packed
axis is a little-endian bit stream (value j at bits [j·bits, (j+1)·bits), 32-bit words), built
with Python integers; AWQ's 4-bit words hold their 8 columns in the order 0, 2, 4, 6, 1, 3, 5, 7.
The expected weights are (q − z)·s in float64, rounded once to the output dtype. A few words are
packed by hand. The references' own packing and dequantization (AutoAWQ 0.2.9, GPTQModel 7.7.0,
AutoGPTQ 0.7.1) are checked bit for bit by bench/check_gptq_reference.py
(bench/results/gptq_reference.txt), which needs them downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from loratool.errors import FormatError
from loratool.quant import gptq
from loratool.safetensors_io import SafetensorsFile

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# -- an independent packer and dequantizer ---------------------------------------------------------

def stream_words(values, bits: int, nwords: int) -> list[int]:
    """``values`` as a little-endian bit stream cut into ``nwords`` 32-bit words."""
    acc = 0
    for j, v in enumerate(values):
        acc |= int(v) << (j * bits)
    return [(acc >> (32 * k)) & 0xFFFFFFFF for k in range(nwords)]


def as_i32(words) -> np.ndarray:
    return np.array(words, dtype=np.uint32).view(np.int32)


def pack_axis(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack an int array along ``axis`` (GPTQ: qweight along rows, qzeros along columns)."""
    c = np.moveaxis(codes, axis, 0)
    n = -(-c.shape[0] * bits // 32)
    out = np.array([[stream_words(c[:, i], bits, n) for i in range(c.shape[1])]], dtype=np.uint32)[0].T
    return np.moveaxis(out.view(np.int32), 0, axis)


def pack_awq(codes: np.ndarray) -> np.ndarray:
    """[rows, cols] 4-bit codes packed along the columns, 8 a word in AWQ's order."""
    rows, cols = codes.shape
    out = np.zeros((rows, cols // 8), np.uint32)
    for w in range(cols // 8):
        for k in range(8):
            out[:, w] |= codes[:, 8 * w + ORDER[k]].astype(np.uint32) << np.uint32(4 * k)
    return out.view(np.int32)


def expected(q, z, s, g, dtype: str) -> np.ndarray:
    """The [out, in] weight: q [in, out], z and s [groups, out], g [in]; float64, rounded once."""
    w = ((q.astype(np.float64) - z[g].astype(np.float64)) * s[g].astype(np.float64)).T
    if dtype == "F16":
        return w.astype(np.float16)
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def write(tmp_path, tensors: dict, name="m.safetensors") -> dict:
    path = tmp_path / name
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    st = SafetensorsFile(path)
    return {k: st.ref(k) for k in st.keys()}


def random_gptq(rng, bits, in_f, out_f, group, desc_act, sym):
    groups = -(-in_f // group)
    q = rng.integers(0, 1 << bits, (in_f, out_f))
    z = np.full((groups, out_f), 1 << (bits - 1)) if sym else rng.integers(0, 1 << bits, (groups, out_f))
    s = (rng.random((groups, out_f)) * 0.02 + 1e-3).astype(np.float16)
    g = (rng.permutation(in_f) if desc_act else np.arange(in_f)) // group
    return q, z, s, g.astype(np.int32)


# -- GPTQ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,desc_act,sym", [(32, False, True), (64, True, False), (-1, False, False)])
def test_gptq_v2_equals_the_float64_dequantization(tmp_path, bits, group, desc_act, sym):
    rng = np.random.default_rng(bits * 7 + group)
    in_f, out_f = 128, 72  # out not a multiple of 32: 3-bit zero points end mid-word
    q, z, s, g = random_gptq(rng, bits, in_f, out_f, in_f if group < 0 else group, desc_act, sym)
    refs = write(tmp_path, {"l.qweight": pack_axis(q, bits, 0), "l.qzeros": pack_axis(z, bits, 1), "l.scales": s,
                            "l.g_idx": g, "l.bias": np.arange(out_f, dtype=np.float16)})
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
          "checkpoint_format": "gptq_v2"}
    out, found = gptq.group(refs, qc)
    assert found == ["l.weight"] and sorted(out) == ["l.bias", "l.weight"]
    ref = out["l.weight"]
    assert (ref.dtype, ref.shape) == ("F16", (out_f, in_f))
    want = expected(q, z, s, g, "F16")
    assert np.array_equal(ref.dequantized().view(np.uint16), want.view(np.uint16))
    p = ref.arrays()
    for first, count in ((0, 1), (5, 31), (33, 39), (71, 1)):  # row blocks that cut packed words
        assert np.array_equal(ref.dequantized(first, count, p), ref.dequantized()[first:first + count])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_v1_adds_one_to_each_stored_zero(tmp_path, bits):
    rng = np.random.default_rng(bits)
    q, z, s, g = random_gptq(rng, bits, 64, 64, 32, False, False)
    z = np.clip(z, 1, None)  # v1 stores z - 1: a zero point of 0 does not fit
    refs = write(tmp_path, {"l.qweight": pack_axis(q, bits, 0), "l.qzeros": pack_axis(z - 1, bits, 1), "l.scales": s,
                            "l.g_idx": g})
    for qc in ({"quant_method": "gptq", "bits": bits, "group_size": 32},  # v1 is the default
               {"quant_method": "gptq", "bits": bits, "group_size": 32, "checkpoint_format": "gptq"},
               {"bits": bits, "group_size": 32, "desc_act": False, "sym": False}):  # AutoGPTQ's quantize_config.json
        ref = gptq.group(refs, qc, side_file="quant_method" not in qc)[0]["l.weight"]
        assert ref.spec.v1
        assert np.array_equal(ref.dequantized().view(np.uint16), expected(q, z, s, g, "F16").view(np.uint16))
        assert ref.v1_saturated() == 0


def test_hand_packed_gptq_words(tmp_path):
    # 4 bits: column 0's word 0x76543210 holds input rows 0..7 = codes 0..7; v1 zeros 0x77777777 are 8 each
    qweight = as_i32([[0x76543210] * 8])
    refs = write(tmp_path, {"l.qweight": qweight, "l.qzeros": as_i32([[0x77777777]]),
                            "l.scales": np.full((1, 8), 0.5, np.float16)})
    ref = gptq.group(refs, {"quant_method": "gptq", "bits": 4, "group_size": -1})[0]["l.weight"]
    assert ref.shape == (8, 8)
    assert ref.dequantized().astype(np.float32)[3].tolist() == [-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5]
    # a v1 field that is all ones (zero point 0, which v1 cannot store): one is added to each field of
    # the word at once, as GPTQModel's loader does, so it carries: 0x0000000F + 0x11111111 = 0x11111120
    refs = write(tmp_path, {"l.qweight": qweight, "l.qzeros": as_i32([[0x0000000F]]),
                            "l.scales": np.full((1, 8), 1.0, np.float16)}, "carry.safetensors")
    ref = gptq.group(refs, {"quant_method": "gptq", "bits": 4, "group_size": -1})[0]["l.weight"]
    w = ref.dequantized().astype(np.float32)  # zero points of the 8 output channels: 0, 2, then 1s
    assert w[:, 5].tolist() == [5.0, 3.0] + [4.0] * 6  # input row 5 (code 5) across them
    assert w[1].tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert ref.v1_saturated() == 1


def test_hand_packed_3bit_words(tmp_path):
    # 32 values j % 8 in 3 words; value 10 straddles words 0 and 1, value 21 words 1 and 2
    vals = [j % 8 for j in range(32)]
    words = [0x88FAC688, 0xC688FAC6, 0xFAC688FA]  # word 0: 0,1,..,7,0,1 at bits 0..29, then 10 % 8 = 0b010's low bits
    assert stream_words(vals, 3, 3) == words
    assert (words[0] >> 30) | ((words[1] & 1) << 2) == 10 % 8
    assert (words[1] >> 31) | ((words[2] & 3) << 1) == 21 % 8
    qweight = as_i32([[w] for w in words])  # one output column
    refs = write(tmp_path, {"l.qweight": qweight, "l.qzeros": as_i32([[0, 0, 0]]), "l.scales": np.ones((1, 1), np.float16)})
    ref = gptq.group(refs, {"quant_method": "gptq", "bits": 3, "group_size": -1, "checkpoint_format": "gptq_v2"})[0]
    assert ref["l.weight"].dequantized().astype(np.float32)[0].tolist() == vals


def test_gptq_bf16_output_rounds_once(tmp_path):
    rng = np.random.default_rng(5)
    q, z, s, g = random_gptq(rng, 4, 64, 32, 32, False, False)
    refs = write(tmp_path, {"l.qweight": pack_axis(q, 4, 0), "l.qzeros": pack_axis(z, 4, 1), "l.scales": s,
                            "l.g_idx": g})
    ref = gptq.group(refs, {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"},
                     dtype="bfloat16")[0]["l.weight"]
    assert ref.dtype == "BF16"
    assert np.array_equal(ref.dequantized(), expected(q, z, s, g, "BF16"))
    torch = pytest.importorskip("torch")
    t = ref.load()
    assert t.dtype == torch.bfloat16 and np.array_equal(t.view(torch.int16).numpy().view(np.uint16), ref.dequantized())


# -- AWQ -------------------------------------------------------------------------------------------

def test_hand_packed_awq_word(tmp_path):
    # fields k = 0..7 hold k; field k is column ORDER[k]: columns 0..7 read 0, 4, 1, 5, 2, 6, 3, 7
    word = sum(k << (4 * k) for k in range(8))
    refs = write(tmp_path, {"l.qweight": as_i32([[word]]), "l.qzeros": as_i32([[0]]),
                            "l.scales": np.ones((1, 8), np.float16)})
    ref = gptq.group(refs, {"quant_method": "awq", "bits": 4, "group_size": 1, "version": "gemm"})[0]["l.weight"]
    assert ref.shape == (8, 1)
    assert ref.dequantized().astype(np.float32)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("group", [16, 64])
def test_awq_equals_the_float64_dequantization(tmp_path, group):
    rng = np.random.default_rng(group)
    in_f, out_f = 64, 40
    q = rng.integers(0, 16, (in_f, out_f))
    z = rng.integers(0, 16, (in_f // group, out_f))
    s = (rng.random((in_f // group, out_f)) * 0.02 + 1e-3).astype(np.float16)
    refs = write(tmp_path, {"l.qweight": pack_awq(q), "l.qzeros": pack_awq(z), "l.scales": s})
    out, found = gptq.group(refs, {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
                                   "zero_point": True})
    assert found == ["l.weight"] and list(out) == ["l.weight"]
    ref = out["l.weight"]
    assert ref.shape == (out_f, in_f) and str(ref.spec) == f"awq,bits=4,group_size={group},gemm"
    g = np.arange(in_f) // group
    assert np.array_equal(ref.dequantized().view(np.uint16), expected(q, z, s, g, "F16").view(np.uint16))
    for first, count in ((3, 10), (13, 27)):  # blocks that start and end inside AWQ words
        assert np.array_equal(ref.dequantized(first, count), ref.dequantized()[first:first + count])


# -- grouping and its errors ----------------------------------------------------------------------

def test_no_quantization_config_leaves_tensors_alone(tmp_path):
    refs = write(tmp_path, {"l.qweight": as_i32([[1]]), "l.weight2": np.ones(2, np.float16)})
    assert gptq.group(refs, None) == (refs, [])
    assert gptq.group(refs, {"quant_method": "bitsandbytes"}) == (refs, [])


def _layer(tmp_path, **over):
    t = {"l.qweight": as_i32([[0]] * 16), "l.qzeros": as_i32([[0]]), "l.scales": np.ones((1, 1), np.float16),
         "l.g_idx": np.zeros(128, np.int32)}
    t.update(over)
    return write(tmp_path, {k: v for k, v in t.items() if v is not None})


@pytest.mark.parametrize("qc,over,message", [
    ({"bits": 4, "checkpoint_format": "marlin"}, {}, "checkpoint format 'marlin'"),
    ({"bits": 5}, {}, "GPTQ with 5 bits"),
    ({"bits": "4"}, {}, "bits is '4'"),
    ({"bits": 4, "group_size": 0}, {}, "group_size 0"),
    ({"bits": 4}, {"l.qzeros": None}, "l.qzeros is missing"),
    ({"bits": 4}, {"l.scales": np.ones((1, 2), np.float16)}, "l.scales is [1, 2]"),
    ({"bits": 4}, {"l.qweight": np.zeros((16, 1), np.float32)}, "l.qweight is F32"),
    ({"bits": 4}, {"l.scales": np.ones((1, 1), np.int32)}, "scales are I32"),
])
def test_gptq_layout_errors_name_the_file_and_tensor(tmp_path, qc, over, message):
    refs = _layer(tmp_path, **over)
    with pytest.raises(FormatError, match=None) as e:
        gptq.group(refs, dict(qc, quant_method="gptq", group_size=qc.get("group_size", 128)))
    text = str(e.value)
    assert message in text and "\n" not in text
    assert "config.json" in text or "m.safetensors" in text


def test_g_idx_out_of_range_is_refused_on_read(tmp_path):
    refs = _layer(tmp_path, **{"l.g_idx": np.full(128, 3, np.int32)})
    ref = gptq.group(refs, {"quant_method": "gptq", "bits": 4, "group_size": 128})[0]["l.weight"]
    with pytest.raises(FormatError, match="puts input row 0 in group 3; scales has 1"):
        ref.dequantized()


def test_awq_errors(tmp_path):
    refs = _layer(tmp_path)
    for qc, message in (({"version": "gemv"}, "only the GEMM layout"), ({"zero_point": False}, "zero_point: false"),
                        ({"bits": 9}, "AWQ with 9 bits")):
        with pytest.raises(FormatError, match=message):
            gptq.group(refs, dict({"quant_method": "awq", "bits": 4, "group_size": 128}, **qc))


def test_the_warning_names_unsettled_v1_zero_points(tmp_path):
    refs = write(tmp_path, {"l.qweight": as_i32([[0] * 8]), "l.qzeros": as_i32([[0x00F0000F]]),
                            "l.scales": np.ones((1, 8), np.float16)})
    ref = gptq.group(refs, {"quant_method": "gptq", "bits": 4, "group_size": -1})[0]["l.weight"]
    assert ref.v1_saturated() == 2
    assert ref.warning("l.weight").startswith("l.weight: 2 GPTQ v1 zero point(s) stored as all ones")
    v2 = gptq.group(refs, {"quant_method": "gptq", "bits": 4, "group_size": -1, "checkpoint_format": "gptq_v2"})
    assert v2[0]["l.weight"].warning("l.weight") is None


def test_the_weight_is_named_as_in_the_file(tmp_path):
    refs = write(tmp_path, {"m.l.qweight": as_i32([[0] * 8]), "m.l.qzeros": as_i32([[0]]),
                            "m.l.scales": np.ones((1, 8), np.float16)})
    refs = {"unet." + k: v for k, v in refs.items()}  # as a pipeline component's tensors are keyed
    out, found = gptq.group(refs, {"quant_method": "gptq", "bits": 4, "group_size": -1})
    assert found == ["unet.m.l.weight"] and out["unet.m.l.weight"].info.name == "m.l.weight"


# -- the merge over a GPTQ/AWQ base (once checkpoint.py and the merge plan group these layers) ----

def _tiny_base(d, method: str, rng) -> None:
    import json

    t, hidden = {"model.norm.weight": np.ones(32, np.float16)}, 32
    for name in ("q_proj", "v_proj"):
        p = f"model.layers.0.self_attn.{name}."
        q = rng.integers(0, 16, (hidden, hidden))
        if method == "gptq":
            z = rng.integers(1, 16, (2, hidden))
            t.update({p + "qweight": pack_axis(q, 4, 0), p + "qzeros": pack_axis(z - 1, 4, 1),
                      p + "g_idx": (rng.permutation(hidden) // 16).astype(np.int32)})
            qc = {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True, "sym": False}
        else:
            t.update({p + "qweight": pack_awq(q), p + "qzeros": pack_awq(rng.integers(0, 16, (2, hidden)))})
            qc = {"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm", "zero_point": True}
        t[p + "scales"] = (rng.random((2, hidden)) * 0.02 + 1e-3).astype(np.float16)
        t[p + "bias"] = rng.standard_normal(hidden).astype(np.float16)
    d.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16",
                                               "quantization_config": qc}))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_packed_base_merges_like_its_dequantized_twin(tmp_path, method):
    import json

    from loratool.checkpoint import BaseCheckpoint

    rng = np.random.default_rng(3)
    base = tmp_path / "base"
    _tiny_base(base, method, rng)
    ck = BaseCheckpoint(base)
    if not getattr(ck, "packed", None):
        pytest.skip("BaseCheckpoint does not group GPTQ/AWQ layers yet (the checkpoint.py hook)")
    from loratool.merge.api import merge

    twin = tmp_path / "twin"
    twin.mkdir()
    save_file({n: np.frombuffer(ck.ref(n).raw(), np.float16).reshape(ck.shape(n)) for n in ck.names()},
              str(twin / "model.safetensors"))
    (twin / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    ad = tmp_path / "lora"
    ad.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 32), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((32, 4), np.float32)},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    res = merge(base, str(ad), tmp_path / "out")
    merge(twin, str(ad), tmp_path / "twin-out")
    assert res.base_precision.startswith(f"stored:{method},bits=4,group_size=16")
    assert (res.num_merged, res.num_cast) == (1, 1)  # q_proj merged, v_proj dequantized as stored
    got, want = (SafetensorsFile(tmp_path / d / "model.safetensors") for d in ("out", "twin-out"))
    assert sorted(got.keys()) == sorted(want.keys())  # no qweight, qzeros, scales or g_idx left
    assert all(got.ref(k).raw() == want.ref(k).raw() for k in got.keys())
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_parity_reads_a_packed_base_as_the_merge_did(tmp_path, method):
    """parity of a merge onto a GPTQ/AWQ base compares with the base as the merge dequantized it:
    it passes, and a changed element of the merged weight or of the dequantized-only one fails."""
    import json

    from loratool.merge.api import merge
    from loratool.merge.parity import check_parity

    rng = np.random.default_rng(4)
    _tiny_base(tmp_path / "base", method, rng)
    ad = tmp_path / "lora"
    ad.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 32), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((32, 4), np.float32)},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    merge(tmp_path / "base", str(ad), tmp_path / "out")
    report = check_parity(tmp_path / "base", tmp_path / "out", [str(ad)])
    assert report.ok and [lay.name for lay in report.layers] == ["model.layers.0.self_attn.q_proj.weight"]
    assert report.untouched == 4 and not report.untouched_mismatched  # v_proj, the biases, the norm
    from loratool.merge.api import unmerge

    un = unmerge(tmp_path / "out", [str(ad)], tmp_path / "un", base=tmp_path / "base")  # compared with the base
    assert un.distance and max(d.max_ulp for d in un.distance) <= 1.0
    merged = tmp_path / "out" / "model.safetensors"
    st = SafetensorsFile(merged)
    offsets = {k: st.ref(k).info.start for k in ("model.layers.0.self_attn.q_proj.weight",
                                                 "model.layers.0.self_attn.v_proj.weight")}
    data = bytearray(merged.read_bytes())
    for off in offsets.values():
        data[off + 1] ^= 0x40  # the high byte of each tensor's first fp16 element
    merged.write_bytes(bytes(data))
    report = check_parity(tmp_path / "base", tmp_path / "out", [str(ad)])
    assert not report.ok and report.layers[0].bad == 1
    assert report.untouched_mismatched == ["model.layers.0.self_attn.v_proj.weight"]


def test_other_quantization_configs_leave_a_base_readable(tmp_path):
    """Only GPTQ/AWQ layers are grouped, and a layout this module does not read leaves the base
    readable: MLX's config.json ``{"group_size", "bits": 6}`` (no quant_method) is not GPTQ; a
    GPTQ config of a layout not read (marlin) lets header-only commands go on, and a merge into
    such a layer names the reason in one line."""
    import json

    from loratool.checkpoint import BaseCheckpoint
    from loratool.errors import LoratoolError
    from loratool.fingerprint import fingerprint_base

    mlx = tmp_path / "mlx"
    mlx.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": np.zeros((8, 4), np.uint32),
               "model.layers.0.mlp.up_proj.scales": np.ones((8, 1), np.float16),
               "model.layers.0.mlp.up_proj.biases": np.zeros((8, 1), np.float16)}, str(mlx / "model.safetensors"))
    (mlx / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"group_size": 64, "bits": 6},
                                                 "quantization": {"group_size": 64, "bits": 6}}))
    ck = BaseCheckpoint(mlx)
    assert not ck.packed and ck.unread is None and "model.layers.0.mlp.up_proj.weight" in ck.names()
    assert fingerprint_base(mlx).files
    marlin = tmp_path / "marlin"
    _tiny_base(marlin, "gptq", np.random.default_rng(5))
    cfg = json.loads((marlin / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "marlin"
    (marlin / "config.json").write_text(json.dumps(cfg))
    ck = BaseCheckpoint(marlin)
    assert not ck.packed and "marlin" in ck.unread
    assert fingerprint_base(marlin).files  # header-only work goes on
    why = ck.missing("model.layers.0.self_attn.q_proj.weight")
    assert "only its packed form model.layers.0.self_attn.q_proj.qweight" in why and "marlin" in why
    ad = tmp_path / "lora"
    ad.mkdir()
    rng = np.random.default_rng(6)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 32), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((32, 4), np.float32)},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    from loratool.merge.api import merge

    with pytest.raises(LoratoolError) as e:
        merge(marlin, str(ad), tmp_path / "out")
    assert "only its packed form" in e.value.message and "marlin" in e.value.message
    assert "\n" not in e.value.message and not (tmp_path / "out").exists()


def test_a_packed_bases_structure_is_its_files(tmp_path):
    """The structure fingerprint of a GPTQ base is that of its stored tensors (qweight, qzeros,
    scales, g_idx), as the Hub's headers give it and as manifests recorded it before loratool
    read GPTQ: not of the weights it dequantizes to."""
    from loratool.fingerprint import fingerprint_local, structure_fingerprint

    _tiny_base(tmp_path / "base", "gptq", np.random.default_rng(7))
    st = SafetensorsFile(tmp_path / "base" / "model.safetensors")
    raw = [(k, st.ref(k).dtype, tuple(st.ref(k).shape)) for k in st.keys()]
    fp = fingerprint_local(tmp_path / "base", content=False)
    assert fp.structure == structure_fingerprint(raw) and fp.num_tensors == len(raw) == 11
    assert fp.files[0].structure == structure_fingerprint(raw)
