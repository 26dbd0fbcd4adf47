"""LyCORIS LoHa and LoKr networks that lycoris-lora writes on a real (tiny) diffusers
UNet2DConditionModel, converted to plain LoRA by ``loratool convert --to diffusers --base``, load in
diffusers' own LoRA loader (``load_lora_weights``'s UNet path: ``lora_state_dict``, then
``load_lora_into_unet``) with no module dropped, and the PEFT layers diffusers builds apply
lycoris's forward-pass ΔW (the scale once) within float32 rounding. The base says what flattened
factors do not: SD 1.5's proj_in/proj_out are 1×1 convs, which diffusers loads only as Conv2d LoRA.
One test function: importing diffusers is slow.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")
pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from fixtures import lycoris_nets as fx  # noqa: E402

SEED = 53
# the SD 1.5 block layout, smaller (tests/test_sd_bases.py): cross-attention blocks, resnets, a
# downsampler and an upsampler; channel counts LoKr can factor (32 = 4·8, 64 = 8·8)
UNET = dict(sample_size=8, layers_per_block=1, attention_head_dim=8, norm_num_groups=8, cross_attention_dim=32,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CASES = {"loha": fx.CASES["loha"], "lokr_one": fx.CASES["lokr_one"], "lokr_both": fx.CASES["lokr_both"]}


def _reference(lm) -> "torch.Tensor":
    """ΔW in float64 as lycoris's forward pass applies it (the scale once; its get_diff_weight scales
    LoHa and LoKr twice when alpha ≠ dim, issue 15)."""
    with torch.no_grad():
        return (lm.get_weight(lm.shape) * lm.scalar).double()


def test_converted_loha_and_lokr_load_in_diffusers(tmp_path):
    import logging

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from loratool.convert import convert

    logging.getLogger("lycoris").setLevel(logging.ERROR)
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    base = UNet2DConditionModel(**UNET)
    # the base: it says which flattened factors are SD 1.5's 1×1 proj_in/proj_out convs
    save_file({f"unet.{k}": v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    for i, (case, (algo, kw)) in enumerate(CASES.items()):
        trained = copy.deepcopy(base)
        names = {id(mod): name for name, mod in trained.named_modules()}
        net = fx.make_network(trained, algo, kw, SEED + i)
        path = tmp_path / f"{case}.safetensors"
        net.save_weights(str(path), torch.float32, {})
        net.to(torch.float64)
        refs = {names[id(lm.org_module[0])]: _reference(lm) for lm in net.loras}
        assert any(r.dim() == 4 and r.shape[-1] == 3 for r in refs.values())  # 3×3 convs among them
        assert any(r.dim() == 4 and r.shape[-1] == 1 for r in refs.values())  # and 1×1 (proj_in, proj_out)

        res = convert(path, "diffusers", tmp_path / f"{case}_diffusers.safetensors", base=tmp_path / "base.safetensors")
        assert {c.algorithm for c in res.conversions} == {"LoHa" if algo == "loha" else "LoKr"}
        assert max(c.relative_error for c in res.conversions) < 1e-12 and len(res.conversions) == len(refs)

        unet = copy.deepcopy(base)
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(res.output))
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name=case)
        layers = {name: mod for name, mod in unet.named_modules()
                  if isinstance(mod, BaseTunerLayer) and case in getattr(mod, "lora_A", {})}
        assert set(layers) == set(refs), (case, sorted(set(refs) ^ set(layers))[:5])  # no module dropped
        for name, layer in layers.items():
            ref = refs[name]
            with torch.no_grad():
                got = layer.get_delta_weight(case).double()  # PEFT's B @ A · scaling
                b = layer.lora_B[case].weight.double().flatten(1)
                a = layer.lora_A[case].weight.double().flatten(1)
            assert got.shape == ref.shape, (name, got.shape, ref.shape)
            # float32: the factors rounded once each, PEFT's product summed over k in float32
            k = a.shape[0]
            tol = (k + 4) * 2.0 ** -24 * layer.scaling[case] * (b.abs() @ a.abs()).reshape(ref.shape)
            err = (got - ref).abs() - tol
            assert bool((err <= 1e-30).all()), (case, name, float(err.max()))
