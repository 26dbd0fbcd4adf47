"""Flux LoRAs as kohya files: sd-scripts' names (BFL's modules), checked against diffusers' own loader.

The adapter is saved by diffusers itself (``FluxLoraLoaderMixin.save_lora_weights``, its LoraConfig
with per-module ranks and alphas in the metadata), converted with ``loratool convert --to kohya``,
and read back by diffusers 0.42 (``FluxLoraLoaderMixin.lora_state_dict``: for ``lora_unet_``
keys ``_convert_kohya_flux_lora_to_diffusers``, sd-scripts' own convert_flux_lora.py) and by
loratool. Shapes are tiny except where diffusers' converter fixes them (a single block's
``linear1`` is split at rows 3072/3072/3072/12288, Flux.1's widths).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from loratool.adapter import Adapter, LayerKind, module_of
from loratool.formats import kohya, load_adapter, sdnames, write_adapter
from loratool.safetensors_io import SafetensorsFile, host_tensor

torch = pytest.importorskip("torch")
lora_pipeline = pytest.importorskip("diffusers.loaders.lora_pipeline")

H = 8  # the double blocks' width here (q, k, v: H -> H)
W = 3072  # a single block's q/k/v rows, as diffusers' converter expects them
# diffusers module -> (out, in, rank, alpha). Ranks and alphas differ from part to part, some
# parts are missing (add_k_proj; to_k and to_v of single block 1), some scale ratios are not
# powers of two (double block 1).
MODULES = {
    "transformer_blocks.0.attn.to_q": (H, H, 4, 4.0),
    "transformer_blocks.0.attn.to_k": (H, H, 4, 4.0),
    "transformer_blocks.0.attn.to_v": (H, H, 4, 4.0),
    "transformer_blocks.0.attn.to_out.0": (H, H, 4, 8.0),
    "transformer_blocks.0.attn.add_q_proj": (H, H, 2, 1.0),
    "transformer_blocks.0.attn.add_v_proj": (H, H, 4, 8.0),
    "transformer_blocks.0.attn.to_add_out": (H, H, 2, 2.0),
    "transformer_blocks.0.ff.net.0.proj": (4 * H, H, 2, 2.0),
    "transformer_blocks.0.ff.net.2": (H, 4 * H, 2, 2.0),
    "transformer_blocks.0.ff_context.net.0.proj": (4 * H, H, 2, 1.0),
    "transformer_blocks.0.ff_context.net.2": (H, 4 * H, 2, 2.0),
    "transformer_blocks.0.norm1.linear": (6 * H, H, 2, 2.0),
    "transformer_blocks.0.norm1_context.linear": (6 * H, H, 2, 2.0),
    "transformer_blocks.1.attn.to_q": (H, H, 3, 3.0),
    "transformer_blocks.1.attn.to_k": (H, H, 3, 5.0),
    "transformer_blocks.1.attn.to_v": (H, H, 2, 2.0),
    "single_transformer_blocks.0.attn.to_q": (W, H, 2, 2.0),
    "single_transformer_blocks.0.attn.to_k": (W, H, 2, 2.0),
    "single_transformer_blocks.0.attn.to_v": (W, H, 2, 2.0),
    "single_transformer_blocks.0.proj_mlp": (4 * W, H, 2, 2.0),
    "single_transformer_blocks.0.proj_out": (H, 5 * H, 2, 2.0),  # alpha_pattern "proj_out" matches it too
    "single_transformer_blocks.0.norm.linear": (3 * H, H, 2, 2.0),
    "single_transformer_blocks.1.attn.to_q": (W, H, 2, 1.0),
    "single_transformer_blocks.1.proj_mlp": (4 * W, H, 3, 3.0),
    "proj_out": (4, H, 2, 2.0),
    "norm_out.linear": (2 * H, H, 2, 4.0),
    "x_embedder": (H, 4, 2, 2.0),
    "context_embedder": (H, 6, 2, 2.0),
    "time_text_embed.timestep_embedder.linear_1": (H, 5, 2, 2.0),
    "time_text_embed.timestep_embedder.linear_2": (H, H, 2, 2.0),
    "time_text_embed.text_embedder.linear_1": (H, 7, 2, 2.0),
    "time_text_embed.guidance_embedder.linear_1": (H, 5, 2, 2.0),
}
# sd-scripts' module names for these (diffusers' _convert_sd_scripts_to_ai_toolkit lists them)
SD_SCRIPTS = {
    "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
    "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_txt_attn_proj",
    "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_img_mlp_2",
    "lora_unet_double_blocks_0_txt_mlp_0", "lora_unet_double_blocks_0_txt_mlp_2",
    "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_double_blocks_0_txt_mod_lin",
    "lora_unet_double_blocks_1_img_attn_qkv",
    "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
    "lora_unet_single_blocks_0_modulation_lin", "lora_unet_single_blocks_1_linear1",
    "lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_img_in",
    "lora_unet_txt_in", "lora_unet_time_in_in_layer", "lora_unet_time_in_out_layer", "lora_unet_vector_in_in_layer",
    "lora_unet_guidance_in_in_layer",
}
# what the fused modules hold that the adapter has not: zero rows, so zero deltas
FILLED = {"transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.1.attn.to_k",
          "single_transformer_blocks.1.attn.to_v"}


def _factors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)) for n, (o, i, r, _) in MODULES.items()}


def _deltas_of(adapter: Adapter) -> dict[str, np.ndarray]:
    out = {}
    for name, m in adapter.modules.items():
        b2, a2 = m.factors_2d()
        out[name.removeprefix("transformer.")] = m.scale * (b2.astype("f8") @ a2.astype("f8"))
    return out


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(diffusers dir, kohya file, the original deltas in float64)."""
    tmp = tmp_path_factory.mktemp("flux")
    factors = _factors()
    layers = {}
    for n, (a, b) in factors.items():
        layers[f"{n}.lora_A.weight"], layers[f"{n}.lora_B.weight"] = a, b
    config = {"r": 2, "lora_alpha": 2.0, "target_modules": sorted(MODULES),
              "rank_pattern": {n: r for n, (_, _, r, _) in MODULES.items()},
              "alpha_pattern": {n: al for n, (_, _, _, al) in MODULES.items()}}
    lora_pipeline.FluxLoraLoaderMixin.save_lora_weights(tmp / "diffusers", transformer_lora_layers=layers,
                                                        transformer_lora_adapter_metadata=config)
    deltas = {n: (al / r) * (factors[n][1].double() @ factors[n][0].double()).numpy()
              for n, (_, _, r, al) in MODULES.items()}
    adapter = load_adapter(tmp / "diffusers")
    assert adapter.format == "diffusers" and _close(_deltas_of(adapter), deltas)  # the source is read right
    out = write_adapter(adapter, tmp / "flux_kohya.safetensors", "kohya")
    return tmp, out, deltas


def _close(got: dict, want: dict, tol=1e-5) -> bool:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=tol, atol=tol * max(1.0, np.abs(want[n]).max()), err_msg=n)
    return True


def test_flux_is_written_with_sd_scripts_names(flux):
    _, out, _ = flux
    keys = SafetensorsFile(out).keys()
    names = {k.split(".", 1)[0] for k in keys}
    assert names == SD_SCRIPTS
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    st = SafetensorsFile(out)
    # fused shapes: qkv stacks three rank-4 A (12 × H) over a 24 × 12 block-diagonal B
    assert st.ref("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight").shape == (12, H)
    assert st.ref("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight").shape == (3 * H, 12)
    assert st.ref("lora_unet_single_blocks_0_linear1.lora_up.weight").shape == (7 * W, 8)
    assert st.ref("lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight").shape == (6, H)  # add_k: rank 0
    record = json.loads(st.metadata[kohya.FUSED_KEY])
    assert record["lora_unet_double_blocks_0_txt_attn_qkv"] == {"ranks": [2, 0, 4], "alphas": [1.0, None, 8.0]}
    assert set(record) == {n for n in SD_SCRIPTS if n.endswith(("_qkv", "_linear1"))}


def test_diffusers_reads_every_module_with_the_same_deltas(flux):
    """diffusers' own conversion of our file: every module of the adapter, no key left over, each
    delta the original's (the loader folds alpha/r into the factors and loads at scale 1)."""
    _, out, deltas = flux
    sd = lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(str(out))
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in sd}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert modules == set(MODULES) | FILLED  # nothing dropped; the filled parts only added
    got = {}
    for n in modules:
        key = n if f"{n}.lora_A.weight" in sd else f"transformer.{n}"
        got[n] = (sd[f"{key}.lora_B.weight"].double() @ sd[f"{key}.lora_A.weight"].double()).numpy()
    for n in FILLED:
        assert not got.pop(n).any()
    assert _close(got, deltas)


def test_diffusers_loads_the_blocks_into_a_flux_transformer(tmp_path):
    """Into a (tiny) FluxTransformer2DModel through ``load_lora_weights``: every double- and
    single-block module gets its LoRA, with the original delta."""
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                             pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    blocks = sorted(n for n in lin if n.startswith("transformer_blocks.")
                    or n in ("single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.norm.linear"))
    g = torch.Generator().manual_seed(1)
    modules = {}
    for i, n in enumerate(blocks):
        r = 2 + i % 3
        modules[f"transformer.{n}"] = module_of(
            name=f"transformer.{n}", kind=LayerKind.LINEAR, alpha=float(r + i % 2),
            lora_A=host_tensor(torch.randn(r, lin[n].in_features, generator=g).numpy(), "F32"),
            lora_B=host_tensor(torch.randn(lin[n].out_features, r, generator=g).numpy(), "F32"))
    adapter = Adapter(format="diffusers", modules=modules, components=("transformer",))
    out = write_adapter(adapter, tmp_path / "tiny.safetensors", "kohya")
    assert all(k.startswith("lora_unet_double_blocks_0_") or k.startswith("lora_unet_single_blocks_0_")
               for k in SafetensorsFile(out).keys())

    class Pipe(lora_pipeline.FluxLoraLoaderMixin):
        transformer, text_encoder, hf_device_map, components = model, None, None, {}

    Pipe().load_lora_weights(str(out))
    want = _deltas_of(adapter)
    got = {}
    for n in blocks:
        layer = model.get_submodule(n)
        assert "default_0" in getattr(layer, "lora_A", {}), f"{n}: no LoRA loaded"
        a, b = layer.lora_A["default_0"].weight, layer.lora_B["default_0"].weight
        got[n] = layer.scaling["default_0"] * (b.double() @ a.double()).detach().numpy()
    assert _close(got, want)


def test_loratool_reads_back_the_parts_it_fused(flux, tmp_path):
    _, out, deltas = flux
    back = load_adapter(out)
    assert back.components == ("transformer",)
    assert set(back.modules) == {f"transformer.{n}" for n in MODULES}  # the recorded ranks: no filled parts
    assert {n: back.modules[f"transformer.{n}"].rank for n in MODULES} == {n: v[2] for n, v in MODULES.items()}
    assert _close(_deltas_of(back), deltas)
    # and writes the same file again, byte for byte
    again = write_adapter(back, tmp_path / "again.safetensors", "kohya")
    a, b = SafetensorsFile(out), SafetensorsFile(again)
    assert a.keys() == b.keys() and all(a.read_bytes(k) == b.read_bytes(k) for k in a.keys())
    assert a.metadata == b.metadata


def _sd_scripts_file(path, dtype="BF16"):
    """A file laid out as sd-scripts writes Flux: fused modules with one A (rank r) and dense B."""
    rng = np.random.default_rng(0)
    shapes = {"double_blocks_0_img_attn_qkv": (3 * H, H), "double_blocks_0_txt_mod_lin": (6 * H, H),
              "single_blocks_0_linear1": (7 * W, H), "final_layer_adaLN_modulation_1": (2 * H, H)}
    items = []
    for n, (o, i) in shapes.items():
        items += [(f"lora_unet_{n}.lora_down.weight", host_tensor(rng.standard_normal((4, i)), dtype)),
                  (f"lora_unet_{n}.lora_up.weight", host_tensor(rng.standard_normal((o, 4)), dtype)),
                  (f"lora_unet_{n}.alpha", host_tensor(np.float32(2.0), dtype))]
    from loratool.safetensors_io import write_safetensors

    write_safetensors(path, sorted(items, key=lambda kv: kv[0]), {"ss_network_module": "networks.lora_flux"})
    return path


def test_sd_scripts_files_read_as_diffusers_modules(tmp_path):
    """A file that sd-scripts wrote (no record): each part gets the fused A and its rows of B
    (rank Σr), and writing it back gives the same file."""
    src = _sd_scripts_file(tmp_path / "sds.safetensors")
    a = load_adapter(src)
    assert sorted(a.modules) == sorted(f"transformer.{n}" for n in (
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.norm1_context.linear", "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v",
        "single_transformer_blocks.0.proj_mlp", "norm_out.linear"))
    st = SafetensorsFile(src)
    full = {k.removesuffix(".weight"): st.read(k).double() for k in st.keys()}

    def bfl(n):
        return 0.5 * (full[f"lora_unet_{n}.lora_up"] @ full[f"lora_unet_{n}.lora_down"]).numpy()

    want = {"transformer_blocks.0.norm1_context.linear": bfl("double_blocks_0_txt_mod_lin")}
    qkv, lin1, final = bfl("double_blocks_0_img_attn_qkv"), bfl("single_blocks_0_linear1"), \
        bfl("final_layer_adaLN_modulation_1")
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        want[f"transformer_blocks.0.attn.{p}"] = qkv[i * H:(i + 1) * H]
        want[f"single_transformer_blocks.0.attn.{p}"] = lin1[i * W:(i + 1) * W]
    want["single_transformer_blocks.0.proj_mlp"] = lin1[3 * W:]
    want["norm_out.linear"] = np.concatenate([final[H:], final[:H]])  # BFL (shift, scale) -> (scale, shift)
    assert _close(_deltas_of(a), want, tol=1e-6)
    assert all(m.rank == 4 for m in a.modules.values())
    again = SafetensorsFile(write_adapter(a, tmp_path / "again.safetensors", "kohya"))
    assert again.keys() == st.keys() and all(again.read_bytes(k) == st.read_bytes(k) for k in st.keys())
    assert again.metadata == st.metadata


def test_onetrainer_names_stay_a_choice_and_sd3_keeps_them(tmp_path):
    """A file with OneTrainer's names (lora_transformer_…) keeps them when written again; an SD3
    transformer (no BFL form: its width is not Flux's, no single blocks) gets them too."""
    rng = np.random.default_rng(1)
    items = []
    for n, (o, i) in {"transformer_blocks_0_attn_to_q": (H, H), "single_transformer_blocks_0_proj_out": (H, 5 * H)}.items():
        items += [(f"lora_transformer_{n}.lora_down.weight", host_tensor(rng.standard_normal((2, i)), "F32")),
                  (f"lora_transformer_{n}.lora_up.weight", host_tensor(rng.standard_normal((o, 2)), "F32"))]
    from loratool.safetensors_io import write_safetensors

    write_safetensors(tmp_path / "ot.safetensors", items, None)
    a = load_adapter(tmp_path / "ot.safetensors")
    assert kohya.layout_of(a).transformer_names == "onetrainer"
    again = SafetensorsFile(write_adapter(a, tmp_path / "again.safetensors", "kohya"))
    assert {k.split(".")[0] for k in again.keys()} == {"lora_transformer_transformer_blocks_0_attn_to_q",
                                                        "lora_transformer_single_transformer_blocks_0_proj_out"}
    sd3 = Adapter(format="diffusers", components=("transformer",), modules={
        "transformer.transformer_blocks.0.attn.to_q": module_of(
            name="transformer.transformer_blocks.0.attn.to_q", kind=LayerKind.LINEAR, alpha=2.0,
            lora_A=host_tensor(rng.standard_normal((2, 1536)), "F32"),
            lora_B=host_tensor(rng.standard_normal((1536, 2)), "F32"))})
    out = SafetensorsFile(write_adapter(sd3, tmp_path / "sd3.safetensors", "kohya"))
    assert {k.split(".")[0] for k in out.keys()} == {"lora_transformer_transformer_blocks_0_attn_to_q"}
    assert sdnames.is_flux([("transformer_blocks.0.attn.to_q", 3072)])
