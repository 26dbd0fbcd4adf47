"""Stable Diffusion module names: kohya's underscore form <-> dotted diffusers names.

kohya/sd-scripts names a LoRA module ``lora_unet_`` + its path in the model with every ``.``
replaced by ``_`` (networks/lora.py: ``(prefix + "." + name + "." + child_name).replace(".", "_")``).
That loses information, because diffusers' own names contain underscores (``down_blocks``,
``to_q``, ``time_emb_proj``). diffusers undoes it with a chain of substring replacements
(loaders/lora_conversion_utils.py, ``_convert_unet_lora_key``), which can fire inside longer
words. We split the kohya name into ``_`` tokens instead and re-join, left to right, the longest
run of tokens that spells a known multi-word module name; every other boundary becomes a dot.
Names made only of known words therefore round-trip exactly: ``to_kohya(from_kohya(n)) == n`` for
every kohya name (each ``_`` and ``.`` maps back to ``_``), and ``from_kohya(to_kohya(d)) == d`` for
every dotted name whose multi-word parts are in ``COMPOUNDS``.

SDXL LoRAs from sd-scripts use the original Stability (SGM/LDM) UNet names
(``input_blocks_4_1_transformer_blocks_0_attn1_to_q``), because sd-scripts' SDXL UNet is a port
of that model (library/sdxl_original_unet.py). ``sgm_to_diffusers`` maps those onto
``UNet2DConditionModel`` names the way diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` does for
``layers_per_block=2`` (every SD 1.x/2.x/XL UNet), deciding resnet/attention/upsampler from the
name's content rather than from a UNet config; ``diffusers_to_sgm`` is its inverse.
"""

from __future__ import annotations

import re

# Multi-word module names, as tuples of their ``_`` tokens. Sources: diffusers
# UNet2DConditionModel / Transformer2DModel / Attention / ResnetBlock2D; transformers CLIPTextModel
# and T5EncoderModel; the SGM UNet (sd-scripts sdxl_original_unet.py); diffusers' Flux / SD3
# transformers (OneTrainer writes those as ``lora_transformer_…``).
_WORDS = """
down_blocks mid_block up_blocks transformer_blocks single_transformer_blocks
proj_in proj_out to_q to_k to_v to_out to_add_out add_q_proj add_k_proj add_v_proj
norm_q norm_k norm_added_q norm_added_k norm_cross norm_out norm1_context ff_context proj_mlp
time_emb_proj conv_shortcut conv_in conv_out conv_norm_out time_embedding linear_1 linear_2
add_embedding add_time_proj class_embedding encoder_hid_proj
text_model self_attn q_proj k_proj v_proj out_proj layer_norm1 layer_norm2 final_layer_norm
token_embedding position_embedding text_projection wi_0 wi_1 relative_attention_bias
input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection
time_embed label_emb
x_embedder context_embedder time_text_embed timestep_embedder guidance_embedder text_embedder
pos_embed
"""
COMPOUNDS: frozenset[tuple[str, ...]] = frozenset(tuple(w.split("_")) for w in _WORDS.split())
_MAX_WORDS = max(len(c) for c in COMPOUNDS)


def from_kohya(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in`` (no
    component prefix, no SGM mapping)."""
    tokens = name.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(_MAX_WORDS, len(tokens) - i), 1, -1):
            if tuple(tokens[i:i + n]) in COMPOUNDS:
                parts.append("_".join(tokens[i:i + n]))
                i += n
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def to_kohya(name: str) -> str:
    """The inverse: every dot becomes an underscore (what sd-scripts does)."""
    return name.replace(".", "_")


# -- SGM (original Stability UNet) <-> diffusers UNet2DConditionModel ----------------------------

# Inside a ResBlock: SGM child -> diffusers child (the norms too: modules_to_save may name them;
# names outside these tables are left unmapped).
_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
           "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_SGM_HEADS = ("input_blocks.", "middle_block.", "output_blocks.")
LAYERS_PER_BLOCK = 2  # every SD 1.x / 2.x / XL UNet


def is_sgm(name: str) -> bool:
    return name.startswith(_SGM_HEADS) or name in _TOP


def sgm_to_diffusers(name: str) -> str:
    """``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` ->
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. A name that fits no SGM
    pattern is returned unchanged."""
    if name in _TOP:
        return _TOP[name]
    per = LAYERS_PER_BLOCK + 1
    m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", name)
    if m:  # [ResBlock, SpatialTransformer, ResBlock], no inner index
        i, rest = int(m.group(1)), m.group(2)
        if i == 1:
            return f"mid_block.attentions.0.{rest}"
        rest_d = _RESNET.get(rest)
        return f"mid_block.resnets.{i // 2}.{rest_d}" if i in (0, 2) and rest_d else name
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)", name)
    if not m:
        return name
    head, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if head == "input_blocks":  # input_blocks.0 is conv_in; then per block [Res, (Attn)] x2, Down
        if i == 0:
            return name
        block, layer = (i - 1) // per, (i - 1) % per
        if layer == LAYERS_PER_BLOCK:
            return f"down_blocks.{block}.downsamplers.0.conv" if (j, rest) == (0, "op") else name
        if j == 0:
            rest_d = _RESNET.get(rest)
            return f"down_blocks.{block}.resnets.{layer}.{rest_d}" if rest_d else name
        return f"down_blocks.{block}.attentions.{layer}.{rest}" if j == 1 else name
    # output_blocks: per block 3 x [ResBlock, (SpatialTransformer)], the last one + (Upsample)
    block, layer = i // per, i % per
    if j == 0:
        rest_d = _RESNET.get(rest)
        return f"up_blocks.{block}.resnets.{layer}.{rest_d}" if rest_d else name
    if rest == "conv" and j in (1, 2) and layer == LAYERS_PER_BLOCK:
        return f"up_blocks.{block}.upsamplers.0.conv"
    return f"up_blocks.{block}.attentions.{layer}.{rest}" if j == 1 else name


def diffusers_to_sgm(name: str, up_blocks_with_attention: set[int] | None = None) -> str:
    """The inverse of ``sgm_to_diffusers``. ``up_blocks_with_attention`` says which up blocks have
    attentions (their upsampler then sits at index 2 of the SGM output block, else at 1); by
    default SDXL's layout (up blocks 0 and 1). Names that have no SGM form are returned unchanged."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    per = LAYERS_PER_BLOCK + 1
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", name)
    if m:
        head, block, kind, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if head == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{per * block + per}.0.op" if (layer, rest) == (0, "conv") else name
            if layer >= LAYERS_PER_BLOCK or kind == "upsamplers":
                return name
            if kind == "resnets":
                rest_s = _RESNET_BACK.get(rest)
                return f"input_blocks.{per * block + layer + 1}.0.{rest_s}" if rest_s else name
            return f"input_blocks.{per * block + layer + 1}.1.{rest}"
        if kind == "upsamplers":
            if (layer, rest) != (0, "conv"):
                return name
            attn = up_blocks_with_attention if up_blocks_with_attention is not None else {0, 1}
            return f"output_blocks.{per * block + LAYERS_PER_BLOCK}.{2 if block in attn else 1}.conv"
        if layer > LAYERS_PER_BLOCK or kind == "downsamplers":
            return name
        if kind == "resnets":
            rest_s = _RESNET_BACK.get(rest)
            return f"output_blocks.{per * block + layer}.0.{rest_s}" if rest_s else name
        return f"output_blocks.{per * block + layer}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block.1.{rest}" if idx == 0 else name
        rest_s = _RESNET_BACK.get(rest)
        return f"middle_block.{2 * idx}.{rest_s}" if rest_s and idx in (0, 1) else name
    return name


# -- CLIP text encoders across transformers versions -------------------------------------------
# transformers 5 flattened CLIPTextModel: its modules are ``encoder.layers.0…`` where 4.x (and
# every SD checkpoint on disk, and every kohya file) has ``text_model.encoder.layers.0…``.
# Module names here follow the checkpoint tensors (``text_model.…``); a name saved from a
# flattened model is put back under ``text_model.``. T5 encoders (``encoder.block.…``) are left as
# they are.
_FLAT_CLIP = re.compile(r"(encoder\.layers\.\d+\.|embeddings\.|final_layer_norm$)")


def canonical_text_encoder_path(path: str) -> str:
    return f"text_model.{path}" if _FLAT_CLIP.match(path) else path


def version_neutral_text_encoder_target(path: str) -> str:
    """A PEFT target/pattern key that matches the module under both transformers 4
    (``text_model.encoder…``) and 5 (``encoder…``): PEFT matches it as a dot-bounded suffix."""
    return path[len("text_model."):] if path.startswith("text_model.") else path


# -- single-file Stable Diffusion checkpoints (LDM / SGM names) -----------------------------------
# What kohya's merge_lora.py, A1111/ComfyUI and most SD users hold: one .safetensors file with the
# original Stability names. The UNet sits under ``model.diffusion_model.`` with SGM block names
# (``diffusers_to_sgm``; the inner names of attention blocks are diffusers'), the CLIP-L text
# encoder under ``cond_stage_model.transformer.`` (SD 1.x) or ``conditioner.embedders.0.transformer.``
# (SDXL) with transformers 4 names. SD 2.x's text encoder and SDXL's second one are OpenCLIP
# (``….model.transformer.resblocks.N.attn.in_proj_weight``): q, k and v are rows of one fused
# tensor, which no LoRA module names on its own. The VAE (``first_stage_model.``) has no LoRA.
LDM_UNET = "model.diffusion_model."
LDM_CLIP_L = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
LDM_OPEN_CLIP = ("cond_stage_model.model.", "conditioner.embedders.1.model.")


def is_ldm(names) -> bool:
    """Whether tensor ``names`` are a single-file SD/SDXL checkpoint's (a UNet under
    ``model.diffusion_model.``)."""
    return any(n.startswith(LDM_UNET) for n in names)


def ldm_names(component: str, path: str) -> list[str]:
    """The tensor-name stems (without ``.weight``) that the diffusers module ``path`` of pipeline
    ``component`` may have in a single-file checkpoint: the caller keeps the one that exists.
    A UNet upsampler has two (``output_blocks.N.1.conv`` when its up block has no attention, as in
    SD 1.x's first one, else ``….2.conv``); names with no LDM form have none."""
    if component == "unet":
        m = re.match(r"up_blocks\.(\d+)\.", path)
        forms = {diffusers_to_sgm(path, set()), diffusers_to_sgm(path, {int(m.group(1))} if m else set())}
        return sorted(LDM_UNET + n for n in forms if n != path)
    if component == "text_encoder" and path.startswith("text_model."):
        return [p + path for p in LDM_CLIP_L]
    return []


def ldm_refusal(component: str, names) -> str | None:
    """Why a module of ``component`` cannot be merged into the single-file checkpoint whose tensor
    ``names`` are given, when the reason is the checkpoint's layout (OpenCLIP's fused q/k/v)."""
    if component not in ("text_encoder", "text_encoder_2"):
        return None
    clip_l = any(n.startswith(LDM_CLIP_L) for n in names)
    if component == "text_encoder" and clip_l:
        return None
    open_clip = [p for p in LDM_OPEN_CLIP if any(n.startswith(p) for n in names)]
    if open_clip:
        return (f"{component} is OpenCLIP in a single-file SD checkpoint ({open_clip[-1]}…, q/k/v fused in "
                "in_proj_weight), which has no tensor per LoRA module; merge into the diffusers pipeline "
                f"folder instead, or drop the {component} modules")
    return None
