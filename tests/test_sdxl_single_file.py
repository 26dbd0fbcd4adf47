"""SDXL LoRAs with text_encoder_2 modules merged into a single-file SDXL checkpoint (issue 13).

There text_encoder_2 is OpenCLIP: q, k and v of each layer are rows [0, d), [d, 2d) and [2d, 3d) of
one fused ``attn.in_proj_weight`` [3d, d] (and ``in_proj_bias``), out_proj/fc1/fc2 are
``attn.out_proj``/``mlp.c_fc``/``mlp.c_proj``. The name rule (``BaseCheckpoint.target``) makes a
q/k/v module's target a block of rows; the merge computes those rows as the unfused tensor would
be, and copies the rows no module changes.

A tiny SDXL pipeline is built from real diffusers/transformers classes (UNet2DConditionModel,
CLIPTextModel, CLIPTextModelWithProjection) and the same weights written as one file with the
SGM/LDM names, q/k/v fused as the real conversion does; diffusers' own single-file converters
(``convert_ldm_unet_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``)
read the file back to the pipeline's tensors, before the merge and after it: the merge into the
single file must be the merge into the pipeline folder, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from fixtures import sd as sdfix  # noqa: E402
from loratool.checkpoint import BaseCheckpoint, Target  # noqa: E402
from loratool.errors import MisfitError  # noqa: E402
from loratool.formats import load_adapter, sdnames  # noqa: E402
from loratool.merge import merge, unmerge  # noqa: E402
from loratool.merge.parity import check_parity  # noqa: E402
from loratool.safetensors_io import SafetensorsFile  # noqa: E402

U, TE1, TE2 = "model.diffusion_model.", "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
XL_UNET = dict(block_out_channels=(32, 48, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
               "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 2), use_linear_projection=True, cross_attention_dim=72,
               addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=88)
D2 = 40  # text_encoder_2's width: in_proj_weight is [120, 40]
# (diffusers module, kernel or None) of the UNet that the LoRA changes
UNET_MODULES = [
    ("down_blocks.1.attentions.0.proj_in", None),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", None),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", None),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", None),
    ("down_blocks.2.attentions.0.transformer_blocks.1.ff.net.2", None),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", None),
    ("up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_k", None),
    ("down_blocks.1.resnets.0.time_emb_proj", None),
    ("down_blocks.0.resnets.0.conv1", 3),
]
TE1_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2"]
# layer 0: every module; layer 1: k only (rows [0, 40) and [80, 120) of its in_proj_weight stay the base's)
TE2_MODULES = [f"text_model.encoder.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                           "self_attn.out_proj", "mlp.fc1", "mlp.fc2")] \
    + ["text_model.encoder.layers.1.self_attn.k_proj"]
RANKS = {"linear": (8, 4.0), "conv": (4, 2.0)}


def _open_clip(te2: dict) -> dict:
    """text_encoder_2's transformers tensors under SDXL's OpenCLIP names, q/k/v fused by rows (as
    sd-scripts' and diffusers' converters split them: q, then k, then v)."""
    out = {}
    layers = {int(k.split(".")[3]) for k in te2 if k.startswith("text_model.encoder.layers.")}
    for n in sorted(layers):
        h, r = f"text_model.encoder.layers.{n}.", f"{TE2}transformer.resblocks.{n}."
        for leaf in ("weight", "bias"):
            out[f"{r}attn.in_proj_{leaf}"] = torch.cat([te2[f"{h}self_attn.{p}_proj.{leaf}"] for p in "qkv"]).contiguous()
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                                 ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
                out[f"{r}{theirs}.{leaf}"] = te2[f"{h}{ours}.{leaf}"]
    out[TE2 + "token_embedding.weight"] = te2["text_model.embeddings.token_embedding.weight"]
    out[TE2 + "positional_embedding"] = te2["text_model.embeddings.position_embedding.weight"]
    out[TE2 + "ln_final.weight"] = te2["text_model.final_layer_norm.weight"]
    out[TE2 + "ln_final.bias"] = te2["text_model.final_layer_norm.bias"]
    out[TE2 + "text_projection"] = te2["text_projection.weight"].T.contiguous()  # OpenCLIP: x @ P
    return out


def _to_pipeline(ldm: dict, models: dict) -> dict[str, dict]:
    """A single file's tensors as the pipeline's, by diffusers' own single-file converters."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_open_clip_checkpoint)

    return {"unet": convert_ldm_unet_checkpoint(dict(ldm), dict(models["unet"].config)),
            "text_encoder": convert_ldm_clip_checkpoint(dict(ldm)),
            "text_encoder_2": convert_open_clip_checkpoint(models["text_encoder_2"], dict(ldm), prefix=TE2)}


def _bits(t) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same_as_pipeline(ldm_file: Path, pipe: Path, models: dict) -> int:
    """Every tensor the converters read from ``ldm_file`` equals the pipeline folder's, bit for
    bit; how many."""
    got = _to_pipeline(load_file(ldm_file), models)
    n = 0
    for comp, tensors in got.items():
        want = load_file(next((pipe / comp).glob("*.safetensors")))
        assert set(tensors) == set(want), comp
        for k, v in tensors.items():
            assert v.dtype == want[k].dtype and _bits(v) == _bits(want[k]), f"{comp}.{k}"
            n += 1
    return n


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = tmp_path_factory.mktemp("sdxl_single")
    torch.manual_seed(0)
    common = dict(intermediate_size=50, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                  max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    models = {"unet": UNet2DConditionModel(sample_size=8, layers_per_block=2, attention_head_dim=8, norm_num_groups=8,
                                           **XL_UNET),
              "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=32, **common)),
              "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=D2, projection_dim=24, **common))}
    pipe: dict[str, dict] = {}
    for comp, m in models.items():
        sd = {k: v.detach().to(torch.float16).contiguous() for k, v in m.state_dict().items() if "position_ids" not in k}
        if comp.startswith("text_encoder"):  # on disk as transformers 4 names them (5 flattens CLIPTextModel)
            sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}
        pipe[comp] = sd
    ldm: dict = {}
    for k, v in pipe["unet"].items():  # the UNet's LDM names (the upsampler's: 2 after attention, else 1)
        cands = sdnames.ldm_names("unet", k.rpartition(".")[0])
        pick = cands[0] if len(cands) == 1 else next(c for c in cands if (".2.conv" in c) == (int(k.split(".")[1]) < 2))
        ldm[f"{pick}.{k.rpartition('.')[2]}"] = v
    ldm.update({TE1 + k: v for k, v in pipe["text_encoder"].items()})
    ldm.update(_open_clip(pipe["text_encoder_2"]))
    ldm["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)  # the VAE: never a target
    # the file is what diffusers' single-file loader reads as this pipeline
    back = _to_pipeline(ldm, models)
    for comp, tensors in back.items():
        assert set(tensors) == set(pipe[comp]) and all(_bits(tensors[k]) == _bits(pipe[comp][k]) for k in tensors), comp
    (out / "pipe").mkdir()
    (out / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    for comp, sd in pipe.items():
        (out / "pipe" / comp).mkdir()
        save_file(sd, out / "pipe" / comp / ("diffusion_pytorch_model.safetensors" if comp == "unet" else "model.safetensors"))
    save_file(ldm, out / "sdxl.safetensors", {"format": "pt", "modelspec.title": "tiny sdxl"})

    # an sd-scripts SDXL LoRA: SGM UNet names, lora_te1_, lora_te2_ (bf16, alpha != rank)
    mods = dict(models["unet"].named_modules())
    unet_specs = []
    for path, kernel in UNET_MODULES:
        m = mods[path]
        n_in, n_out = (m.in_features, m.out_features) if kernel is None else (m.in_channels, m.out_channels)
        unet_specs.append((sdnames.diffusers_to_sgm(path), n_in, n_out, kernel, "linear" if kernel is None else "conv"))

    def te_specs(comp, paths):
        ms = dict(models[comp].named_modules())
        ms.update({"text_model." + k: v for k, v in list(ms.items()) if not k.startswith("text_model.")})
        return [(p, ms[p].in_features, ms[p].out_features, None, "linear") for p in paths]

    gen = torch.Generator().manual_seed(5)
    lora = sdfix._kohya(gen, "lora_unet_", unet_specs, RANKS, torch.bfloat16)
    lora.update(sdfix._kohya(gen, "lora_te1_", te_specs("text_encoder", TE1_MODULES), RANKS, torch.bfloat16))
    lora.update(sdfix._kohya(gen, "lora_te2_", te_specs("text_encoder_2", TE2_MODULES), RANKS, torch.bfloat16))
    meta = sdfix._kohya_metadata("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "tiny_sdxl", 8, 4.0, 4, 2.0)
    save_file(lora, out / "lora.safetensors", meta)
    # a second one: text_encoder_2's q/k/v of layer 0 only, as transformers 5 names kohya modules (no text_model.)
    gen = torch.Generator().manual_seed(6)
    te2 = sdfix._kohya(gen, "lora_te2_", te_specs("text_encoder_2", TE2_MODULES[:3]), {"linear": (4, 4.0)}, torch.float32)
    save_file({k.replace("lora_te2_text_model_", "lora_te2_"): v for k, v in te2.items()}, out / "te2_t5.safetensors", meta)
    return {"dir": out, "pipe": out / "pipe", "ldm": out / "sdxl.safetensors", "lora": out / "lora.safetensors",
            "te2_t5": out / "te2_t5.safetensors", "models": models}


def _in_proj(n: int) -> str:
    return f"{TE2}transformer.resblocks.{n}.attn.in_proj_weight"


# -- the rule ----------------------------------------------------------------------------------------

def test_text_encoder_2_targets_are_rows_of_in_proj(sdxl, tmp_path):
    """q, k, v of text_encoder_2 are rows [0, 40), [40, 80), [80, 120) of the fused tensor, under
    transformers 4 and 5 names; out_proj/fc1/fc2 whole tensors; a whole-tensor rule (tensor_name)
    does not take rows; an SD 2.x file (OpenCLIP as text_encoder) follows the same rule."""
    base = BaseCheckpoint(sdxl["ldm"])
    for i, p in enumerate("qkv"):
        for form in ("text_model.encoder", "encoder"):
            name = f"text_encoder_2.{form}.layers.1.self_attn.{p}_proj"
            assert base.weight_target(name) == Target(_in_proj(1), (D2 * i, D2 * (i + 1))), name
        bias = base.target(f"text_encoder_2.text_model.encoder.layers.0.self_attn.{p}_proj.bias")
        assert bias == Target(f"{TE2}transformer.resblocks.0.attn.in_proj_bias", (D2 * i, D2 * (i + 1)))
        assert base.tensor_name(f"text_encoder_2.encoder.layers.1.self_attn.{p}_proj.weight") is None
    for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        assert base.weight_name(f"text_encoder_2.encoder.layers.0.{ours}") == f"{TE2}transformer.resblocks.0.{theirs}.weight"
    assert base.weight_name("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == \
        TE1 + "text_model.encoder.layers.0.self_attn.q_proj.weight"  # CLIP-L stays unfused
    assert base.target("text_encoder_2.text_projection.weight") is None
    assert "stored transposed" in base.missing("text_encoder_2.text_projection.weight")
    w = torch.zeros(6, 2)
    save_file({U + "out.2.weight": w, "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": w.clone()},
              tmp_path / "sd2.safetensors")
    sd2 = BaseCheckpoint(tmp_path / "sd2.safetensors")
    assert sd2.weight_target("text_encoder.text_model.encoder.layers.0.self_attn.v_proj") == \
        Target("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", (4, 6))


# -- merge -------------------------------------------------------------------------------------------

def test_merge_into_single_file_equals_merge_into_pipeline(sdxl, tmp_path):
    """te1 + te2 + UNet modules merged into the single file: read back by diffusers' converters,
    every tensor is the pipeline merge's, bit for bit; the rows of in_proj_weight no module changes,
    and everything else, keep the base's bytes. Two adapters adding into one fused tensor (q/k/v of
    layer 0 from both, transformers 5 names in one) too."""
    merge(sdxl["pipe"], str(sdxl["lora"]), tmp_path / "pipe_out", device="cpu")
    res = merge(sdxl["ldm"], str(sdxl["lora"]), tmp_path / "out.safetensors", device="cpu")
    assert res.num_merged == len(UNET_MODULES) + len(TE1_MODULES) + len(TE2_MODULES) - 2  # q, k, v: one tensor
    assert _same_as_pipeline(tmp_path / "out.safetensors", tmp_path / "pipe_out", sdxl["models"]) > 100
    base, got = SafetensorsFile(sdxl["ldm"]), SafetensorsFile(tmp_path / "out.safetensors")
    assert got.keys() == base.keys() and got.metadata == base.metadata
    changed = {k for k in base.keys() if base.read_bytes(k) != got.read_bytes(k)}
    assert _in_proj(0) in changed and _in_proj(1) in changed and not any(k.startswith("first_stage_model.") for k in changed)
    row = D2 * 2  # bytes of one fp16 row of in_proj_weight [120, 40]
    was, now = base.read_bytes(_in_proj(1)), got.read_bytes(_in_proj(1))
    assert was[:D2 * row] == now[:D2 * row] and was[2 * D2 * row:] == now[2 * D2 * row:]  # q and v rows: copied
    assert was[D2 * row:2 * D2 * row] != now[D2 * row:2 * D2 * row]

    both = f"{sdxl['lora']}:0.7,{sdxl['te2_t5']}:0.3"
    merge(sdxl["pipe"], both, tmp_path / "pipe_both", device="cpu")
    merge(sdxl["ldm"], both, tmp_path / "both.safetensors", device="cpu")
    assert _same_as_pipeline(tmp_path / "both.safetensors", tmp_path / "pipe_both", sdxl["models"]) > 100
    # alone (one adapter at weight 1 on Linear weights: the numpy engine where this machine's GEMM
    # sums in PEFT's order), and through torch
    for engine in ("auto", "torch"):
        merge(sdxl["pipe"], str(sdxl["te2_t5"]), tmp_path / f"pipe_{engine}", device="cpu", engine=engine)
        merge(sdxl["ldm"], str(sdxl["te2_t5"]), tmp_path / f"{engine}.safetensors", device="cpu", engine=engine)
        assert _same_as_pipeline(tmp_path / f"{engine}.safetensors", tmp_path / f"pipe_{engine}", sdxl["models"]) > 100
    # (read as transformers 5 names them: found in both layouts by the same rule)
    assert load_adapter(sdxl["te2_t5"]).modules.keys() == {f"text_encoder_2.{p[len('text_model.'):]}" for p in TE2_MODULES[:3]}


def test_parity_validate_and_unmerge(sdxl, tmp_path):
    """parity passes on the merged single file and fails where a row block of in_proj_weight was
    changed; validate --base finds every module; unmerge restores the base within one ulp, as the
    pipeline's unmerge does, bit for bit."""
    from loratool.validation import validate

    r = validate(sdxl["lora"], base=sdxl["ldm"])
    assert not [f for f in r.findings if f.id.startswith("LT30") and f.id not in ("LT306", "LT307")], r.findings
    out = tmp_path / "m.safetensors"
    merge(sdxl["ldm"], str(sdxl["lora"]), out, device="cpu")
    rep = check_parity(sdxl["ldm"], out, str(sdxl["lora"]))
    assert rep.ok and not rep.missing and not rep.untouched_mismatched
    layers = {lay.name: lay for lay in rep.layers}
    assert _in_proj(0) in layers and f"{TE2}transformer.resblocks.0.mlp.c_fc.weight" in layers

    t = load_file(out)
    t[_in_proj(0)][D2:2 * D2] *= 2  # k's rows changed by hand
    save_file(t, tmp_path / "bad.safetensors", {"format": "pt", "modelspec.title": "tiny sdxl"})
    bad = check_parity(sdxl["ldm"], tmp_path / "bad.safetensors", str(sdxl["lora"]))
    assert not bad.ok and [lay.name for lay in bad.layers if not lay.ok] == [_in_proj(0)]
    assert next(lay for lay in bad.layers if lay.name == _in_proj(0)).bad > 0

    res = unmerge(out, str(sdxl["lora"]), tmp_path / "back.safetensors", base=sdxl["ldm"], device="cpu")
    assert res.max_ulp <= 1.0 and _in_proj(1) in {d.name for d in res.distance}
    merge(sdxl["pipe"], str(sdxl["lora"]), tmp_path / "pipe_m", device="cpu")
    unmerge(tmp_path / "pipe_m", str(sdxl["lora"]), tmp_path / "pipe_back", device="cpu")
    assert _same_as_pipeline(tmp_path / "back.safetensors", tmp_path / "pipe_back", sdxl["models"]) > 100


def test_text_projection_is_refused_in_one_line(sdxl, tmp_path):
    """OpenCLIP's text_projection is a bare matrix, stored transposed: an adapter module on it is
    refused in one line that says so (the pipeline folder, where it is a Linear, takes it)."""
    gen = torch.Generator().manual_seed(9)
    lora = sdfix._kohya(gen, "lora_te2_", [("text_projection", D2, 24, None, "linear")], RANKS, torch.float32)
    save_file(lora, tmp_path / "proj.safetensors")
    assert set(load_adapter(tmp_path / "proj.safetensors").modules) == {"text_encoder_2.text_projection"}
    merge(sdxl["pipe"], str(tmp_path / "proj.safetensors"), tmp_path / "pipe_out", device="cpu")
    with pytest.raises(MisfitError) as e:
        merge(sdxl["ldm"], str(tmp_path / "proj.safetensors"), tmp_path / "out.safetensors", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "text_encoder_2.text_projection" in msg and "stored transposed" in msg
    assert not (tmp_path / "out.safetensors").exists()
    # a q_proj of another width: the fit check names the rows it would go into
    lora = sdfix._kohya(gen, "lora_te2_", [("text_model.encoder.layers.0.self_attn.q_proj", D2, 30, None, "linear")],
                        RANKS, torch.float32)
    save_file(lora, tmp_path / "q30.safetensors")
    with pytest.raises(MisfitError, match=r"rows \[0, 40\) of base tensor conditioner\.embedders\.1\.model\.transformer"
                                          r"\.resblocks\.0\.attn\.in_proj_weight have shape \[40, 40\]"):
        merge(sdxl["ldm"], str(tmp_path / "q30.safetensors"), tmp_path / "out.safetensors", device="cpu")


def test_loha_on_fused_rows(sdxl, tmp_path):
    """A kind without a low-rank form (LyCORIS LoHa, kohya keys) on text_encoder_2's q and v: the
    merge into the single file is the pipeline's, and parity (its torch path: rows of a fused
    tensor, zeros elsewhere) passes and catches a changed v row."""
    gen = torch.Generator().manual_seed(11)
    sd = {}
    for p in ("q_proj", "v_proj"):
        name = f"lora_te2_text_model_encoder_layers_1_self_attn_{p}"
        for w in ("w1", "w2"):
            sd[f"{name}.hada_{w}_a"] = torch.randn(D2, 4, generator=gen) * 0.1
            sd[f"{name}.hada_{w}_b"] = torch.randn(4, D2, generator=gen) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, tmp_path / "loha.safetensors")
    assert {m.module_kind for m in load_adapter(tmp_path / "loha.safetensors").modules.values()} == {"loha"}
    merge(sdxl["pipe"], str(tmp_path / "loha.safetensors"), tmp_path / "pipe_out", device="cpu")
    merge(sdxl["ldm"], str(tmp_path / "loha.safetensors"), tmp_path / "out.safetensors", device="cpu")
    assert _same_as_pipeline(tmp_path / "out.safetensors", tmp_path / "pipe_out", sdxl["models"]) > 100
    rep = check_parity(sdxl["ldm"], tmp_path / "out.safetensors", str(tmp_path / "loha.safetensors"))
    assert rep.ok and [lay.name for lay in rep.layers] == [_in_proj(1)]
    t = load_file(tmp_path / "out.safetensors")
    t[_in_proj(1)][2 * D2 + 3] += 0.5  # one row of v
    save_file(t, tmp_path / "bad.safetensors")
    bad = check_parity(sdxl["ldm"], tmp_path / "bad.safetensors", str(tmp_path / "loha.safetensors"))
    assert not bad.ok and bad.layers[0].bad == D2
