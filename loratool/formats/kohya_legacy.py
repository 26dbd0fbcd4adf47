"""What older kohya/LyCORIS files leave unsaid: the kernel of a conv whose LoHa/LoKr factors are
flattened, and the Stable Diffusion family a file was trained on, which says it for the 1×1 convs.

LyCORIS has always stored a conv layer's LoHa factors, and LoKr's decomposed second factor,
flattened to 2-D: ``hada_w1_b`` (r, in·kh·kw), ``lokr_w2_b`` (r, in_n·kh·kw) (LyCORIS
``lycoris/loha.py``/``lokr.py`` of 2023, ``lycoris/modules/*.py`` since); only Tucker cores
(``hada_t1``, ``lokr_t2``) and LoKr's full ``lokr_w2`` keep the kernel in the tensor. The loaders
take the kernel from the model's layer (A1111's ``finalize_updown``, ComfyUI's
``reshape(weight.shape)``). Without the model:

* the UNet's ``conv1``/``conv2``, ``conv_in``/``conv_out`` and the down/upsamplers' ``conv`` are
  3×3 in every SD UNet, ``conv_shortcut`` 1×1: the name says it;
* a transformer's ``proj_in``/``proj_out`` is a 1×1 Conv2d in SD 1.x and a Linear in SD 2.x and
  SDXL (``use_linear_projection``); the values are the same, but diffusers loads SD 1.x's only as
  4-D Conv2d LoRA. The family comes from the file (``sd_family``): sd-scripts' metadata
  (``ss_base_model_version`` "sd_v1…"/"sd_v2…"/"sdxl…", ``modelspec.architecture``), SDXL's
  ``lora_te1_``/``lora_te2_`` and Stability UNet names, the widths of cross-attention keys (768
  SD 1.x, 1024 SD 2.x, 2048 SDXL) or of the text encoder (768 CLIP ViT-L, 1024 OpenCLIP ViT-H),
  then ``ss_v2`` and an official checkpoint's ``ss_sd_model_name``, in that order. Where nothing
  says, the module is read Linear-shaped and carries a ``layer_note`` saying so (a base,
  ``--base``, then decides: ``kinds/lycoris_base.kernel_fit``).
"""

from __future__ import annotations

import re
from typing import Callable

# sd-scripts' UNet convolutions with a 3×3 kernel (diffusers names)
CONV3 = ("conv1", "conv2", "conv", "conv_in", "conv_out")
SD1, SD2, SDXL = "SD 1.x", "SD 2.x", "SDXL"
_CROSS_WIDTH = {768: SD1, 1024: SD2, 2048: SDXL}  # attn2.to_k/to_v inputs: the text embedding width
_TE_WIDTH = {768: SD1, 1024: SD2}  # lora_te_ (one text encoder): CLIP ViT-L or OpenCLIP ViT-H
# ss_sd_model_name: the official checkpoints' file names and Hub ids only (a fine-tune's own name,
# "realisticVisionV2-0", says nothing about its architecture)
_MODEL_NAMES = {
    **dict.fromkeys(("v1-5-pruned-emaonly", "v1-5-pruned", "sd-v1-5", "sd-v1-4", "sd-v1-4-full-ema",
                     "runwayml/stable-diffusion-v1-5", "compvis/stable-diffusion-v1-4",
                     "stable-diffusion-v1-5/stable-diffusion-v1-5"), SD1),
    **dict.fromkeys(("v2-1_768-ema-pruned", "v2-1_512-ema-pruned", "768-v-ema", "512-base-ema",
                     "stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-1-base",
                     "stabilityai/stable-diffusion-2", "stabilityai/stable-diffusion-2-base"), SD2),
    **dict.fromkeys(("sd_xl_base_1.0", "sd_xl_base_1.0_0.9vae", "sd_xl_base_0.9",
                     "stabilityai/stable-diffusion-xl-base-1.0"), SDXL),
}


def _from_metadata(md: dict[str, str]) -> tuple[str, str] | None:
    version = (md.get("ss_base_model_version") or "").strip().lower()
    for prefix, family in (("sdxl", SDXL), ("sd_v2", SD2), ("sd_v1", SD1)):
        if version.startswith(prefix):
            return family, f"ss_base_model_version {version!r}"
    arch = (md.get("modelspec.architecture") or "").strip().lower()
    for prefix, family in (("stable-diffusion-xl", SDXL), ("stable-diffusion-v2", SD2), ("stable-diffusion-v1", SD1)):
        if arch.startswith(prefix):
            return family, f"modelspec.architecture {arch!r}"
    return None


def _input_width(roles: dict[str, str], shape: Callable[[str], tuple[int, ...]]) -> int | None:
    """The input width of a Linear module from its factors (LoRA, LoHa or LoKr), or None."""
    s = {role: shape(key) for role, key in roles.items()}
    if "lora_down.weight" in s and len(s["lora_down.weight"]) == 2:
        return s["lora_down.weight"][1]
    if "hada_w1_b" in s and len(s["hada_w1_b"]) == 2 and "hada_t1" not in s:
        return s["hada_w1_b"][1]
    w1 = s.get("lokr_w1", s.get("lokr_w1_b"))
    w2 = s.get("lokr_w2", s.get("lokr_w2_b"))
    if w1 and w2 and len(w1) == 2 and len(w2) == 2 and "lokr_t2" not in s:
        return w1[1] * w2[1]
    return None


def sd_family(metadata: dict[str, str], groups: dict[str, dict[str, str]],
              shape: Callable[[str], tuple[int, ...]]) -> tuple[str | None, str]:
    """(the Stable Diffusion family a kohya file was trained on, or None; what says it)."""
    found = _from_metadata(metadata)
    if found:
        return found
    names = list(groups)
    sdxl = next((n for n in names if n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_",
                                                   "lora_unet_middle_block_", "lora_unet_output_blocks_"))), None)
    if sdxl:
        return SDXL, f"module {sdxl!r} (SDXL naming)"
    for name, roles in sorted(groups.items()):
        width = _input_width(roles, shape)
        if name.startswith("lora_unet_") and name.endswith(("_attn2_to_k", "_attn2_to_v")) and width in _CROSS_WIDTH:
            return _CROSS_WIDTH[width], f"cross-attention width {width} ({name})"
        if name.startswith("lora_te_") and name.endswith(("_q_proj", "_k_proj", "_v_proj", "_mlp_fc1")) \
                and width in _TE_WIDTH:
            return _TE_WIDTH[width], f"text encoder width {width} ({name})"
    v2 = (metadata.get("ss_v2") or "").strip()
    if v2 in ("True", "False"):
        return (SD2 if v2 == "True" else SD1), f"ss_v2 {v2!r}"
    model = (metadata.get("ss_sd_model_name") or "").strip().lower()
    for name in (model, re.split(r"[/\\]", model)[-1]):  # a Hub id, or a checkpoint's file name
        stem = re.sub(r"\.(safetensors|ckpt)$", "", name)
        if stem in _MODEL_NAMES:
            return _MODEL_NAMES[stem], f"ss_sd_model_name {model!r}"
    return None, ""


def kernel_of(name: str, cols: int, family: str | None, what: str) -> tuple[tuple[int, ...], str | None]:
    """(the kernel of module ``name`` whose flattened factors have ``cols`` columns, or () for a
    Linear-shaped read; a note when that read is a guess). ``what``: the factor, for the note."""
    if not name.startswith("unet."):
        return (), None
    last = name.rsplit(".", 1)[-1]
    if last in CONV3:
        if cols % 9 == 0:
            return (3, 3), None
        return (), (f"{what} has {cols} columns, not a multiple of 9, though {last} is a 3×3 conv in every SD "
                    "UNet: read Linear-shaped; give the base (--base) to take the layer from it")
    if last == "conv_shortcut":
        return (1, 1), None
    if last in ("proj_in", "proj_out") and ".attentions." in name:
        if family == SD1:
            return (1, 1), None  # SD 1.x: a 1×1 Conv2d
        if family is not None:
            return (), None  # SD 2.x, SDXL: a Linear (use_linear_projection)
        return (), (f"{what} is flattened and the file does not say which Stable Diffusion it was trained on "
                    f"(no ss_base_model_version, modelspec.architecture or ss_v2 metadata, no SDXL names, no "
                    f"telling widths): {last} is a 1×1 Conv2d in SD 1.x and a Linear in SD 2.x/SDXL; read as "
                    "Linear; give the base (--base) to take the layer from it")
    return (), None
