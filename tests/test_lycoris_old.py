"""LoHa, LoKr and LoCon files as 2023 trainers wrote them (fixtures/lycoris_old.py: LyCORIS 0.1.x-1.x
layouts through sd-scripts, the LoCon module, conv layers with flattened factors, Tucker cores,
alphas in fp16/bf16/fp32/int64 or missing, SD 1.x/2.x/XL metadata) inspect with the right algorithm,
rank, alpha, scale and layer, and convert exactly: ΔW is recomputed here in float64 from the file's
tensors by the formulas the LyCORIS loaders apply (A1111's lyco extension, ComfyUI), not by
loratool's kinds. SD 1.5's proj_in/proj_out, 1×1 convs whose flattened factors do not say so, take
their layer from the file's SD family and load in diffusers as 4-D LoRA without a base.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from fixtures import lycoris_old as fx  # noqa: E402

SEED = 1103
U = "unet.down_blocks.0."
Q, K, PI, PO = (U + "attentions.0.transformer_blocks.0.attn1.to_q", U + "attentions.0.transformer_blocks.0.attn2.to_k",
                U + "attentions.0.proj_in", U + "attentions.0.proj_out")
C1, SC, DS = U + "resnets.0.conv1", U + "resnets.0.conv_shortcut", U + "downsamplers.0.conv"
TE, TEQ = "text_encoder.text_model.encoder.layers.0.mlp.fc1", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"

# case -> {module: (algorithm, kind, rank, alpha, scale, base shape)}: what the loaders apply
# (scale alpha/dim; LoKr's dim the decomposed factor's rank, scale 1 with both factors full or no
# alpha; LoHa/LoCon alpha missing or 0 means alpha = dim)
EXPECTED = {
    "loha_sd15": {Q: ("LoHa", "linear", 4, 2.0, 0.5, [16, 16]), K: ("LoHa", "linear", 4, 2.0, 0.5, [16, 32]),
                  PI: ("LoHa", "conv2d", 4, 2.0, 0.5, [16, 16, 1, 1]), PO: ("LoHa", "conv2d", 4, 2.0, 0.5, [16, 16, 1, 1]),
                  SC: ("LoHa", "conv2d", 4, 2.0, 0.5, [16, 8, 1, 1]), C1: ("LoHa", "conv2d", 4, 1.0, 0.25, [16, 8, 3, 3]),
                  DS: ("LoHa", "conv2d", 4, 1.0, 0.25, [16, 16, 3, 3]), TE: ("LoHa", "linear", 4, 2.0, 0.5, [64, 32])},
    "loha_tucker_sd15": {Q: ("LoHa", "linear", 4, 1.0, 0.25, [16, 16]), PI: ("LoHa", "conv2d", 4, 1.0, 0.25, [16, 16, 1, 1]),
                         C1: ("LoHa", "conv2d", 4, 4.0, 1.0, [16, 8, 3, 3]),
                         DS: ("LoHa", "conv2d", 4, 4.0, 1.0, [16, 16, 3, 3])},
    "lokr_sd15": {Q: ("LoKr", "linear", 2, 1.0, 0.5, [16, 16]), PI: ("LoKr", "conv2d", 2, 1.0, 0.5, [16, 16, 1, 1]),
                  PO: ("LoKr", "conv2d", 2, 1.0, 0.5, [16, 16, 1, 1]), C1: ("LoKr", "conv2d", 2, 1.0, 0.5, [16, 8, 3, 3]),
                  SC: ("LoKr", "conv2d", 2, 1.0, 0.5, [16, 8, 1, 1]), TE: ("LoKr", "linear", 2, 1.0, 0.5, [64, 32])},
    # both factors full: scale 1 whatever alpha (the dim, 100000, as an int64); rank the exact rank
    "lokr_full_sd15": {Q: ("LoKr", "linear", 16, 100000.0, 1.0, [16, 16]),
                       PI: ("LoKr", "conv2d", 16, 100000.0, 1.0, [16, 16, 1, 1]),
                       C1: ("LoKr", "conv2d", 8, 100000.0, 1.0, [16, 8, 3, 3]),
                       DS: ("LoKr", "conv2d", 16, 100000.0, 1.0, [16, 16, 3, 3])},
    "lokr_both_sd15": {Q: ("LoKr", "linear", 2, 1.0, 0.5, [16, 16]), TEQ: ("LoKr", "linear", 2, 2.0, 1.0, [64, 64]),
                       C1: ("LoKr", "conv2d", 2, 1.0, 0.5, [16, 8, 3, 3]),
                       DS: ("LoKr", "conv2d", 2, 2.0, 1.0, [16, 16, 3, 3])},
    "locon_sd15": {Q: ("LoRA", "linear", 8, 4.0, 0.5, [16, 16]), PI: ("LoRA", "conv2d", 8, 4.0, 0.5, [16, 16, 1, 1]),
                   C1: ("LoRA", "conv2d", 4, 2.0, 0.5, [16, 8, 3, 3]),
                   DS: ("LoCon+Tucker", "conv2d", 4, 2.0, 0.5, [16, 16, 3, 3])},
    "loha_sdxl": {"unet.down_blocks.1.attentions.0.proj_in": ("LoHa", "linear", 4, 2.0, 0.5, [16, 16]),
                  "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": ("LoHa", "linear", 4, 2.0, 0.5, [16, 16]),
                  C1: ("LoHa", "conv2d", 4, 2.0, 0.5, [8, 8, 3, 3]),
                  TEQ: ("LoHa", "linear", 4, 2.0, 0.5, [32, 32]),
                  "text_encoder_2" + TEQ[len("text_encoder"):]: ("LoHa", "linear", 4, 2.0, 0.5, [48, 48])},
    "loha_sd2": {PI: ("LoHa", "linear", 4, 2.0, 0.5, [16, 16]), Q: ("LoHa", "linear", 4, 2.0, 0.5, [16, 16])},
    "loha_width768": {PI: ("LoHa", "conv2d", 4, 2.0, 0.5, [16, 16, 1, 1]), K: ("LoHa", "linear", 2, 1.0, 0.5, [16, 768])},
    "loha_nometa": {PI: ("LoHa", "linear", 4, 2.0, 0.5, [16, 16]), C1: ("LoHa", "conv2d", 4, 1.0, 0.25, [16, 8, 3, 3])},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return fx.write(tmp_path_factory.mktemp("lycoris_old"), SEED)


def _cli(capsys, *args) -> dict:
    from loratool.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    return json.loads(out.out)


def _load(path) -> dict[str, "np.ndarray"]:
    from safetensors.torch import load_file

    return {k: v.double().numpy() for k, v in load_file(str(path)).items()}


def _reference(sd: dict, lora_name: str, base: tuple[int, ...]) -> np.ndarray:
    """ΔW (float64, the base's shape) of one kohya/LyCORIS module, by the loaders' formulas."""
    t = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == lora_name}
    alpha = float(t.pop("alpha")) if "alpha" in t else None

    def tucker(core, wa, wb):  # rebuild_tucker: Σ core[i, j] · wa[i, p] · wb[j, q]
        return np.einsum("ijkl,ip,jq->pqkl", core, wa, wb)

    if "hada_w1_a" in t:
        if "hada_t1" in t:
            d = tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        dim = t["hada_w1_b"].shape[0]
    elif any(k.startswith("lokr_") for k in t):
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        d = np.kron(w1[:, :, None, None], w2) if w2.ndim == 4 else np.kron(w1, w2)  # make_kron
        dim = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
        if dim is None:
            alpha = None  # both full: scale 1
    else:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        dim = down.shape[0]
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(dim, -1)
        d = np.einsum("nmkl,in,mj->ijkl", t["lora_mid.weight"], up2, down2) if "lora_mid.weight" in t else up2 @ down2
    scale = alpha / dim if alpha is not None and dim else 1.0
    return (d * scale).reshape(base)


def _lora_name(module: str) -> str:
    """The fixture's kohya name of a dotted module (SD 1.x names)."""
    comp, path = module.split(".", 1)
    return {"unet": "lora_unet_", "text_encoder": "lora_te_"}[comp] + path.replace(".", "_")


def _assert_close(got: np.ndarray, ref: np.ndarray, bound: np.ndarray, what) -> None:
    """|got − ref| within ``bound`` (the rounding of the written factors) plus float64 noise."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = np.abs(got - ref) - bound - 1e-12 * max(1.0, float(np.abs(ref).max()))
    assert float(err.max()) <= 0, (what, float(err.max()))


@pytest.mark.parametrize("case", list(EXPECTED))
def test_inspect_reports_algorithm_rank_and_scale(files, case, capsys):
    """`inspect --json --modules`: each module's algorithm, layer, rank, alpha, scale and base shape,
    exactly as the loaders read the old layout."""
    report = _cli(capsys, "inspect", files[case], "--json", "--modules")
    got = {m["name"]: (m["algorithm"], m["kind"], m["rank"], m["alpha"], m["scale"], m["base_shape"])
           for m in report["modules"]}
    assert got == EXPECTED[case]
    assert report["format"] == "kohya" and report["num_modules"] == len(EXPECTED[case])
    assert report["metadata"].get("ss_network_module", "") == fx.CASES[case][0].get("ss_network_module", "")


CONVERT_CASES = ["loha_sd15", "loha_tucker_sd15", "lokr_sd15", "lokr_full_sd15", "lokr_both_sd15", "locon_sd15"]


@pytest.mark.parametrize("case", CONVERT_CASES)
def test_convert_to_kohya_is_exact(files, case, tmp_path):
    """convert --to kohya at a rank that holds every module: lora_up @ lora_down · alpha/r is the
    loaders' ΔW within the rounding of the written factors (float32; fp16 for the fp16 file)."""
    from loratool.convert import convert

    res = convert(files[case], "kohya", tmp_path / "out.safetensors", rank=256)
    assert all(c.relative_error < 1e-12 and c.rank == c.exact_rank for c in res.conversions)
    src, out = _load(files[case]), _load(res.output)
    from safetensors import safe_open

    with safe_open(str(res.output), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys() if not k.endswith(".alpha")}
    u = 2.0 ** -11 if dtypes == {"F16"} else 2.0 ** -24
    assert dtypes == ({"F16"} if fx.FACTOR_DTYPE.get(case) == "F16" else {"F32"})
    for module, (*_, base) in EXPECTED[case].items():
        name = _lora_name(module)
        ref = _reference(src, name, tuple(base))
        up, down = out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"]
        k = down.shape[0]
        scale = float(out[f"{name}.alpha"]) / k if f"{name}.alpha" in out else 1.0
        b2, a2 = up.reshape(up.shape[0], -1), down.reshape(k, -1)
        assert down.shape[1:] == tuple(base[1:]) and up.shape[2:] == tuple([1, 1] if len(base) == 4 else [])
        bound = ((k + 4) * u * abs(scale) * (np.abs(b2) @ np.abs(a2))).reshape(ref.shape)
        _assert_close((scale * b2 @ a2).reshape(ref.shape), ref, bound, (case, module))


@pytest.mark.parametrize("case", ["lokr_sd15", "loha_tucker_sd15", "lokr_both_sd15"])
def test_convert_to_peft_is_exact(files, case, tmp_path):
    """convert --to peft: per component PEFT's B @ A · lora_alpha/r (rank_pattern, alpha_pattern)
    is the loaders' ΔW within float32 rounding, in the base's layer layout."""
    from safetensors.numpy import load_file

    from loratool.convert import convert

    res = convert(files[case], "peft", tmp_path / "p", rank=256)
    src = _load(files[case])
    seen = set()
    for comp_dir in sorted(p for p in res.output.iterdir() if p.is_dir()):
        cfg = json.loads((comp_dir / "adapter_config.json").read_text())
        w = load_file(str(comp_dir / "adapter_model.safetensors"))
        for key in w:
            if not key.endswith(".lora_A.weight"):
                continue
            path = key[len("base_model.model."):-len(".lora_A.weight")]
            module = f"{comp_dir.name}.{path}"
            base = EXPECTED[case][module][-1]
            a = w[key].astype(np.float64)
            b = w[key.replace("lora_A", "lora_B")].astype(np.float64)
            r = cfg["rank_pattern"].get(path, cfg["r"])
            alpha = cfg["alpha_pattern"].get(path, cfg["lora_alpha"])
            assert a.shape[0] == r and a.shape[1:] == tuple(base[1:])
            scale = alpha / r
            b2, a2 = b.reshape(b.shape[0], -1), a.reshape(r, -1)
            ref = _reference(src, _lora_name(module), tuple(base))
            bound = ((r + 4) * 2.0 ** -24 * scale * (np.abs(b2) @ np.abs(a2))).reshape(ref.shape)
            _assert_close((scale * b2 @ a2).reshape(ref.shape), ref, bound, (case, module))
            seen.add(module)
    assert seen == set(EXPECTED[case])


def test_the_sd_family_comes_from_the_file():
    """Each cue the reader takes the SD family from, in its order; nothing is a guess."""
    from loratool.formats.kohya_legacy import SD1, SD2, SDXL, sd_family

    lora = {"lora_down.weight": "d", "lora_up.weight": "u"}
    k768 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": lora}

    def fam(md, groups=None, width=768):
        return sd_family(md, groups or {"lora_unet_x_proj_in": lora}, lambda k: (4, width) if k == "d" else (8, 4))[0]

    assert fam({"ss_base_model_version": "sd_v1"}) == SD1
    assert fam({"ss_base_model_version": "sd_v2_v", "ss_v2": "False"}) == SD2  # the version before ss_v2
    assert fam({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}) == SDXL
    assert fam({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}) == SD2
    assert fam({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}) == SDXL
    assert fam({}, {"lora_te2_text_model_encoder_layers_0_mlp_fc1": lora}) == SDXL
    assert fam({}, {"lora_unet_output_blocks_2_1_proj_out": lora}) == SDXL
    assert fam({}, k768) == SD1 and fam({}, k768, 1024) == SD2 and fam({}, k768, 2048) == SDXL
    assert fam({}, {"lora_te_text_model_encoder_layers_0_self_attn_k_proj": lora}, 1024) == SD2
    assert fam({"ss_v2": "True"}) == SD2 and fam({"ss_v2": "False"}) == SD1
    assert fam({"ss_sd_model_name": "v1-5-pruned-emaonly.safetensors"}) == SD1
    assert fam({"ss_sd_model_name": "sd_xl_base_1.0.safetensors"}) == SDXL
    assert fam({"ss_sd_model_name": "v2-1_768-ema-pruned.ckpt"}) == SD2
    assert fam({"ss_sd_model_name": "runwayml/stable-diffusion-v1-5"}) == SD1
    assert fam({"ss_sd_model_name": "animefull-final-pruned.ckpt"}) is None
    assert fam({"ss_sd_model_name": "realisticVisionV2-0.safetensors"}) is None  # an SD 1.5 fine-tune
    assert fam({}, k768, 320) is None and fam({}) is None


def test_a_layer_the_file_does_not_say_is_noted_and_the_base_decides(files, tmp_path):
    """No SD family in the file: a flattened proj_in is read Linear-shaped with a note that says so
    (never a silent guess); with --base the base gives it its 1×1 kernel, and the note goes."""
    from safetensors.torch import save_file

    from loratool.convert import convert
    from loratool.formats import load_adapter

    adapter = load_adapter(files["loha_nometa"])
    note = adapter.modules[PI].layer_note
    assert note and "hada_w1_b [4, 16]" in note and "1×1 Conv2d in SD 1.x" in note and "--base" in note
    assert adapter.modules[C1].layer_note is None  # conv1: 3×3 by its name
    assert [load_adapter(files[c]).modules[PI].layer_note for c in ("loha_sd15", "loha_sd2", "loha_width768")] \
        == [None] * 3  # the family said it

    out = convert(files["loha_nometa"], "kohya", tmp_path / "flat.safetensors")
    assert _load(out.output)[_lora_name(PI) + ".lora_down.weight"].ndim == 2
    save_file({f"{PI}.weight": torch.zeros(16, 16, 1, 1), f"{C1}.weight": torch.zeros(16, 8, 3, 3)},
              str(tmp_path / "base.safetensors"))
    # validate says it once for the file (LT111), and not once a base has said it
    from loratool.validation import validate

    found = [x for x in validate(files["loha_nometa"]).findings if x.id == "LT111"]
    assert len(found) == 1 and "--base" in found[0].message and PI in found[0].message
    assert not [x for x in validate(files["loha_nometa"], base=tmp_path / "base.safetensors").findings
                if x.id == "LT111"]
    out = convert(files["loha_nometa"], "kohya", tmp_path / "conv.safetensors", base=tmp_path / "base.safetensors")
    got = _load(out.output)
    assert got[_lora_name(PI) + ".lora_down.weight"].shape[1:] == (16, 1, 1)
    ref = _reference(_load(files["loha_nometa"]), _lora_name(PI), (16, 16, 1, 1))
    down, up = got[_lora_name(PI) + ".lora_down.weight"], got[_lora_name(PI) + ".lora_up.weight"]
    k = down.shape[0]
    b2, a2 = up.reshape(16, k), down.reshape(k, -1)
    scale = float(got[_lora_name(PI) + ".alpha"]) / k
    bound = ((k + 4) * 2.0 ** -24 * scale * (np.abs(b2) @ np.abs(a2))).reshape(ref.shape)
    _assert_close((scale * b2 @ a2).reshape(ref.shape), ref, bound, "proj_in with --base")


# the SD 1.5 block layout, smaller (tests/test_lycoris_diffusers.py)
UNET = dict(sample_size=8, layers_per_block=1, attention_head_dim=8, norm_num_groups=8, cross_attention_dim=32,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_sd15_loha_and_lokr_load_in_diffusers_without_a_base(tmp_path):
    """Old SD 1.5 LoHa and LoKr files (ss_base_model_version sd_v1, factors flattened) on a real tiny
    UNet2DConditionModel: converted without --base, proj_in/proj_out are 4-D [out, in, 1, 1] LoRA,
    which diffusers' lora_state_dict + load_lora_into_unet take with no module dropped, and the
    PEFT layers it builds apply the loaders' ΔW within float32 rounding."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from peft.tuners.tuners_utils import BaseTunerLayer

    from loratool.convert import convert

    torch.manual_seed(SEED)
    base = diffusers.UNet2DConditionModel(**UNET)
    shapes = {n[:-len(".weight")]: tuple(p.shape) for n, p in base.named_parameters() if n.endswith(".weight")}
    names = ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.proj_out",
             "up_blocks.1.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert [len(shapes[n]) for n in names] == [4, 4, 4, 4, 2] and shapes[names[0]][2:] == (1, 1)

    def lokr_of(shape):  # LyCORIS 1.x, factor 4: W1 full (out_l, in_m), W2 = w2_a @ w2_b flattened
        out, in_ = shape[:2]
        return fx.lokr(shape, (4, 4), (out // 4, in_ // 4, 2), (1.0, "BF16"))

    md = {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1", "ss_v2": "False"}
    for algo, build in (("loha", lambda s: fx.loha(s, 4, (2.0, "F16"))), ("lokr", lokr_of)):
        modules = {"lora_unet_" + n.replace(".", "_"): build(shapes[n]) for n in names}
        src = fx.write_case(tmp_path / f"{algo}.safetensors", dict(md, ss_network_args=json.dumps({"algo": algo})),
                            modules, SEED)
        res = convert(src, "diffusers", tmp_path / f"{algo}_diffusers.safetensors")
        sd = _load(src)
        refs = {n: _reference(sd, "lora_unet_" + n.replace(".", "_"), shapes[n]) for n in names}

        unet = diffusers.UNet2DConditionModel(**UNET)
        unet.load_state_dict(base.state_dict())
        state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(res.output))
        assert all(v.dim() == 4 for k, v in state_dict.items() if ".proj_in." in k or ".proj_out." in k)
        diffusers.StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name=algo)
        layers = {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer) and algo in m.lora_A}
        assert set(layers) == set(names)
        for n, layer in layers.items():
            with torch.no_grad():
                got = layer.get_delta_weight(algo).double().numpy()
                b = layer.lora_B[algo].weight.double().flatten(1).numpy()
                a = layer.lora_A[algo].weight.double().flatten(1).numpy()
            bound = ((a.shape[0] + 4) * 2.0 ** -24 * layer.scaling[algo] * (np.abs(b) @ np.abs(a))).reshape(got.shape)
            _assert_close(got, refs[n], bound, (algo, n))
        assert math.isclose(res.conversions[0].relative_error, 0.0, abs_tol=1e-12)
