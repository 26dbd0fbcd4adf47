"""kohya / sd-scripts files: names, alpha, metadata, and what sd-scripts itself means by them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import sd as sdfix
from loratool.adapter import Adapter, LayerKind, LoraModule
from loratool.errors import FormatError, OutputError, UsageError
from loratool.formats import detect_format, kohya, load_adapter, sdnames
from loratool.safetensors_io import SafetensorsFile

# Real kohya module names -> the module they belong to. Every right-hand side (plus ".weight") is a
# key of a diffusers UNet2DConditionModel state dict (SD 1.5 config: blocks 320/640/1280/1280,
# CrossAttnDownBlock2D x3; SDXL config: blocks 320/640/1280, transformer_layers_per_block
# [1, 2, 10], linear projections) or of a CLIPTextModel state dict (transformers 4 naming, as in
# every SD checkpoint's text_encoder/model.safetensors). Checked with diffusers 0.42.1, whose own
# kohya conversion (_maybe_map_sgm_blocks_to_diffusers + _convert_non_diffusers_lora_to_diffusers)
# gives the same modules.
SD15_NAMES = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": "unet.down_blocks.0.attentions.0.proj_in",
    "lora_unet_down_blocks_0_attentions_0_proj_out": "unet.down_blocks.0.attentions.0.proj_out",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q":
        "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0":
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k":
        "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj":
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2":
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "lora_unet_mid_block_attentions_0_proj_in": "unet.mid_block.attentions.0.proj_in",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0":
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_k":
        "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_k",
    "lora_unet_up_blocks_3_attentions_2_proj_out": "unet.up_blocks.3.attentions.2.proj_out",
    "lora_unet_down_blocks_0_resnets_0_conv1": "unet.down_blocks.0.resnets.0.conv1",
    "lora_unet_down_blocks_0_resnets_1_conv2": "unet.down_blocks.0.resnets.1.conv2",
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": "unet.down_blocks.0.resnets.0.time_emb_proj",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "unet.down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_down_blocks_2_downsamplers_0_conv": "unet.down_blocks.2.downsamplers.0.conv",
    "lora_unet_up_blocks_2_upsamplers_0_conv": "unet.up_blocks.2.upsamplers.0.conv",
    "lora_unet_mid_block_resnets_1_conv2": "unet.mid_block.resnets.1.conv2",
    "lora_unet_conv_in": "unet.conv_in",
    "lora_unet_time_embedding_linear_1": "unet.time_embedding.linear_1",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "lora_te_text_model_encoder_layers_5_self_attn_v_proj": "text_encoder.text_model.encoder.layers.5.self_attn.v_proj",
    "lora_te_text_model_encoder_layers_11_self_attn_out_proj":
        "text_encoder.text_model.encoder.layers.11.self_attn.out_proj",
    "lora_te_text_model_encoder_layers_3_mlp_fc1": "text_encoder.text_model.encoder.layers.3.mlp.fc1",
}
SDXL_NAMES = {  # sd-scripts' SDXL UNet uses the original Stability (SGM) names
    "lora_unet_input_blocks_4_1_proj_in": "unet.down_blocks.1.attentions.0.proj_in",
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q":
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
    "lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_k":
        "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj":
        "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj",
    "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_v":
        "unet.mid_block.attentions.0.transformer_blocks.3.attn2.to_v",
    "lora_unet_middle_block_1_proj_out": "unet.mid_block.attentions.0.proj_out",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k":
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2":
        "unet.up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2",
    "lora_unet_output_blocks_5_1_proj_out": "unet.up_blocks.1.attentions.2.proj_out",
    "lora_unet_input_blocks_1_0_in_layers_2": "unet.down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_2_0_out_layers_3": "unet.down_blocks.0.resnets.1.conv2",
    "lora_unet_input_blocks_4_0_emb_layers_1": "unet.down_blocks.1.resnets.0.time_emb_proj",
    "lora_unet_input_blocks_4_0_skip_connection": "unet.down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
    "lora_unet_input_blocks_6_0_op": "unet.down_blocks.1.downsamplers.0.conv",
    "lora_unet_middle_block_0_in_layers_2": "unet.mid_block.resnets.0.conv1",
    "lora_unet_middle_block_2_emb_layers_1": "unet.mid_block.resnets.1.time_emb_proj",
    "lora_unet_output_blocks_0_0_skip_connection": "unet.up_blocks.0.resnets.0.conv_shortcut",
    "lora_unet_output_blocks_2_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_5_2_conv": "unet.up_blocks.1.upsamplers.0.conv",
    "lora_unet_output_blocks_8_0_out_layers_3": "unet.up_blocks.2.resnets.2.conv2",
    "lora_unet_time_embed_0": "unet.time_embedding.linear_1",
    "lora_unet_label_emb_0_2": "unet.add_embedding.linear_2",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "lora_te2_text_model_encoder_layers_31_mlp_fc1": "text_encoder_2.text_model.encoder.layers.31.mlp.fc1",
}
REAL_NAMES = set(SD15_NAMES.values()) | set(SDXL_NAMES.values())


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd")
    sdfix.generate(out, 1234)
    return out


# -- names --------------------------------------------------------------------------------------

@pytest.mark.parametrize("table", [SD15_NAMES, SDXL_NAMES], ids=["sd15", "sdxl_sgm"])
def test_kohya_names_map_to_real_diffusers_modules(table):
    for lora_name, expected in table.items():
        name, _ = kohya.module_name(lora_name)
        assert name == expected, lora_name


@pytest.mark.parametrize("fixture", ["kohya_sd.safetensors", "kohya_sdxl.safetensors"])
def test_fixture_modules_exist_in_diffusers_models(sd_files, fixture):
    adapter = load_adapter(sd_files / fixture)
    te2_ok = {"text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj"}  # CLIP-G layer 0 (32 layers)
    unknown = [n for n in adapter.modules if n not in REAL_NAMES | te2_ok | _fixture_extra()]
    assert not unknown


def _fixture_extra() -> set[str]:
    # the fixture's own modules, each a real SD 1.5 / SDXL module (see fixtures/sd.py comments)
    sd15 = {f"unet.{p}" for p, *_ in sdfix.SD_UNET} | {f"text_encoder.{p}" for p, *_ in sdfix.SD_TE}
    sdxl = {kohya.module_name("lora_unet_" + sdnames.to_kohya(p))[0] for p, *_ in sdfix.SDXL_UNET}
    sdxl |= {f"text_encoder.{p}" for p, *_ in sdfix.SDXL_TE1} | {f"text_encoder_2.{p}" for p, *_ in sdfix.SDXL_TE2}
    return sd15 | sdxl


@pytest.mark.parametrize("lora_name", sorted(SD15_NAMES) + sorted(SDXL_NAMES))
def test_names_round_trip(lora_name):
    name, sgm = kohya.module_name(lora_name)
    comp, path = name.split(".", 1)
    prefix, _, _ = kohya.split_prefix(lora_name)
    if sgm:
        path = sdnames.diffusers_to_sgm(path)
    assert prefix + sdnames.to_kohya(path) == lora_name
    # and dotted diffusers names survive the trip through kohya naming
    dotted = name.split(".", 1)[1]
    assert sdnames.from_kohya(sdnames.to_kohya(dotted)) == dotted


def test_token_aware_split_keeps_compound_words():
    assert sdnames.from_kohya("down_blocks_0_resnets_0_time_emb_proj") == "down_blocks.0.resnets.0.time_emb_proj"
    assert sdnames.from_kohya("conv_norm_out") == "conv_norm_out"
    assert sdnames.from_kohya("single_transformer_blocks_3_proj_mlp") == "single_transformer_blocks.3.proj_mlp"
    assert sdnames.from_kohya("transformer_blocks_3_ff_context_net_0_proj") == "transformer_blocks.3.ff_context.net.0.proj"
    # unknown words stay separate, but the trip back to kohya is exact anyway
    assert sdnames.to_kohya(sdnames.from_kohya("double_blocks_0_img_attn_qkv")) == "double_blocks_0_img_attn_qkv"


# -- reading ------------------------------------------------------------------------------------

def test_detect(sd_files):
    assert detect_format(sd_files / "kohya_sd.safetensors") == "kohya"
    assert detect_format(sd_files / "kohya_sdxl.safetensors") == "kohya"


def test_read_sd15(sd_files):
    a = load_adapter(sd_files / "kohya_sd.safetensors")
    assert a.format == "kohya"
    assert a.components == ("unet", "text_encoder")
    assert len(a) == len(sdfix.SD_UNET) + len(sdfix.SD_TE)
    conv = a.modules["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.kind is LayerKind.CONV2D and conv.rank == 2 and conv.alpha == 1.0 and conv.scale == 0.5
    assert conv.base_weight_shape == (32, 32, 3, 3)
    proj_in = a.modules["unet.down_blocks.0.attentions.0.proj_in"]
    assert proj_in.kind is LayerKind.CONV2D and proj_in.base_weight_shape == (32, 32, 1, 1)
    q = a.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert q.kind is LayerKind.LINEAR and (q.rank, q.alpha, q.scale) == (4, 1.0, 0.25)
    wide = a.modules["text_encoder.text_model.encoder.layers.11.self_attn.q_proj"]
    assert (wide.rank, wide.alpha, wide.scale) == (8, 8.0, 1.0)
    assert a.metadata["ss_network_module"] == "networks.lora"
    assert a.metadata["ss_base_model_version"] == "sd_v1"
    assert q.source_keys["lora_A"] == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"


def test_read_sdxl_maps_sgm_names(sd_files):
    a = load_adapter(sd_files / "kohya_sdxl.safetensors")
    assert a.components == ("unet", "text_encoder", "text_encoder_2")
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in a.modules
    assert "unet.up_blocks.0.upsamplers.0.conv" in a.modules
    assert a.config.sgm_unet and a.config.as_json()["unet_names"] == "sgm"
    assert a.dtypes() == {"BF16": 2 * len(a)}


@pytest.mark.parametrize("fixture", ["kohya_sd.safetensors", "kohya_sdxl.safetensors"])
def test_delta_is_what_sd_scripts_merges(sd_files, fixture):
    raw = load_file(sd_files / fixture)
    a = load_adapter(sd_files / fixture)
    for name, m in a.modules.items():
        key = m.source_keys["lora_A"][: -len(".lora_down.weight")]
        want = sdfix.sd_scripts_delta(raw[f"{key}.lora_down.weight"], raw[f"{key}.lora_up.weight"], raw[f"{key}.alpha"].item())
        torch.testing.assert_close(m.delta(torch.float64), want, rtol=0, atol=1e-12, msg=name)


def _save(tmp_path, tensors, metadata=None, name="lora.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata)
    return path


def test_missing_alpha_means_alpha_equals_rank_and_stays_missing(tmp_path):
    t = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8),
         "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4)}
    path = _save(tmp_path, t)
    a = load_adapter(path)
    m = a.modules["unet.mid_block.attentions.0.proj_in"]
    assert (m.alpha, m.scale) == (4.0, 1.0)
    out = kohya.write(a, tmp_path / "out.safetensors")
    assert set(SafetensorsFile(out).keys()) == set(t)


def test_write_back_is_bit_exact(sd_files, tmp_path):
    src = sd_files / "kohya_sdxl.safetensors"
    out = kohya.write(load_adapter(src), tmp_path / "same.safetensors")
    a, b = SafetensorsFile(src), SafetensorsFile(out)
    assert set(a.keys()) == set(b.keys())
    assert all(a.read_bytes(k) == b.read_bytes(k) and a.info(k).dtype == b.info(k).dtype for k in a.keys())
    assert a.metadata == b.metadata


@pytest.mark.parametrize("case, needle", [
    ("missing_up", "lora_up.weight is missing"),
    ("rank_mismatch", "A/B rank mismatch: lora_down has rank 4"),
    ("loha", "LyCORIS LoHa without hada_w1_b, hada_w2_a, hada_w2_b"),
    ("alpha_shape", "alpha must be one number"),
])
def test_problems_name_file_and_module(tmp_path, case, needle):
    n = "lora_unet_down_blocks_0_attentions_0_proj_in"
    t = {f"{n}.lora_down.weight": torch.randn(4, 8), f"{n}.lora_up.weight": torch.randn(8, 4), f"{n}.alpha": torch.tensor(1.0)}
    if case == "missing_up":
        del t[f"{n}.lora_up.weight"]
    elif case == "rank_mismatch":
        t[f"{n}.lora_up.weight"] = torch.randn(8, 3)
    elif case == "loha":
        t["lora_unet_mid_block_attentions_0_proj_out.hada_w1_a"] = torch.randn(8, 2)
    else:
        t[f"{n}.alpha"] = torch.ones(2)
    path = _save(tmp_path, t)
    with pytest.raises(FormatError) as e:
        load_adapter(path)
    assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)
    tolerant = load_adapter(path, tolerant=True)
    assert len(tolerant.problems) == 1


# -- writing ------------------------------------------------------------------------------------

def _module(name, rank=4, n_in=8, n_out=8, alpha=4.0, dtype=torch.float16, **kw):
    return LoraModule(name=name, kind=LayerKind.LINEAR, lora_A=torch.randn(rank, n_in).to(dtype),
                      lora_B=torch.randn(n_out, rank).to(dtype), alpha=alpha, **kw)


def test_alpha_is_written_in_the_factor_dtype_unless_inexact(tmp_path):
    a = Adapter(format="peft", modules={
        "unet.mid_block.attentions.0.proj_in": _module("unet.mid_block.attentions.0.proj_in", alpha=2.0),
        "unet.mid_block.attentions.0.proj_out": _module("unet.mid_block.attentions.0.proj_out", alpha=0.1),
    }, components=("unet",))
    out = kohya.write(a, tmp_path / "k.safetensors")
    st = SafetensorsFile(out)
    assert st.info("lora_unet_mid_block_attentions_0_proj_in.alpha").dtype == "F16"  # like sd-scripts' save dtype
    # 0.1 is exact in neither float16 nor float32: the scale must not change, so float64
    assert st.info("lora_unet_mid_block_attentions_0_proj_out.alpha").dtype == "F64"
    assert load_adapter(out).modules["unet.mid_block.attentions.0.proj_out"].alpha == 0.1


def test_rslora_scale_is_kept(tmp_path):
    m = _module("text_encoder.text_model.encoder.layers.0.mlp.fc1", rank=16, alpha=8.0, use_rslora=True)
    out = kohya.write(Adapter(format="peft", modules={m.name: m}, components=("text_encoder",)), tmp_path / "k.safetensors")
    back = load_adapter(out).modules[m.name]
    assert back.scale == pytest.approx(m.scale) and back.alpha == pytest.approx(8.0 * math.sqrt(16))


@pytest.mark.parametrize("change, needle", [
    (lambda a: a.__setattr__("components", ()), "has no model components"),
    (lambda a: next(iter(a.modules.values())).__setattr__("magnitude", torch.ones(8)), "is DoRA"),
    (lambda a: a.modules_to_save.__setitem__("unet.conv_out.weight", torch.ones(2)), "not LoRA factors"),
])
def test_write_refuses_what_kohya_cannot_hold(tmp_path, change, needle):
    m = _module("unet.mid_block.attentions.0.proj_in")
    a = Adapter(format="peft", modules={m.name: m}, components=("unet",))
    change(a)
    with pytest.raises(UsageError, match=needle):
        kohya.write(a, tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()


def test_write_output_errors(sd_files, tmp_path):
    a = load_adapter(sd_files / "kohya_sd.safetensors")
    with pytest.raises(OutputError, match="is a directory"):
        kohya.write(a, tmp_path)
    kohya.write(a, tmp_path / "x.safetensors")
    with pytest.raises(OutputError, match="already exists"):
        kohya.write(a, tmp_path / "x.safetensors")
    kohya.write(a, tmp_path / "x.safetensors", overwrite=True)


def test_layout_travels_in_metadata(sd_files):
    a = load_adapter(sd_files / "kohya_sdxl.safetensors")
    md = kohya.carry_metadata(a)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(md[kohya.LAYOUT_KEY])["unet_names"] == "sgm"
