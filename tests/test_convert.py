"""`loratool convert`: kohya <-> PEFT <-> diffusers, bit for bit where we promise it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures import sd as sdfix
from loratool.adapter import Adapter, LayerKind, LoraModule
from loratool.cli import main
from loratool.convert import convert
from loratool.errors import UsageError
from loratool.formats import load_adapter, peft
from loratool.safetensors_io import SafetensorsFile

KOHYA = ["kohya_sd.safetensors", "kohya_sdxl.safetensors"]


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd")
    sdfix.generate(out, 1234)
    return out


def assert_same_file(a_path, b_path, metadata=True):
    a, b = SafetensorsFile(a_path), SafetensorsFile(b_path)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        assert (a.info(k).dtype, a.info(k).shape) == (b.info(k).dtype, b.info(k).shape), k
        assert a.read_bytes(k) == b.read_bytes(k), k
    if metadata:
        # everything the source carried comes back; loratool adds only its own manifest
        # (lineage: converted twice), which a source made elsewhere does not have
        ours = "loratool.manifest"
        assert {k: v for k, v in b.metadata.items() if k != ours} == {k: v for k, v in a.metadata.items() if k != ours}
        assert ours in b.metadata


@pytest.mark.parametrize("via", ["peft", "diffusers"])
@pytest.mark.parametrize("fixture", KOHYA)
def test_kohya_round_trip_is_bit_exact(sd_files, tmp_path, fixture, via):
    src = sd_files / fixture
    mid = convert(src, via, tmp_path / "mid")
    assert mid.format == via and mid.num_modules == len(load_adapter(src))
    back = convert(mid.output, "kohya", tmp_path / "back.safetensors")
    # same keys, dtypes, shapes and bytes (alpha included), same ss_* / modelspec.* metadata
    assert_same_file(src, back.output)
    assert any(k.startswith("ss_") for k in SafetensorsFile(back.output).metadata)


def test_sd_peft_adapter_round_trips(sd_files, tmp_path):
    src = load_adapter(sd_files / "kohya_sd.safetensors")
    first = convert(sd_files / "kohya_sd.safetensors", "peft", tmp_path / "p1").output
    assert sorted(p.name for p in first.iterdir()) == ["loratool.json", "text_encoder", "unet"]
    a = load_adapter(first)
    assert a.format == "peft" and set(a.components) == {"unet", "text_encoder"}
    assert {n: (m.kind, m.rank, m.alpha) for n, m in a.modules.items()} == \
        {n: (m.kind, m.rank, m.alpha) for n, m in src.modules.items()}
    second = convert(first, "peft", tmp_path / "p2").output
    for comp in ("unet", "text_encoder"):
        assert json.loads((first / comp / peft.CONFIG).read_text()) == json.loads((second / comp / peft.CONFIG).read_text())
        assert_same_file(first / comp / peft.WEIGHTS, second / comp / peft.WEIGHTS)


def _tree(modules: dict[str, LoraModule], strip: str) -> torch.nn.Module:
    root = torch.nn.Module()
    for name, m in modules.items():
        *parents, leaf = name[len(strip):].split(".")
        node = root
        for p in parents:
            if p not in node._modules:
                node.add_module(p, torch.nn.Module())
            node = node._modules[p]
        s = m.base_weight_shape
        node.add_module(leaf, torch.nn.Linear(s[1], s[0]) if m.kind is LayerKind.LINEAR
                        else torch.nn.Conv2d(s[1], s[0], s[2:], padding=s[2] // 2))
    return root


def test_peft_applies_the_kohya_scale(sd_files, tmp_path):
    """PEFT, loading the converted directory, adds to each weight what sd-scripts adds."""
    from peft import PeftModel

    src_path = sd_files / "kohya_sd.safetensors"
    raw = load_file(src_path)
    src = load_adapter(src_path)
    out = convert(src_path, "peft", tmp_path / "p").output
    torch.manual_seed(0)
    for comp in src.components:
        mods = {n: m for n, m in src.modules.items() if n.startswith(comp + ".")}
        model = _tree(mods, comp + ".").double()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        merged = PeftModel.from_pretrained(model, str(out / comp)).double().merge_and_unload()
        after = merged.state_dict()
        for name, m in mods.items():
            key = m.source_keys["lora_A"][: -len(".lora_down.weight")]
            want = sdfix.sd_scripts_delta(raw[f"{key}.lora_down.weight"], raw[f"{key}.lora_up.weight"], raw[f"{key}.alpha"].item())
            w = name[len(comp) + 1:] + ".weight"
            torch.testing.assert_close(after[w] - before[w], want, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("fixture", ["diffusers_sd", "diffusers_old.safetensors"])
def test_diffusers_through_kohya(sd_files, tmp_path, fixture):
    src = load_adapter(sd_files / fixture)
    k = convert(sd_files / fixture, "kohya", tmp_path / "k.safetensors").output
    back = load_adapter(convert(k, "diffusers", tmp_path / "d").output)
    assert set(back.modules) == set(src.modules)
    for name, m in src.modules.items():
        b = back.modules[name]
        assert (b.kind, b.rank, b.alpha) == (m.kind, m.rank, m.alpha)
        assert b.lora_A.raw() == m.lora_A.raw() and b.lora_B.raw() == m.lora_B.raw()
    # diffusers files carry no alpha tensor; kohya gets one, in the factors' dtype
    assert SafetensorsFile(k).info(next(x for x in SafetensorsFile(k).keys() if x.endswith(".alpha"))).dtype == "F32"


def test_kohya_alpha_layout_survives_other_formats(tmp_path):
    """float32 alphas beside float16 factors, no alpha on one module, lora_te1_ without lora_te2_."""
    from safetensors.torch import save_file

    n1, n2 = "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_mid_block_attentions_0_proj_in"
    t = {f"{n1}.lora_down.weight": torch.randn(4, 8).half(), f"{n1}.lora_up.weight": torch.randn(8, 4).half(),
         f"{n1}.alpha": torch.tensor(2.0), f"{n2}.lora_down.weight": torch.randn(2, 8).half(),
         f"{n2}.lora_up.weight": torch.randn(8, 2).half()}
    src = tmp_path / "k.safetensors"
    save_file(t, src, {"ss_network_dim": "4"})
    for via in ("peft", "diffusers"):
        mid = convert(src, via, tmp_path / via).output
        assert_same_file(src, convert(mid, "kohya", tmp_path / f"{via}.safetensors").output)


def _llm_peft(tmp_path):
    m = LoraModule(name="model.layers.0.self_attn.q_proj", kind=LayerKind.LINEAR, lora_A=torch.randn(4, 8),
                   lora_B=torch.randn(8, 4), alpha=8.0)
    return peft.write(Adapter(format="peft", modules={m.name: m}), tmp_path / "llm")


def test_cli_prints_one_line(sd_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(sd_files / "kohya_sd.safetensors"), "--to", "diffusers", "-o", str(tmp_path / "d")])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "26 modules" in out[0] and "diffusers" in out[0] and str(tmp_path / "d") in out[0]
    assert (tmp_path / "d" / "pytorch_lora_weights.safetensors").exists()


def test_cli_json_is_the_result_model(sd_files, tmp_path, capsys):
    import jsonschema

    from loratool.schemas.convert import ConvertResult
    from loratool.schemas.export import SCHEMA_DIR

    src = sd_files / "kohya_sd.safetensors"
    with pytest.raises(SystemExit) as e:
        main(["convert", str(src), "--to", "peft", "-o", str(tmp_path / "p"), "--json"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"input": str(src), "input_format": "kohya", "format": "peft", "output": str(tmp_path / "p"),
                   "num_modules": 26, "components": out["components"], "conversions": []}
    assert out["components"] and ConvertResult.model_validate(out).output == tmp_path / "p"
    jsonschema.validate(out, json.loads((SCHEMA_DIR / "convert-result.schema.json").read_text()))


@pytest.mark.parametrize("args, needle", [
    (lambda sd, tmp: [str(_llm_peft(tmp)), "--to", "diffusers", "-o", str(tmp / "x")], "no pipeline components"),
    (lambda sd, tmp: [str(_llm_peft(tmp)), "--to", "kohya", "-o", str(tmp / "x.safetensors")], "no model components"),
    (lambda sd, tmp: [str(sd / "kohya_sd.safetensors"), "--to", "peft", "-o", str(tmp)], "already exists"),
    (lambda sd, tmp: [str(tmp / "nope"), "--to", "peft", "-o", str(tmp / "x")], "no such file"),
])
def test_cli_errors_are_one_line(sd_files, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main(["convert", *args(sd_files, tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loratool: error:") and needle in err[0]


def test_a_unet_peft_saved_converts_with_component(sd_files, tmp_path, capsys):
    """A UNet adapter as PEFT saves it (no component in its names) converts to kohya and diffusers
    with --component unet: the kohya file holds exactly the original file's UNet keys and bytes,
    and without --component the refusal says what to pass (issue 13)."""
    src = sd_files / "kohya_sd.safetensors"
    peft_dir = convert(src, "peft", tmp_path / "p").output / "unet"  # one sub-directory per component
    with pytest.raises(UsageError) as e:
        convert(peft_dir, "kohya", tmp_path / "refused.safetensors")
    assert "--component unet" in str(e.value) and not (tmp_path / "refused.safetensors").exists()
    back = convert(peft_dir, "kohya", tmp_path / "unet.safetensors", component="unet").output
    orig, got = SafetensorsFile(src), SafetensorsFile(back)
    unet_keys = {k for k in orig.keys() if k.startswith("lora_unet_")}
    assert set(got.keys()) == unet_keys
    assert all(orig.read_bytes(k) == got.read_bytes(k) for k in unet_keys)
    d = convert(peft_dir, "diffusers", tmp_path / "d", component="unet")
    assert d.components == ["unet"] and d.num_modules == len({k.split(".")[0] for k in unet_keys})
    with pytest.raises(UsageError) as e:
        convert(src, "diffusers", tmp_path / "x", component="unet")
    assert "already holds components" in str(e.value)
    with pytest.raises(UsageError):
        convert(peft_dir, "kohya", tmp_path / "y.safetensors", component="vae")
