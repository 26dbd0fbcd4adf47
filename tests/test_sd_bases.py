"""Stable Diffusion bases as users hold them (issue 13): single-file SD/SDXL checkpoints (LDM
names), bare component folders, adapters without a component prefix, and CLIP text encoders named
by transformers 4 or 5. One rule (``BaseCheckpoint.tensor_name``) finds an adapter module's base
tensor; a name that maps to no tensor or to several is not found (LT301), never guessed.

Bases are built from the tiny SD fixture (``fixtures/sd.py``): a diffusers pipeline folder, and
the same tensors under the LDM names written out by hand below (what an SD 1.5 / SDXL
``.safetensors`` from Stability, A1111 or kohya holds). The merge into the single file must equal
the merge into the pipeline folder bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import sd as sdfix
from loratool.checkpoint import BaseCheckpoint
from loratool.errors import MisfitError
from loratool.formats import kohya, load_adapter
from loratool.merge import merge
from loratool.safetensors_io import SafetensorsFile

U, TE, TE_XL = "model.diffusion_model.", "cond_stage_model.transformer.", "conditioner.embedders.0.transformer."

# The fixture's SD 1.5 modules -> their tensor in an SD 1.5 single-file checkpoint, by hand (the
# layout of v1-5-pruned.safetensors: input_blocks 1,2 / 4,5 / 7,8 / 10,11 hold the down blocks'
# [ResBlock, SpatialTransformer], 3/6/9 the downsamplers; up block 0 has no attention, so its
# upsampler is output_blocks.2.1.conv).
SD15_LDM = {
    "unet.down_blocks.0.attentions.0.proj_in": U + "input_blocks.1.1.proj_in",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": U + "input_blocks.1.1.transformer_blocks.0.attn1.to_k",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": U + "input_blocks.1.1.transformer_blocks.0.attn1.to_v",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0":
        U + "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": U + "input_blocks.1.1.transformer_blocks.0.attn2.to_v",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj":
        U + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": U + "input_blocks.1.1.transformer_blocks.0.ff.net.2",
    "unet.down_blocks.0.attentions.0.proj_out": U + "input_blocks.1.1.proj_out",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": U + "middle_block.1.transformer_blocks.0.attn1.to_q",
    "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0":
        U + "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0",
    "unet.up_blocks.3.attentions.1.proj_out": U + "output_blocks.10.1.proj_out",
    "unet.down_blocks.0.resnets.0.time_emb_proj": U + "input_blocks.1.0.emb_layers.1",
    "unet.down_blocks.1.resnets.0.conv_shortcut": U + "input_blocks.4.0.skip_connection",
    "unet.down_blocks.0.resnets.0.conv1": U + "input_blocks.1.0.in_layers.2",
    "unet.down_blocks.0.resnets.1.conv2": U + "input_blocks.2.0.out_layers.3",
    "unet.down_blocks.0.downsamplers.0.conv": U + "input_blocks.3.0.op",
    "unet.up_blocks.0.upsamplers.0.conv": U + "output_blocks.2.1.conv",
    **{f"text_encoder.{p}": TE + p for p, *_ in sdfix.SD_TE},
}
# tensors no adapter touches, in both layouts (diffusers name or None, LDM name, shape, dtype)
SD15_OTHER = [
    ("unet.conv_in.weight", U + "input_blocks.0.0.weight", (32, 4, 3, 3), torch.float16),
    ("unet.down_blocks.0.resnets.0.norm1.weight", U + "input_blocks.1.0.in_layers.0.weight", (32,), torch.float16),
    ("text_encoder.text_model.final_layer_norm.weight", TE + "text_model.final_layer_norm.weight", (32,), torch.float16),
    (None, "first_stage_model.decoder.conv_in.weight", (8, 4, 3, 3), torch.float32),  # the VAE
    (None, "model_ema.decay", (), torch.float32),
]


def _weight(gen, n_in, n_out, kernel, dtype):
    shape = (n_out, n_in) if kernel is None else (n_out, n_in, kernel, kernel)
    return (torch.randn(shape, generator=gen) * 0.1).to(dtype)


def _pipeline(root: Path, comps: dict[str, dict[str, torch.Tensor]]) -> Path:
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for comp, sd in comps.items():
        (root / comp).mkdir()
        unet = comp == "unet"
        (root / comp / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"} if unet
                                                             else {"architectures": ["CLIPTextModel"]}))
        save_file(sd, root / comp / ("diffusion_pytorch_model.safetensors" if unet else "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """SD 1.5: the fixture adapters, a pipeline folder and the same tensors as one LDM file."""
    out = tmp_path_factory.mktemp("sdbase")
    sdfix.generate(out / "adapters", 1234)
    gen = torch.Generator().manual_seed(7)
    comps: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    ldm: dict[str, torch.Tensor] = {}
    for comp, specs in (("unet", sdfix.SD_UNET), ("text_encoder", sdfix.SD_TE)):
        for path, n_in, n_out, kernel, _ in specs:
            w, b = _weight(gen, n_in, n_out, kernel, torch.float16), _weight(gen, 1, n_out, None, torch.float16)[:, 0]
            comps[comp][f"{path}.weight"], comps[comp][f"{path}.bias"] = w, b.contiguous()
            stem = SD15_LDM[f"{comp}.{path}"]
            ldm[f"{stem}.weight"], ldm[f"{stem}.bias"] = w, b.contiguous()
    for dname, lname, shape, dtype in SD15_OTHER:
        t = torch.randn(shape, generator=gen).to(dtype)
        ldm[lname] = t
        if dname:
            comp, rest = dname.split(".", 1)
            comps[comp][rest] = t
    pipe = _pipeline(out / "pipe", comps)
    save_file(ldm, out / "sd15.safetensors", {"format": "pt", "modelspec.title": "tiny sd15"})
    return {"dir": out, "pipe": pipe, "ldm": out / "sd15.safetensors", "kohya": out / "adapters" / "kohya_sd.safetensors",
            "diffusers": out / "adapters" / "diffusers_sd"}


def _same_bits(ldm_out: Path, pipe_out: Path, table: dict[str, str]) -> int:
    """Every LDM tensor of ``table`` equals its pipeline counterpart byte for byte; how many."""
    got = SafetensorsFile(ldm_out)
    n = 0
    for dname, lstem in table.items():
        comp, path = dname.split(".", 1)
        files = list((pipe_out / comp).glob("*.safetensors"))
        want = SafetensorsFile(files[0])
        for leaf in ("weight", "bias"):
            assert got.read_bytes(f"{lstem}.{leaf}") == want.read_bytes(f"{path}.{leaf}"), dname
            n += 1
    return n


def _changed(a: Path, b: Path) -> set[str]:
    x, y = SafetensorsFile(a), SafetensorsFile(b)
    return {k for k in x.keys() if x.read_bytes(k) != y.read_bytes(k)}


# -- the rule --------------------------------------------------------------------------------------

def test_ldm_names_of_every_fixture_module(sd):
    """Each kohya SD 1.5 module resolves to the hand-written LDM tensor, and the LDM file is
    recognised as such; VAE and EMA tensors are never a target."""
    base = BaseCheckpoint(sd["ldm"])
    assert base.ldm and not base.components and base.component is None
    adapter = load_adapter(sd["kohya"])
    assert set(adapter.modules) == set(SD15_LDM)
    for name in adapter.modules:
        assert base.weight_name(name) == SD15_LDM[name] + ".weight", name
    # the diffusers names of the upsampler: the one that exists (SD 1.5: .1.conv, not .2.conv)
    assert base.tensor_name("unet.up_blocks.0.upsamplers.0.conv.bias") == U + "output_blocks.2.1.conv.bias"
    assert base.tensor_name("unet.conv_in.weight") == U + "input_blocks.0.0.weight"
    assert base.tensor_name("vae.decoder.conv_in.weight") is None


def test_merge_into_single_file_equals_merge_into_pipeline(sd, tmp_path, capsys):
    """``loratool merge --base sd15.safetensors --adapters kohya_sd.safetensors -o out.safetensors``:
    a single file with the base's keys, order, dtypes and metadata, its merged tensors the pipeline
    merge's bits, every other tensor (VAE included) the base's bytes."""
    from loratool.cli import main

    out = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit) as e:
        main(["merge", "--base", str(sd["ldm"]), "--adapters", str(sd["kohya"]), "-o", str(out), "--device", "cpu",
              "--json"])
    assert e.value.code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["num_merged"] == len(SD15_LDM) and report["num_files"] == 1
    merge(sd["pipe"], str(sd["kohya"]), tmp_path / "pipe_out", device="cpu")
    base, got = SafetensorsFile(sd["ldm"]), SafetensorsFile(out)
    assert got.keys() == base.keys() and got.metadata == base.metadata
    assert all(got.ref(k).dtype == base.ref(k).dtype and got.ref(k).shape == base.ref(k).shape for k in base.keys())
    assert _same_bits(out, tmp_path / "pipe_out", SD15_LDM) == 2 * len(SD15_LDM)
    assert _changed(sd["ldm"], out) == {SD15_LDM[n] + ".weight" for n in SD15_LDM}  # biases, VAE: untouched


def test_validate_and_parity_use_the_rule(sd, tmp_path):
    from loratool.merge.parity import check_parity
    from loratool.validation import validate

    r = validate(sd["kohya"], base=sd["ldm"])
    assert not [f for f in r.findings if f.id.startswith("LT30") and f.id != "LT306" and f.id != "LT307"], r.findings
    merge(sd["ldm"], str(sd["kohya"]), tmp_path / "m.safetensors", device="cpu")
    rep = check_parity(sd["ldm"], tmp_path / "m.safetensors", str(sd["kohya"]))
    assert rep.ok and len(rep.layers) == len(SD15_LDM) and not rep.missing
    # parity notices a single-file merge that is not the adapter's (a weight changed by hand)
    t = load_file(tmp_path / "m.safetensors")
    t[SD15_LDM["unet.down_blocks.0.resnets.0.conv1"] + ".weight"] *= 2
    save_file(t, tmp_path / "bad.safetensors", {"format": "pt", "modelspec.title": "tiny sd15"})
    assert not check_parity(sd["ldm"], tmp_path / "bad.safetensors", str(sd["kohya"])).ok


def _unet_only_diffusers(sd, out: Path, prefix: bool = True) -> Path:
    """The diffusers fixture's UNet modules: as diffusers writes them, or (``prefix`` False) as a
    PEFT directory that a UNet saved itself (no ``unet.``)."""
    src = SafetensorsFile(sd["diffusers"] / "pytorch_lora_weights.safetensors")
    keys = [k for k in src.keys() if k.startswith("unet.")]
    tensors = {k: load_file(src.path)[k] for k in keys}
    out.mkdir()
    if prefix:
        save_file(tensors, out / "pytorch_lora_weights.safetensors", src.metadata)
        return out
    meta = json.loads(src.metadata["lora_adapter_metadata"])
    cfg = {k[len("unet."):]: v for k, v in meta.items() if k.startswith("unet.")}
    save_file({"base_model.model." + k[len("unet."):]: v for k, v in tensors.items()}, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": None, "base_model_name_or_path": None}))
    return out


def test_bare_unet_folder_and_unprefixed_adapter(sd, tmp_path):
    """A diffusers UNet adapter merged into ``pipe/unet`` alone; a PEFT UNet adapter (no ``unet.``)
    merged into the pipeline folder and into the single file: the same bits as the plain case."""
    a = _unet_only_diffusers(sd, tmp_path / "dif")
    peft_dir = _unet_only_diffusers(sd, tmp_path / "peft", prefix=False)
    assert all(not n.startswith("unet.") for n in load_adapter(peft_dir).modules)
    merge(sd["pipe"], str(a), tmp_path / "ref", device="cpu")
    ref = tmp_path / "ref" / "unet" / "diffusion_pytorch_model.safetensors"
    merge(sd["pipe"] / "unet", str(a), tmp_path / "bare", device="cpu")
    got = tmp_path / "bare" / "diffusion_pytorch_model.safetensors"
    changed = _changed(sd["pipe"] / "unet" / "diffusion_pytorch_model.safetensors", ref)
    n = sum(1 for s in sdfix.SD_UNET if s[4] == "linear")  # the fixture's diffusers UNet modules
    assert len(changed) == n and not _changed(ref, got)
    merge(sd["pipe"], str(peft_dir), tmp_path / "peft_out", device="cpu")
    assert not _changed(ref, tmp_path / "peft_out" / "unet" / "diffusion_pytorch_model.safetensors")
    merge(sd["ldm"], str(peft_dir), tmp_path / "peft.safetensors", device="cpu")
    table = {d: s for d, s in SD15_LDM.items() if f"{d.split('.', 1)[1]}.weight" in changed}
    assert len(table) == n and _same_bits(tmp_path / "peft.safetensors", tmp_path / "ref", table) == 2 * n
    # the whole diffusers adapter (text encoder too) has no home in a bare unet/ folder
    with pytest.raises(MisfitError, match="the base has no tensor text_encoder.text_model"):
        merge(sd["pipe"] / "unet", str(sd["diffusers"]), tmp_path / "no", device="cpu")


def test_transformers_5_text_encoder_names_both_ways(sd, tmp_path):
    """kohya files written under transformers 5 (``lora_te_encoder_…``) merge into the SD 1.5
    single file and pipeline; a pipeline whose text encoder transformers 5 saved flat
    (``encoder.layers…``) takes the transformers-4 names; all give the same bits."""
    src = load_file(sd["kohya"])
    t5 = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in src.items()}
    assert sum(k.startswith("lora_te_encoder_layers_") for k in t5) == 3 * len(sdfix.SD_TE)
    save_file(t5, tmp_path / "t5.safetensors", SafetensorsFile(sd["kohya"]).metadata)
    merge(sd["pipe"], str(sd["kohya"]), tmp_path / "ref", device="cpu")
    merge(sd["pipe"], str(tmp_path / "t5.safetensors"), tmp_path / "a", device="cpu")
    merge(sd["ldm"], str(tmp_path / "t5.safetensors"), tmp_path / "b.safetensors", device="cpu")
    ref_te = tmp_path / "ref" / "text_encoder" / "model.safetensors"
    assert not _changed(ref_te, tmp_path / "a" / "text_encoder" / "model.safetensors")
    assert _same_bits(tmp_path / "b.safetensors", tmp_path / "ref", SD15_LDM) == 2 * len(SD15_LDM)
    # a flat (transformers 5) text encoder in the pipeline
    flat = tmp_path / "flat"
    te = load_file(sd["pipe"] / "text_encoder" / "model.safetensors")
    _pipeline(flat, {"unet": load_file(sd["pipe"] / "unet" / "diffusion_pytorch_model.safetensors"),
                     "text_encoder": {k[len("text_model."):]: v for k, v in te.items()}})
    merge(flat, str(sd["kohya"]), tmp_path / "c", device="cpu")
    got, want = SafetensorsFile(tmp_path / "c" / "text_encoder" / "model.safetensors"), SafetensorsFile(ref_te)
    assert all(got.read_bytes(k) == want.read_bytes("text_model." + k) for k in got.keys())


# -- SDXL ------------------------------------------------------------------------------------------

def test_sdxl_single_file(sd, tmp_path):
    """An sd-scripts SDXL LoRA (SGM UNet names, te1) merged into an SDXL single file equals the
    merge into the pipeline; its text_encoder_2 modules find OpenCLIP's tensors (q/k/v: rows of the
    fused in_proj_weight), and one that is missing is named in one line."""
    gen = torch.Generator().manual_seed(3)
    pipe: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    ldm: dict[str, torch.Tensor] = {}
    table: dict[str, str] = {}
    for sgm, n_in, n_out, kernel, _ in sdfix.SDXL_UNET:
        dname = kohya.module_name("lora_unet_" + sgm.replace(".", "_"))[0]
        table[dname] = U + sgm  # the fixture's names are sd-scripts' own (SGM), written by hand
        w = _weight(gen, n_in, n_out, kernel, torch.bfloat16)
        pipe["unet"][dname[len("unet."):] + ".weight"] = ldm[U + sgm + ".weight"] = w
    for p, n_in, n_out, kernel, _ in sdfix.SDXL_TE1:
        table[f"text_encoder.{p}"] = TE_XL + p
        pipe["text_encoder"][p + ".weight"] = ldm[TE_XL + p + ".weight"] = _weight(gen, n_in, n_out, None, torch.bfloat16)
    for p, n_in, n_out, kernel, _ in sdfix.SDXL_TE2:
        pipe["text_encoder_2"][p + ".weight"] = _weight(gen, n_in, n_out, None, torch.bfloat16)
    # what the single file has instead: OpenCLIP resblocks with fused q/k/v
    ldm["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(120, 40)
    ldm[U + "output_blocks.2.1.proj_in.weight"] = torch.zeros(64, 64)  # up block 0 has attention
    save_file(ldm, tmp_path / "sdxl.safetensors")
    _pipeline(tmp_path / "pipe", pipe)
    src = load_file(sd["dir"] / "adapters" / "kohya_sdxl.safetensors")
    save_file({k: v for k, v in src.items() if not k.startswith("lora_te2_")}, tmp_path / "no_te2.safetensors")

    base = BaseCheckpoint(tmp_path / "sdxl.safetensors")
    assert base.tensor_name("unet.up_blocks.0.upsamplers.0.conv.weight") == U + "output_blocks.2.2.conv.weight"
    assert base.weight_name("unet.down_blocks.1.attentions.0.proj_in") == U + "input_blocks.4.1.proj_in.weight"
    merge(tmp_path / "pipe", str(tmp_path / "no_te2.safetensors"), tmp_path / "ref", device="cpu")
    merge(tmp_path / "sdxl.safetensors", str(tmp_path / "no_te2.safetensors"), tmp_path / "out.safetensors", device="cpu")
    got = SafetensorsFile(tmp_path / "out.safetensors")
    for dname, lstem in table.items():
        comp, path = dname.split(".", 1)
        want = SafetensorsFile(next((tmp_path / "ref" / comp).glob("*.safetensors")))
        assert got.read_bytes(lstem + ".weight") == want.read_bytes(path + ".weight"), dname
    assert len(_changed(tmp_path / "sdxl.safetensors", tmp_path / "out.safetensors")) == len(table)
    # text_encoder_2 is OpenCLIP there: its k_proj is rows [40, 80) of the fused in_proj_weight
    # (tests/test_sdxl_single_file.py takes it through merge, parity, validate and unmerge)
    with pytest.raises(MisfitError) as e:
        merge(tmp_path / "sdxl.safetensors", str(sd["dir"] / "adapters" / "kohya_sdxl.safetensors"),
              tmp_path / "te2.safetensors", device="cpu")
    msg = str(e.value)  # layer 31's mlp.c_fc is not in this file: only that module is named
    assert "\n" not in msg and "resblocks.31.mlp.c_fc.weight" in msg and "k_proj" not in msg
    k = "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.weight"
    assert str(base.target(k)) == "rows [40, 80) of conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert base.tensor_name(k) is None and "fused" in base.missing(k)


# -- exact or not found ------------------------------------------------------------------------------

def test_ambiguous_or_unmapped_names_are_not_found(tmp_path):
    """A CLIP module without a component in a pipeline with two CLIP text encoders matches two
    tensors: not found, and the message names both. The component prefix settles it."""
    w = torch.zeros(4, 4)
    name = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    _pipeline(tmp_path / "xl", {"text_encoder": {name: w}, "text_encoder_2": {name: w},
                                "unet": {"down_blocks.0.attentions.0.proj_in.weight": w}})
    base = BaseCheckpoint(tmp_path / "xl")
    assert base.tensor_name(name) is None
    assert "matches 2 base tensors (text_encoder." in base.missing(name) and "text_encoder_2." in base.missing(name)
    assert base.tensor_name("text_encoder_2." + name) == "text_encoder_2." + name
    assert base.tensor_name("text_encoder_2.encoder.layers.0.self_attn.q_proj.weight") == "text_encoder_2." + name
    assert base.tensor_name("down_blocks.0.attentions.0.proj_in.weight") == "unet.down_blocks.0.attentions.0.proj_in.weight"
    # a bare folder drops its own component's prefix only
    assert BaseCheckpoint(tmp_path / "xl" / "text_encoder_2").tensor_name("text_encoder." + name) is None
    assert BaseCheckpoint(tmp_path / "xl" / "text_encoder_2").tensor_name("text_encoder_2." + name) == name
    # a plain transformers checkpoint keeps the model. rule and nothing SD-specific
    save_file({"model.layers.0.q.weight": w, "unet.x.weight": w.clone()}, tmp_path / "m.safetensors")
    plain = BaseCheckpoint(tmp_path / "m.safetensors")
    assert not plain.ldm and plain.component is None
    assert plain.weight_name("layers.0.q") == "model.layers.0.q.weight" and plain.weight_name("x") is None


# -- against diffusers' own single-file loader -------------------------------------------------------

XL_UNET = dict(block_out_channels=(32, 48, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
               "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 2), use_linear_projection=True, cross_attention_dim=72,
               addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=88)
SD15_UNET = dict(block_out_channels=(32, 48, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32)


@pytest.mark.parametrize("config", [SD15_UNET, XL_UNET], ids=["sd15", "sdxl"])
def test_ldm_names_are_what_diffusers_single_file_loader_reads(config, tmp_path):
    """Every tensor of a real (tiny) diffusers UNet2DConditionModel, SD 1.5 and SDXL layouts, put
    under the LDM name the rule finds for it, is read back by diffusers' own single-file
    conversion (``convert_ldm_unet_checkpoint``) as the same tensor under its original name."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=2, attention_head_dim=8, norm_num_groups=8, **config)
    sd_d = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    # every candidate LDM form of every tensor: the rule must then pick the one diffusers reads
    from loratool.formats import sdnames

    cands = {k: sdnames.ldm_names("unet", k.rpartition(".")[0]) for k in sd_d}
    unmapped = [k for k, c in cands.items() if not c]
    assert not unmapped, unmapped[:5]
    attn_up = {i for i, t in enumerate(config["up_block_types"]) if t.startswith("CrossAttn")}
    ldm = {}
    for k, v in sd_d.items():  # the upsampler's LDM index: 2 after a SpatialTransformer, else 1
        c = cands[k]
        pick = c[0] if len(c) == 1 else next(n for n in c if (".2.conv" in n) == (int(k.split(".")[1]) in attn_up))
        ldm[f"{pick}.{k.rpartition('.')[2]}"] = v
    assert len(ldm) == len(sd_d)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd_d)
    assert all(back[k] is sd_d[k] for k in sd_d)
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "unet_ldm.safetensors")
    base = BaseCheckpoint(tmp_path / "unet_ldm.safetensors")
    inverse = {id(v): k for k, v in ldm.items()}
    assert all(base.tensor_name("unet." + k) == inverse[id(v)] for k, v in sd_d.items())
