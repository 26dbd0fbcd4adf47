"""``parity`` of a ``merge --base-precision`` output (issue 16): the tensors are checked against
round(dequant(quant(W)) + ΔW), and ``--forward`` compares with the QLoRA model as trained (the base's
Linears in 4 bits through bitsandbytes, the adapter unmerged through PEFT).

The adapter is the fixtures' all-linear llama_r8 with lora_B scaled down, so that the quantization
term W − dequant(quant(W)) outweighs the adapter's delta in every tensor: there, a plain 16-bit merge
is far from the QLoRA model and the --base-precision merge is as close as the output's dtype holds.
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from loratool.cli import main  # noqa: E402
from loratool.merge import merge  # noqa: E402
from loratool.merge.parity import check_parity, forward_parity  # noqa: E402
from loratool.merge.specs import _specs, load_adapters  # noqa: E402
from loratool.quant.bnb import parse_precision  # noqa: E402

NF4 = "nf4,blocksize=64,double-quant"


def _scaled_adapter(src, dst, factor: float, keep=None):
    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    t = {k: (v * factor if "lora_B" in k else v) for k, v in load_file(str(f)).items()
         if keep is None or any(m in k for m in keep)}
    save_file(t, str(f), metadata={"format": "pt"})
    if keep is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg["target_modules"] = [m for m in cfg["target_modules"] if any(k in m for k in keep)]
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def qp(fixtures_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_parity")
    base16 = fixtures_dir / "base_llama"  # bfloat16
    base32 = root / "base32"
    shutil.copytree(base16, base32)
    for f in base32.glob("*.safetensors"):
        save_file({k: v.float() for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    adapter = _scaled_adapter(fixtures_dir / "llama_r8", root / "tiny", 0.02)
    out = {"base16": base16, "base32": base32, "adapter": adapter, "root": root}
    for tag, base in (("16", base16), ("32", base32)):
        nf4 = merge(base, str(adapter), root / f"nf4_{tag}", device="cpu", base_precision=NF4)
        assert nf4.quantization and all(q.quant_over_delta > 1 for q in nf4.quantization)  # q dominates
        merge(base, str(adapter), root / f"plain_{tag}", device="cpu")
    out["loaded"] = load_adapters(_specs([str(adapter)]))
    return out


@pytest.fixture(scope="module")
def nf4_32(qp):
    """The float32 base's nf4 merge against the QLoRA model through bitsandbytes, streamed."""
    return forward_parity(qp["base32"], qp["root"] / "nf4_32", qp["loaded"], base_precision=parse_precision(NF4))


def run(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(["parity", *map(str, args)])
    return e.value.code, capsys.readouterr().out


def test_parity_forward_compares_with_the_qlora_model(qp, capsys):
    """bf16 base: the precision comes from the merged checkpoint's lineage; the merged model is
    within bf16 rounding of the QLoRA model (bitsandbytes + PEFT); the plain merge is far off."""
    code, out = run(capsys, "--base", qp["base16"], "--merged", qp["root"] / "nf4_16", "--adapters", qp["adapter"],
                    "--forward", "--json")
    report = json.loads(out)
    assert code == 0, out
    assert report["base_precision"] == NF4
    assert report["max_err_over_tol"] <= 1
    fw = report["forward"]
    assert fw["reference"].startswith("qlora: nf4, blocksize 64, double-quant, via bitsandbytes 0.")
    assert "+ peft" in fw["reference"] and fw["notes"] == []
    assert fw["top1_agreement"] == 1.0
    # merged weights rounded to bfloat16 (dequant(quant(W)) and the sum: ½ ulp = 2⁻⁹ relative each)
    assert fw["max_abs_diff"] <= 2 ** -7 * fw["max_abs_logit"]

    plain = forward_parity(qp["base16"], qp["root"] / "plain_16", qp["loaded"], base_precision=parse_precision(NF4))
    assert plain.reference == fw["reference"]
    assert plain.max_abs_diff > 10 * fw["max_abs_diff"]
    assert plain.top1_agreement < fw["top1_agreement"]


def test_float32_base_merge_equals_the_qlora_model_to_float32_rounding(qp, nf4_32):
    """A float32 base: the merge's dequant(quant(W)) is the float32 code·absmax bitsandbytes
    multiplies by, so the merged model's logits are PEFT + bitsandbytes' to float32 rounding."""
    spec = parse_precision(NF4)
    nf4 = nf4_32
    plain = forward_parity(qp["base32"], qp["root"] / "plain_32", qp["loaded"], base_precision=spec)
    assert "via bitsandbytes" in nf4.reference
    assert nf4.top1_agreement == 1.0 and nf4.max_abs_diff <= 1e-5
    assert plain.max_abs_diff > 1000 * max(nf4.max_abs_diff, 1e-6)
    assert plain.top1_agreement < 1.0


def test_without_bitsandbytes_the_reference_is_loratools_quantization(qp, nf4_32, monkeypatch):
    """bitsandbytes absent: plain Linears holding loratool's code·absmax, PEFT's plain LoRA layers;
    the same logits as through bitsandbytes (float32 rounding), and the report says so."""
    from loratool.merge import qlora_forward

    with_bnb = nf4_32
    monkeypatch.setattr(qlora_forward, "bnb_version", lambda: None)
    report = check_parity(qp["base32"], qp["root"] / "nf4_32", str(qp["adapter"]), forward=True)
    fw = report.forward
    assert report.ok and report.base_precision == NF4
    assert "via loratool's dequant(quant(W)) + peft" in fw.reference and "bitsandbytes not installed" in fw.reference
    assert fw.max_abs_diff <= 1e-5 and abs(fw.max_abs_diff - with_bnb.max_abs_diff) <= 1e-6


def test_the_qlora_reference_streamed_equals_the_whole_model(qp, nf4_32, monkeypatch):
    """Nothing hooked (as for a model that reads a weight outside its block): the 4-bit weights
    are made on a model loaded whole, with the same result as streamed."""
    from loratool.merge import forward

    streamed = nf4_32
    monkeypatch.setattr(forward, "_units", lambda root: [])
    whole = forward_parity(qp["base32"], qp["root"] / "nf4_32", qp["loaded"], base_precision=parse_precision(NF4))
    assert whole.reference == streamed.reference
    assert abs(whole.max_abs_diff - streamed.max_abs_diff) <= 1e-6
    assert whole.top1_agreement == streamed.top1_agreement


def test_base_precision_option_overrides_the_lineage(qp, capsys):
    base, a, root = qp["base16"], qp["adapter"], qp["root"]
    code, out = run(capsys, "--base", base, "--merged", root / "nf4_16", "--adapters", a, "--json",
                    "--base-precision", "keep")
    assert code == 1 and json.loads(out)["base_precision"] == "keep"  # W + ΔW: not what was written
    code, out = run(capsys, "--base", base, "--merged", root / "plain_16", "--adapters", a, "--json",
                    "--base-precision", NF4)
    assert code == 1 and json.loads(out)["base_precision"] == NF4
    code, out = run(capsys, "--base", base, "--merged", root / "plain_16", "--adapters", a, "--json")
    assert code == 0 and json.loads(out)["base_precision"] == "keep"
    with pytest.raises(SystemExit) as e:
        main(["parity", "--base", str(base), "--merged", str(root / "plain_16"), "--adapters", str(a),
              "--base-precision", "nf4,blocksize=7"])
    assert e.value.code == 2
    assert "--base-precision nf4,blocksize=7: blocksize '7'" in capsys.readouterr().err


def test_notes_name_weights_the_merge_and_the_qlora_model_hold_differently(qp, tmp_path):
    """The merge requantizes the weights it changes only; the QLoRA model quantizes every Linear
    but lm_head."""
    import transformers

    from loratool.checkpoint import BaseCheckpoint
    from loratool.merge.forward import empty_model
    from loratool.merge.parity import _qlora_notes
    from loratool.merge.qlora_forward import quantize_empty

    spec = parse_precision(NF4)
    config = transformers.AutoConfig.from_pretrained(str(qp["base16"]))
    q = quantize_empty(empty_model(transformers.AutoModelForCausalLM, config), spec, via_bnb=False)
    assert len(q.names) == 14 and "lm_head.weight" not in q.names  # 2 layers × 7 Linears

    qv = _scaled_adapter(qp["adapter"], tmp_path / "qv", 1.0, keep=("q_proj", "v_proj"))
    loaded = load_adapters(_specs([str(qv)]))
    base = BaseCheckpoint(qp["base16"])
    notes = _qlora_notes(base, loaded, spec, q.names)
    assert len(notes) == 1 and notes[0].startswith("10 Linear weights no adapter changes (model.layers.0.mlp")
    notes = _qlora_notes(base, qp["loaded"], spec, [n for n in q.names if "layers.1.mlp.up_proj" not in n])
    assert notes == ["model.layers.1.mlp.up_proj.weight: the merge added the delta to dequant(quant(W)); the QLoRA "
                     "model keeps these in 16 bits (transformers does not quantize them)"]


def test_a_base_precision_merge_is_streamed_and_one_changed_element_fails(qp, tmp_path, monkeypatch):
    """parity of a --base-precision merge takes the numpy stream (paritystream, the base rows through
    the merge's round trip), not torch's per-tensor check, and a merged element moved by one bf16
    ulp off round(dequant(quant(W)) + ΔW) is caught, named by its tensor."""
    from loratool.merge import parity as parity_mod

    def no_torch_check(*a, **k):
        raise AssertionError("a --base-precision merge went to the torch check")

    monkeypatch.setattr(parity_mod, "_check_merge", no_torch_check)
    report = check_parity(qp["base16"], qp["root"] / "nf4_16", [str(qp["adapter"])])
    assert report.ok and report.base_precision == NF4 and report.layers
    assert all(lay.max_err_over_tol <= 0.5 for lay in report.layers)
    # the same merge, one element of one tensor a bf16 ulp away
    bad = tmp_path / "bad"
    shutil.copytree(qp["root"] / "nf4_16", bad)
    name = report.layers[0].name
    f = next(f for f in sorted(bad.glob("*.safetensors")) if name in load_file(str(f)))
    t = load_file(str(f))
    w = t[name].clone()
    w.view(torch.int16).view(-1)[7] += 1
    t[name] = w
    save_file(t, str(f), metadata={"format": "pt"})
    worse = check_parity(qp["base16"], bad, [str(qp["adapter"])])
    assert not worse.ok and [lay.name for lay in worse.layers if not lay.ok] == [name]
