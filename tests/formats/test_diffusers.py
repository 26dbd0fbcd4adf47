"""diffusers LoRA files: the three key generations, alpha from lora_adapter_metadata, and what
diffusers' loader (PEFT's LoraConfig, built from that metadata) makes of what we write."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fixtures import sd as sdfix
from loratool.adapter import Adapter, LayerKind, LoraModule
from loratool.errors import FormatError, UsageError
from loratool.formats import detect_format, diffusers, load_adapter
from loratool.safetensors_io import SafetensorsFile


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd")
    sdfix.generate(out, 1234)
    return out


def _save(tmp_path, tensors, metadata=None, name="lora.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata)
    return path


def test_detect(sd_files):
    assert detect_format(sd_files / "diffusers_sd") == "diffusers"
    assert detect_format(sd_files / "diffusers_sd" / diffusers.WEIGHTS) == "diffusers"
    assert detect_format(sd_files / "diffusers_old.safetensors") == "diffusers"


def test_alpha_from_lora_adapter_metadata(sd_files):
    a = load_adapter(sd_files / "diffusers_sd")
    assert a.components == ("unet", "text_encoder")
    q = a.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert (q.rank, q.alpha, q.scale) == (4, 8.0, 2.0)
    proj_in = a.modules["unet.down_blocks.0.attentions.0.proj_in"]  # alpha_pattern
    assert proj_in.kind is LayerKind.CONV2D and (proj_in.alpha, proj_in.scale) == (4.0, 1.0)
    mid = a.modules["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]  # rank_pattern
    assert (mid.rank, mid.config_rank, mid.alpha) == (2, 2, 8.0)
    fc1 = a.modules["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    assert (fc1.alpha, fc1.scale) == (4.0, 1.0)


def test_old_names_and_no_alpha(sd_files):
    a = load_adapter(sd_files / "diffusers_old.safetensors")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in a.modules
    assert "text_encoder.text_model.encoder.layers.0.self_attn.out_proj" in a.modules
    assert all(m.alpha == m.rank and m.scale == 1.0 for m in a.modules.values())  # diffusers: scale 1


def test_attention_processor_names(tmp_path):
    t = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": torch.randn(4, 8),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": torch.randn(8, 4),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": torch.randn(4, 8),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": torch.randn(8, 4),
    }
    a = load_adapter(_save(tmp_path, t))
    assert sorted(a.modules) == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"]


def test_flattened_clip_names_and_alpha_tensors(tmp_path):
    # a text encoder saved from transformers 5's flattened CLIPTextModel ("encoder.layers…"), and
    # ".alpha" tensors as some converters leave them
    t = {"text_encoder.encoder.layers.3.mlp.fc2.lora_A.weight": torch.randn(4, 8),
         "text_encoder.encoder.layers.3.mlp.fc2.lora_B.weight": torch.randn(8, 4),
         "text_encoder.encoder.layers.3.mlp.fc2.alpha": torch.tensor(2.0)}
    a = load_adapter(_save(tmp_path, t))
    m = a.modules["text_encoder.text_model.encoder.layers.3.mlp.fc2"]
    assert m.alpha == 2.0


def test_model_level_file_without_prefixes(tmp_path):
    t = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 8),
         "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 4)}
    md = {diffusers.METADATA_KEY: json.dumps({"r": 4, "lora_alpha": 16, "target_modules": ["to_q"]})}
    a = load_adapter(_save(tmp_path, t, md), format="diffusers")
    assert a.components == () and a.modules["transformer_blocks.0.attn.to_q"].alpha == 16.0


@pytest.mark.parametrize("case, needle", [
    ("missing_B", "lora_B is missing"),
    ("rank_mismatch", "A/B rank mismatch"),
    ("not_lora", "is not a LoRA factor"),
])
def test_problems(tmp_path, case, needle):
    n = "unet.mid_block.attentions.0.proj_in"
    t = {f"{n}.lora_A.weight": torch.randn(4, 8), f"{n}.lora_B.weight": torch.randn(8, 4)}
    if case == "missing_B":
        del t[f"{n}.lora_B.weight"]
        t["unet.mid_block.attentions.0.proj_out.lora_A.weight"] = torch.randn(4, 8)
        t["unet.mid_block.attentions.0.proj_out.lora_B.weight"] = torch.randn(8, 4)
    elif case == "rank_mismatch":
        t[f"{n}.lora_B.weight"] = torch.randn(8, 2)
    else:
        t["unet.conv_in.weight"] = torch.randn(2, 2)
    path = _save(tmp_path, t)
    with pytest.raises(FormatError) as e:
        load_adapter(path, format="diffusers")
    assert str(path) in str(e.value) and needle in str(e.value)


def test_corrupt_metadata_is_one_clear_error(tmp_path):
    t = {"unet.conv_in.lora_A.weight": torch.randn(2, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.randn(8, 2, 1, 1)}
    path = _save(tmp_path, t, {diffusers.METADATA_KEY: "{not json"})
    with pytest.raises(FormatError, match="lora_adapter_metadata': not valid JSON"):
        load_adapter(path)


# -- writing ------------------------------------------------------------------------------------

def _tree(modules: dict[str, LoraModule], strip: str, drop_text_model: bool = False) -> torch.nn.Module:
    """A bare nn.Module with a layer at each module's path (no diffusers, no transformers needed)."""
    root = torch.nn.Module()
    for name, m in modules.items():
        path = name[len(strip):]
        if drop_text_model:
            path = path.removeprefix("text_model.")
        *parents, leaf = path.split(".")
        node = root
        for p in parents:
            if p not in node._modules:
                node.add_module(p, torch.nn.Module())
            node = node._modules[p]
        shape = m.base_weight_shape
        layer = torch.nn.Linear(shape[1], shape[0]) if m.kind is LayerKind.LINEAR else \
            torch.nn.Conv2d(shape[1], shape[0], shape[2:], padding=shape[2] // 2)
        node.add_module(leaf, layer)
    return root


@pytest.mark.parametrize("drop_text_model", [False, True], ids=["transformers4_clip", "transformers5_clip"])
def test_written_metadata_gives_diffusers_our_scale(sd_files, tmp_path, drop_text_model):
    """diffusers builds LoraConfig(**metadata of the component) and lets PEFT inject it: do that."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    src = load_adapter(sd_files / "kohya_sd.safetensors")
    out = diffusers.write(src, tmp_path / "d")
    st = SafetensorsFile(out / diffusers.WEIGHTS)
    flat = json.loads(st.metadata[diffusers.METADATA_KEY])
    assert st.metadata["ss_network_module"] == "networks.lora" and st.metadata["format"] == "pt"
    for comp in src.components:
        fields = {k[len(comp) + 1:]: v for k, v in flat.items() if k.startswith(comp + ".")}
        mods = {n: m for n, m in src.modules.items() if n.startswith(comp + ".")}
        model = _tree(mods, comp + ".", drop_text_model and comp == "text_encoder")
        inject_adapter_in_model(LoraConfig(**fields), model, adapter_name="x")
        seen = 0
        for path, layer in model.named_modules():
            if isinstance(layer, LoraLayer):
                name = f"{comp}.{'text_model.' if drop_text_model and comp == 'text_encoder' else ''}{path}"
                m = src.modules[name]
                assert (layer.r["x"], layer.scaling["x"]) == (m.rank, m.scale), name
                seen += 1
        assert seen == len(mods)


def test_round_trip_is_exact(sd_files, tmp_path):
    src = load_adapter(sd_files / "diffusers_sd")
    out = diffusers.write(src, tmp_path / "again.safetensors")  # a file name writes a file
    assert out.is_file()
    back = load_adapter(out)
    a, b = SafetensorsFile(sd_files / "diffusers_sd" / diffusers.WEIGHTS), SafetensorsFile(out)
    assert set(a.keys()) == set(b.keys()) and all(a.read_bytes(k) == b.read_bytes(k) for k in a.keys())
    assert {n: (m.rank, m.alpha) for n, m in back.modules.items()} == {n: (m.rank, m.alpha) for n, m in src.modules.items()}


def test_refuses_adapters_without_components(tmp_path):
    m = LoraModule(name="model.layers.0.self_attn.q_proj", kind=LayerKind.LINEAR, lora_A=torch.randn(4, 8),
                   lora_B=torch.randn(8, 4), alpha=8.0)
    with pytest.raises(UsageError, match="no pipeline components .* use --to peft"):
        diffusers.write(Adapter(format="peft", modules={m.name: m}), tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_flattened_clip_names_are_written_in_checkpoint_naming(tmp_path):
    from loratool.formats import kohya

    m = LoraModule(name="text_encoder.encoder.layers.0.mlp.fc1", kind=LayerKind.LINEAR, lora_A=torch.randn(4, 8),
                   lora_B=torch.randn(8, 4), alpha=4.0)
    a = Adapter(format="peft", modules={m.name: m}, components=("text_encoder",))
    d = SafetensorsFile(diffusers.write(a, tmp_path / "d.safetensors"))
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight" in d.keys()
    k = SafetensorsFile(kohya.write(a, tmp_path / "k.safetensors"))
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in k.keys()
