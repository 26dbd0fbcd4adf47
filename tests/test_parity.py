"""`loratool parity`: passes on good merges (ours and PEFT's own), fails on tampered ones."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from test_merge import KIND_CASES, _edit_mts, kinds_model, save_adapter, tiny_llama

from loratool.cli import main
from loratool.merge import merge
from loratool.merge.parity import check_parity, ulp
from loratool.safetensors_io import SafetensorsFile

TOUCHED = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = tiny_llama(dtype)
        base = root / f"base_{name}"
        model.save_pretrained(str(base), max_shard_size="200KB")
        a = save_adapter(model, root / f"a_{name}", 1, r=8, lora_alpha=12, target_modules="all-linear")
        b = save_adapter(model, root / f"b_{name}", 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
        merged = root / f"merged_{name}"
        merge(base, f"{a}:0.7,{b}:0.3", merged, device="cpu")
        out[name] = dict(base=base, a=a, b=b, merged=merged, spec=f"{a}:0.7,{b}:0.3", model=model)
    return out


def run(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(["parity", *map(str, args)])
    return e.value.code, capsys.readouterr().out


def shift_element(path, name: str, index: int, ulps: int) -> None:
    """Add ``ulps`` units in the last place to one element of a tensor, in place (bf16/fp32)."""
    st = SafetensorsFile(path)
    info = st.info(name)
    size = {"BF16": 2, "F32": 4}[info.dtype]
    with open(path, "r+b") as f:
        f.seek(info.start + index * size)
        raw = f.read(size)
        fmt = "<H" if size == 2 else "<I"
        (bits,) = struct.unpack(fmt, raw)
        f.seek(info.start + index * size)
        f.write(struct.pack(fmt, bits + ulps))  # same sign and exponent: |x| grows by `ulps` ulps


def shard_of(d, name: str):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return d / index["weight_map"][name]


@pytest.mark.parametrize("name", ["bf16", "fp32"])
def test_parity_passes_on_a_good_merge(setup, capsys, name):
    s = setup[name]
    code, out = run(capsys, "--base", s["base"], "--merged", s["merged"], "--adapters", s["spec"], "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"]
    assert len(report["layers"]) == 14 and report["untouched"] == 7
    assert report["max_err_over_tol"] <= 1.0
    code, out = run(capsys, "--base", s["base"], "--merged", s["merged"], "--adapters", s["spec"])
    assert code == 0 and "PASS: 14 of 14 changed tensors" in out


def test_parity_fails_on_a_tampered_merge(setup, tmp_path, capsys):
    s = setup["bf16"]
    bad = tmp_path / "bad"
    shutil.copytree(s["merged"], bad)
    shift_element(shard_of(bad, TOUCHED), TOUCHED, 17, 3)
    code, out = run(capsys, "--base", s["base"], "--merged", bad, "--adapters", s["spec"])
    assert code == 1
    assert TOUCHED in out and "FAIL" in out
    report = check_parity(s["base"], bad, s["spec"])
    failed = [lay for lay in report.layers if not lay.ok]
    assert [lay.name for lay in failed] == [TOUCHED] and failed[0].bad == 1 and failed[0].max_err_over_tol > 1


def test_parity_fails_on_a_changed_untouched_tensor(setup, tmp_path, capsys):
    s = setup["bf16"]
    bad = tmp_path / "bad"
    shutil.copytree(s["merged"], bad)
    name = "model.norm.weight"
    shift_element(shard_of(bad, name), name, 0, 1)
    code, out = run(capsys, "--base", s["base"], "--merged", bad, "--adapters", s["spec"], "--json")
    assert code == 1 and json.loads(out)["untouched_mismatched"] == [name]


def test_parity_fails_with_other_weights(setup, capsys):
    s = setup["bf16"]
    code, _ = run(capsys, "--base", s["base"], "--merged", s["merged"], "--adapters", f"{s['a']}:0.5,{s['b']}:0.5")
    assert code == 1


def test_parity_accepts_peft_merge_and_unload(setup, tmp_path, capsys):
    """PEFT's own merged checkpoint passes: the tolerance is one rounding, not our bits."""
    from peft import PeftModel

    s = setup["bf16"]
    model = tiny_llama(torch.bfloat16)
    model.load_state_dict(s["model"].state_dict())
    PeftModel.from_pretrained(model, str(s["a"])).merge_and_unload().save_pretrained(str(tmp_path / "peft"))
    code, out = run(capsys, "--base", s["base"], "--merged", tmp_path / "peft", "--adapters", s["a"])
    assert code == 0, out


def test_parity_forward(setup, tmp_path, capsys):
    s = setup["bf16"]
    merge(s["base"], str(s["a"]), tmp_path / "merged", device="cpu")
    code, out = run(capsys, "--base", s["base"], "--merged", tmp_path / "merged", "--adapters", s["a"],
                    "--forward", "--json")
    forward = json.loads(out)["forward"]
    assert code == 0, out
    assert forward["top1_agreement"] >= 0.95 and forward["max_abs_diff"] < 0.05 * forward["max_abs_logit"]


def torch_reference(base, merged, spec) -> dict:
    """``parity._check_merge`` (torch, whole-tensor float64) of every merged tensor, and the names
    the numpy stream takes (``paritystream.factors``)."""
    from loratool.checkpoint import BaseCheckpoint
    from loratool.merge import paritystream
    from loratool.merge.parity import _check_merge, _Rows
    from loratool.merge.plan import Action, plan_merge
    from loratool.merge.specs import _specs, load_adapters

    mck = BaseCheckpoint(merged)
    plan = plan_merge(BaseCheckpoint(base), load_adapters(_specs(spec)))
    out, streamed = {}, set()
    with torch.inference_mode(), _Rows() as rows:
        for t in plan.tensors():
            if t.action is Action.MERGE:
                m = mck.ref(t.name)
                t.dtype = m.dtype
                out[t.name] = _check_merge(t, m, rows, None)
                if paritystream.factors(t) is not None:
                    streamed.add(t.name)
    return out, streamed


def assert_same_layers(report, reference: dict) -> None:
    """The streamed check reports what the torch check does (X differs by float64 roundings)."""
    for lay in report.layers:
        if lay.action == "merge":
            ref = reference[lay.name]
            assert (lay.bad, lay.ok, lay.kind, lay.dora) == (ref.bad, ref.ok, ref.kind, ref.dora), lay.name
            for f in ("max_abs_err", "max_ulp_err"):
                assert getattr(lay, f) == pytest.approx(getattr(ref, f), rel=1e-6, abs=1e-300), (lay.name, f)
            # the streamed bound is computed in float32, made larger by a few millionths; a bf16 or
            # fp16 block whose every element is within one ulp of X reports max |M − X| / ulp(X),
            # which exceeds the ratio to the tolerance by the bound's share of it
            if lay.dtype in ("BF16", "F16"):  # blocks within one ulp report err/ulp, an upper bound
                assert ref.max_err_over_tol <= lay.max_err_over_tol * (1 + 1e-6), lay.name
                assert lay.max_err_over_tol <= lay.max_ulp_err * (1 + 1e-9), lay.name
                assert lay.max_err_over_tol == pytest.approx(ref.max_err_over_tol, rel=2e-3, abs=1e-300), lay.name
            else:
                assert lay.max_err_over_tol == pytest.approx(ref.max_err_over_tol, rel=1e-4, abs=1e-300), lay.name


@pytest.mark.parametrize("name", ["bf16", "fp32"])
def test_streamed_parity_equals_the_torch_check(setup, name):
    s = setup[name]
    reference, streamed = torch_reference(s["base"], s["merged"], s["spec"])
    assert streamed == set(reference)  # every tensor of this model is streamed
    assert_same_layers(check_parity(s["base"], s["merged"], s["spec"]), reference)


def test_parity_counts_nan_as_bad(setup, tmp_path):
    s = setup["bf16"]
    bad = tmp_path / "bad"
    shutil.copytree(s["merged"], bad)
    path, info = shard_of(bad, TOUCHED), None
    info = SafetensorsFile(path).info(TOUCHED)
    with open(path, "r+b") as f:
        f.seek(info.start + 2 * 5)
        f.write(struct.pack("<H", 0x7FC0))  # a bfloat16 NaN
    report = check_parity(s["base"], bad, s["spec"])
    failed = [lay for lay in report.layers if not lay.ok]
    assert [lay.name for lay in failed] == [TOUCHED] and failed[0].bad == 1
    assert failed[0].max_err_over_tol == float("inf") and not report.ok


@pytest.mark.parametrize("case", ["plain", "dora", "lora_bias", "modules_to_save", "rslora_patterns"])
def test_parity_on_every_layer_kind(tmp_path, case):
    from safetensors.torch import save_file

    model = kinds_model(torch.bfloat16)
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    config = dict(KIND_CASES[case])
    if "c1d" in config["target_modules"]:
        config["fan_in_fan_out"] = True
    a = save_adapter(model, tmp_path / "a", 5, edit=_edit_mts if case == "modules_to_save" else None, **config)
    merge(tmp_path / "base", str(a), tmp_path / "merged", device="cpu")
    report = check_parity(tmp_path / "base", tmp_path / "merged", str(a))
    assert report.ok, [lay for lay in report.layers if not lay.ok]
    reference, streamed = torch_reference(tmp_path / "base", tmp_path / "merged", str(a))
    assert_same_layers(report, reference)
    assert bool(streamed) == (case != "dora")  # DoRA and Conv2d are checked in torch
    assert {lay.action for lay in report.layers} == ({"merge", "replace"} if case == "modules_to_save" else {"merge"})


def test_ulp():
    x = torch.tensor([1.0, 1.5, 2.0, -3.0, 0.0, 1e-40], dtype=torch.float64)
    assert ulp(x, "BF16").tolist()[:4] == [2**-7, 2**-7, 2**-6, 2**-6]
    assert ulp(x, "F32").tolist()[0] == 2**-23
    assert ulp(x, "F16").tolist()[4] == 2**-24  # subnormal spacing
    assert ulp(x, "BF16").tolist()[5] == 2**-133


def test_one_ulp_rule_for_torch_and_numpy_checks():
    """parity.ulp (torch paths) is paritystream's exponent rule: the spacing of dtype values at
    |x| (x = m·2^e), never below the smallest normal's, as frexp/ldexp define it."""
    import torch

    from loratool.merge.parity import ulp

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([0.0, 1.0, 1.5, -3.0, 1e-40, 65504.0, 2.0**-130, 1e300], dtype=torch.float64),
                   torch.randn(1000, generator=g, dtype=torch.float64)
                   * torch.pow(10.0, torch.randint(-40, 40, (1000,), generator=g).double())])
    for dtype, (mant, emin) in {"BF16": (7, -126), "F16": (10, -14), "F32": (23, -126), "F64": (52, -1022)}.items():
        _, e = torch.frexp(x)
        exp = torch.where(x == 0, emin, torch.clamp(e.to(torch.int64) - 1, min=emin))
        assert torch.equal(ulp(x, dtype), torch.ldexp(torch.ones_like(x), exp - mant)), dtype


@pytest.mark.parametrize("tied", [False, True])
def test_forward_streamed_equals_from_pretrained(tmp_path, tied):
    """The streamed model (meta parameters, one unit's weights read around its forward) gives
    from_pretrained's float32 logits, for the base + PEFT adapter and for a plain checkpoint, and
    never holds more than one decoder layer's (or the embeddings'/lm_head's) weights at once."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from loratool.checkpoint import BaseCheckpoint
    from loratool.merge.forward import adapters_on_cpu, empty_model, stream_weights

    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=120, tie_word_embeddings=tied)
    base = tmp_path / "base"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(base), max_shard_size="100KB")
    adapter = save_adapter(AutoModelForCausalLM.from_pretrained(str(base)), tmp_path / "a", 5, r=4,
                           lora_alpha=8, target_modules="all-linear", use_dora=tied)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    layer = sum(p.numel() for p in LlamaForCausalLM(cfg).model.layers[0].parameters())
    embed = 120 * 64

    def streamed(model, path):
        live = []  # the materialized parameter elements seen by every leaf module's forward
        hooks = [m.register_forward_hook(lambda m, a, o: live.append(
            sum(p.numel() for p in model.parameters() if p.device.type != "meta")))
            for m in model.modules() if not list(m.children())]
        stream = stream_weights(model, BaseCheckpoint(path))
        try:
            out = model(input_ids=ids).logits
        finally:
            stream.close()
            for h in hooks:
                h.remove()
        adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert live and max(live) - adapters <= max(layer, embed) and stream.peak <= max(layer, embed)
        assert stream.peak >= layer  # a whole layer was materialized at some point, then released
        assert all(p.device.type == "meta" for n, p in model.named_parameters() if "lora_" not in n)
        return out

    with torch.no_grad():
        config = AutoConfig.from_pretrained(str(base))
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                         str(adapter)).eval()(input_ids=ids).logits
        with adapters_on_cpu():
            pm = PeftModel.from_pretrained(empty_model(AutoModelForCausalLM, config), str(adapter),
                                           low_cpu_mem_usage=True).eval()
        got = streamed(pm, base)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()(input_ids=ids).logits
        torch.testing.assert_close(streamed(empty_model(AutoModelForCausalLM, config), base), plain,
                                   rtol=1e-5, atol=1e-5)
        assert (got - plain).abs().max() > 1e-3  # the adapter did change the logits


def test_forward_parity_streamed_equals_whole_models(setup, tmp_path, monkeypatch):
    """Two weighted adapters, and one with an Embedding LoRA and a modules_to_save lm_head: the
    streamed run's result is the whole-model run's, which is also the fallback where a model reads
    a weight outside its block's forward (nothing hooked here)."""
    from loratool.merge import forward
    from loratool.merge.parity import forward_parity
    from loratool.merge.specs import _specs, load_adapters

    s = setup["bf16"]
    mts = save_adapter(tiny_llama(torch.bfloat16), tmp_path / "mts", 4, r=4, lora_alpha=8,
                       target_modules=["k_proj", "embed_tokens"], modules_to_save=["lm_head"])
    merge(s["base"], str(mts), tmp_path / "merged", device="cpu")
    cases = [(s["merged"], load_adapters(_specs(s["spec"]))), (tmp_path / "merged", load_adapters(_specs(str(mts))))]
    streamed = [forward_parity(s["base"], merged, loaded) for merged, loaded in cases]
    monkeypatch.setattr(forward, "_units", lambda root: [])
    whole = [forward_parity(s["base"], merged, loaded) for merged, loaded in cases]
    assert all(r.ok and 0 < r.max_abs_diff < 0.01 * r.max_abs_logit for r in streamed)
    assert whole == streamed


def test_a_bound_past_float32s_range_does_not_pass_every_error():
    """The accumulation bound is computed in float32 for speed; where it overflows (a delta past
    3.4e38) it is computed again in float64, not left infinite (an infinite tolerance would pass
    any error: found in review)."""
    import numpy as np

    from loratool.merge import paritystream as P
    from loratool.quant import bnb as Q

    left, right = np.array([[1e20], [1.0]]), np.array([[1e20, 1.0]])
    f = P.BlockFactors(left, right, np.abs(left).astype(np.float32), np.abs(right).astype(np.float32), 1)
    w = np.zeros(4, np.uint16).tobytes()
    m = Q.to_dtype_bits(np.array([3.38e38, 1e20, 1e20, 1.0], np.float32), "BF16").tobytes()  # far from 1e40
    got = P.check_block(f, "BF16", "BF16", w, m, 0, 2)
    assert got.bad >= 1
