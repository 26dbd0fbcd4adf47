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

import math
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
# (SDXL) with transformers 4 names. SD 2.x's text encoder and SDXL's second one (the refiner's only
# one, under ``conditioner.embedders.0.model.``) are OpenCLIP: ``….model.transformer.resblocks.N.``
# with ``attn.out_proj``, ``mlp.c_fc`` (fc1), ``mlp.c_proj`` (fc2), ``ln_1``/``ln_2``, and q, k and v
# fused by rows into ``attn.in_proj_weight`` [3d, d] (and ``in_proj_bias``): rows [0, d) are q,
# [d, 2d) k, [2d, 3d) v (diffusers' ``convert_open_clip_checkpoint`` and sd-scripts'
# ``convert_sdxl_text_encoder_2_checkpoint`` split them so). A q/k/v module's target is then a
# block of rows of that tensor (``ldm_targets``: part i of 3). ``text_projection`` is a bare matrix
# stored transposed (x @ P where transformers has a Linear): no LoRA module is merged into it here.
# The VAE (``first_stage_model.``) has no LoRA.
LDM_UNET = "model.diffusion_model."
LDM_CLIP_L = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
LDM_OPEN_CLIP = ("cond_stage_model.model.", "conditioner.embedders.1.model.", "conditioner.embedders.0.model.")
# which pipeline component each OpenCLIP prefix is: SD 2.x's text_encoder, SDXL's (and the refiner's)
# text_encoder_2
_OPEN_CLIP_OF = {"text_encoder": LDM_OPEN_CLIP[:1], "text_encoder_2": LDM_OPEN_CLIP[1:]}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
_OPEN_CLIP_TOP = {"text_model.final_layer_norm": "ln_final", "text_model.embeddings.token_embedding": "token_embedding"}


def is_ldm(names) -> bool:
    """Whether tensor ``names`` are a single-file SD/SDXL checkpoint's (a UNet under
    ``model.diffusion_model.``)."""
    return any(n.startswith(LDM_UNET) for n in names)


def ldm_names(component: str, path: str) -> list[str]:
    """The tensor-name stems (without ``.weight``) that the diffusers module ``path`` of pipeline
    ``component`` may have in a single-file checkpoint: the caller keeps the one that exists.
    A UNet upsampler has two (``output_blocks.N.1.conv`` when its up block has no attention, as in
    SD 1.x's first one, else ``….2.conv``); names with no LDM form have none. (OpenCLIP's names
    depend on the tensor, not only the module: ``ldm_targets``.)"""
    if component == "unet":
        m = re.match(r"up_blocks\.(\d+)\.", path)
        forms = {diffusers_to_sgm(path, set()), diffusers_to_sgm(path, {int(m.group(1))} if m else set())}
        return sorted(LDM_UNET + n for n in forms if n != path)
    if component == "text_encoder" and path.startswith("text_model."):
        return [p + path for p in LDM_CLIP_L]
    return []


def open_clip_name(path: str, leaf: str) -> tuple[str, int, int] | None:
    """OpenCLIP's name (after its ``….model.`` prefix) of tensor ``leaf`` of the transformers CLIP
    module ``path`` (``text_model.…``), as (name, part, parts): the tensor holds ``parts`` equal row
    blocks and this module's is block ``part`` (q, k, v: 0, 1, 2 of ``in_proj_*``); None if the
    module has no OpenCLIP tensor (``text_projection`` among them)."""
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", path)
    if m:
        head, rest = f"transformer.resblocks.{m.group(1)}.", m.group(2)
        proj = rest[len("self_attn."):] if rest.startswith("self_attn.") else None
        if proj in _QKV:
            return (f"{head}attn.in_proj_{leaf}", _QKV[proj], 3) if leaf in ("weight", "bias") else None
        return (f"{head}{_OPEN_CLIP_LAYER[rest]}.{leaf}", 0, 1) if rest in _OPEN_CLIP_LAYER else None
    if path in _OPEN_CLIP_TOP:
        return f"{_OPEN_CLIP_TOP[path]}.{leaf}", 0, 1
    if path == "text_model.embeddings.position_embedding" and leaf == "weight":
        return "positional_embedding", 0, 1  # a bare parameter, the same layout as the Embedding's weight
    return None


def ldm_targets(component: str, path: str, leaf: str) -> list[tuple[str, int, int]]:
    """The tensors that tensor ``leaf`` (``weight``, ``bias``) of the diffusers module ``path`` of
    pipeline ``component`` may be in a single-file checkpoint, as (tensor name, part, parts): the
    whole tensor (0, 1), or its row block ``part`` of ``parts`` equal ones (OpenCLIP's fused q/k/v).
    The caller keeps the one that exists."""
    out = [(f"{stem}.{leaf}", 0, 1) for stem in ldm_names(component, path)]
    found = open_clip_name(path, leaf) if component in _OPEN_CLIP_OF else None
    if found:
        name, part, parts = found
        out += [(prefix + name, part, parts) for prefix in _OPEN_CLIP_OF[component]]
    return out


def ldm_refusal(component: str, path: str, names) -> str | None:
    """Why module ``path`` of ``component`` cannot be merged into the single-file checkpoint whose
    tensor ``names`` are given, when the reason is the checkpoint's layout: OpenCLIP's
    ``text_projection``, a bare matrix stored transposed."""
    if component not in _OPEN_CLIP_OF or path != "text_projection":
        return None
    found = [p for p in _OPEN_CLIP_OF[component] if p + "text_projection" in names]
    if not found:
        return None
    return (f"{component}.text_projection is OpenCLIP's bare {found[0]}text_projection in a single-file SD "
            "checkpoint (stored transposed, no Linear layer), which a LoRA module is not merged into; merge "
            f"into the diffusers pipeline folder instead, or drop the {component}.text_projection module")


# -- Flux: diffusers' FluxTransformer2DModel <-> BFL's original names (sd-scripts) ---------------
# sd-scripts trains Flux.1 on Black Forest Labs' own model (library/flux_models.py) and names its
# modules ``lora_unet_double_blocks_0_img_attn_qkv``; diffusers loads those files
# (loaders/lora_conversion_utils.py ``_convert_kohya_flux_lora_to_diffusers``), where the
# OneTrainer names (``lora_transformer_…``) lose the blocks' MLPs, norms and proj_out. BFL fuses what
# diffusers splits: ``img_attn.qkv`` is to_q, to_k and to_v stacked by rows, a single block's
# ``linear1`` is to_q, to_k, to_v and proj_mlp; ``final_layer.adaLN_modulation.1`` is diffusers'
# ``norm_out.linear`` with the two halves of its output (shift, scale) in the other order.
_FLUX_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
                "modulation.lin": ("norm.linear",)}
_FLUX_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
FLUX_SWAPPED = "final_layer.adaLN_modulation.1"  # rows: BFL (shift, scale), diffusers (scale, shift)
FLUX_MLP_RATIO = 4  # Flux.1: proj_mlp has 4 × hidden outputs (diffusers' converter: 12288 = 4 · 3072)
FLUX_HIDDEN = 3072
_BLOCKS = {"double_blocks": ("transformer_blocks", _FLUX_DOUBLE), "single_blocks": ("single_transformer_blocks",
                                                                                    _FLUX_SINGLE)}
_TO_BFL: dict[str, tuple[str, dict[str, tuple[str, int]]]] = {
    d: (b, {part: (bfl, i) for bfl, parts in table.items() for i, part in enumerate(parts)})
    for b, (d, table) in _BLOCKS.items()}
_FLUX_TOP_BACK = {v: k for k, v in _FLUX_TOP.items()}
_KOHYA_TAILS = {b: {to_kohya(k): k for k in table} for b, (_, table) in _BLOCKS.items()}
_KOHYA_TOP = {to_kohya(k): k for k in _FLUX_TOP}


def flux_from_bfl(path: str) -> tuple[str, ...] | None:
    """BFL module -> the diffusers modules it holds, in row order: ``double_blocks.0.img_attn.qkv``
    -> (``transformer_blocks.0.attn.to_q``, ``….to_k``, ``….to_v``); None for any other name."""
    if path in _FLUX_TOP:
        return (_FLUX_TOP[path],)
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", path)
    if not m or m.group(3) not in _BLOCKS[m.group(1)][1]:
        return None
    head, table = _BLOCKS[m.group(1)]
    return tuple(f"{head}.{m.group(2)}.{p}" for p in table[m.group(3)])


def flux_to_bfl(path: str) -> tuple[str, int] | None:
    """diffusers Flux module -> (BFL module, the part it is of it): ``single_transformer_blocks.3.
    proj_mlp`` -> (``single_blocks.3.linear1``, 3); None for a name with no BFL form."""
    if path in _FLUX_TOP_BACK:
        return _FLUX_TOP_BACK[path], 0
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", path)
    if not m or m.group(3) not in _TO_BFL[m.group(1)][1]:
        return None
    head, table = _TO_BFL[m.group(1)]
    bfl, i = table[m.group(3)]
    return f"{head}.{m.group(2)}.{bfl}", i


def bfl_from_kohya(rest: str) -> str | None:
    """sd-scripts' Flux name without ``lora_unet_`` -> BFL's dotted name (``double_blocks_0_img_attn_
    qkv`` -> ``double_blocks.0.img_attn.qkv``); None if it is not one."""
    if rest in _KOHYA_TOP:
        return _KOHYA_TOP[rest]
    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(.+)", rest)
    tail = _KOHYA_TAILS[m.group(1)].get(m.group(3)) if m else None
    return f"{m.group(1)}.{m.group(2)}.{tail}" if tail else None


def is_flux(paths_and_inputs) -> bool:
    """Whether a pipeline's ``transformer`` modules, as (path, in_features) pairs, are Flux.1's:
    every name has a BFL form (or is one), and one is Flux's alone (single blocks, the guidance
    embedder, x_embedder) or has Flux's width (SD3 shares the double-block names, not the width)."""
    items = list(paths_and_inputs)
    if not items or not all(flux_to_bfl(p) or flux_from_bfl(p) for p, _ in items):
        return False
    own = ("single_transformer_blocks.", "single_blocks.", "double_blocks.", "x_embedder", "img_in",
           "time_text_embed.guidance_embedder.", "guidance_in.")
    return any(p.startswith(own) or n == FLUX_HIDDEN for p, n in items)


def flux_part_rows(bfl: str, outs: list[int | None], in_features: int, total: int | None = None) -> list[int] | None:
    """The output rows of each part of the fused BFL module ``bfl``, from the parts' own row counts
    (None where a part is missing) or, for a fused module read whole, from its ``total`` rows.
    q, k and v have as many rows as each other, and as the module has inputs (Flux's hidden size)
    where none is known; proj_mlp ``FLUX_MLP_RATIO`` times as many. None if the rows do not fit."""
    n = len(flux_from_bfl(bfl) or ())
    attn = next((o for o in outs[:3] if o is not None), None)
    if total is not None:
        if n == 3:
            attn = total // 3 if total % 3 == 0 else None
        elif attn is None:
            attn = in_features if total == (3 + FLUX_MLP_RATIO) * in_features else (
                total // (3 + FLUX_MLP_RATIO) if total % (3 + FLUX_MLP_RATIO) == 0 else None)
        if attn is None:
            return None
    attn = attn if attn is not None else in_features
    rows = [attn] * 3 + ([FLUX_MLP_RATIO * attn] if n == 4 else [])
    rows = [o if o is not None else r for o, r in zip(outs, rows)] if outs else rows
    return rows if total is None or sum(rows) == total else None


# -- Flux: BFL modules that hold several diffusers modules (flux_from_bfl) -----------------------
# Writing stacks the parts' A (Σr × in) over a block-diagonal B (Σout × Σr) under one alpha, each
# part's scale over the first's multiplied into its block of B, so that the fused ΔW is the parts'
# ΔW one under the other; a missing part is zero rows. When all parts share A and scale (what
# reading an sd-scripts file gives), A is kept and the B are stacked: the file's own bytes. The
# parts' ranks and alphas go into the metadata (kohya's FUSED_KEY); reading splits by them when B
# is zero off their blocks, else gives every part the whole A and its rows of B (rank Σr, same ΔW).
# final_layer's two modules are written with alpha = r and their scale in B: diffusers (0.42)
# reads them without their alpha (a kohya file's own alpha is kept, as sd-scripts and ComfyUI read it). A scale ratio that is a power of two is exact in any dtype; any
# other is one float32 rounding (16-bit factors are then written in float32).

def _storage(src):
    """A factor in memory, bit for bit (bfloat16 as its bits): a ``HostTensor``."""
    import numpy as np

    from loratool.adapter import dtype_of, float_values
    from loratool.safetensors_io import STORAGE, HostTensor, TensorRef, host_tensor

    if isinstance(src, HostTensor):
        return src
    if isinstance(src, TensorRef):
        return HostTensor(src.dtype, np.frombuffer(src.raw(), STORAGE[src.dtype]).reshape(src.shape))
    return host_tensor(float_values(src), dtype_of(src))


def _kohya_alpha(m) -> float:
    return m.alpha * math.sqrt(m.rank) if m.use_rslora else m.alpha  # kohya's scale is alpha/r


def _swap_halves(t):
    """Rows (a, b) -> (b, a): BFL's final_layer.adaLN_modulation.1 <-> diffusers' norm_out.linear."""
    import numpy as np

    from loratool.safetensors_io import HostTensor

    h = t.shape[0] // 2
    return HostTensor(t.dtype, np.concatenate([t.array[h:], t.array[:h]]))


def flux_fuse(bfl: str, parts: list, fold_final: bool = True):
    """(A, B, kohya alpha, fused record or None) of the BFL module ``bfl`` from its diffusers parts
    (LoRA modules, in row order; None for a missing one). ``fold_final``: final_layer's scale goes
    into B (not for an adapter read from a kohya file, whose alpha stays as it was)."""
    import numpy as np

    from loratool.adapter import float_values
    from loratool.safetensors_io import STORAGE, HostTensor, host_tensor

    present = [m for m in parts if m is not None]
    first = present[0]
    if len(parts) == 1:
        b, alpha = first.lora_B, _kohya_alpha(first)
        if fold_final and bfl.startswith("final_layer.") and alpha != first.rank:  # diffusers 0.42 reads these without alpha
            x, ratio = _storage(b), alpha / first.rank
            bd = x.dtype if x.dtype in ("F32", "F64") or math.frexp(ratio)[0] == 0.5 else "F32"
            b, alpha = host_tensor(float_values(x).astype("f8") * ratio, bd), float(first.rank)
        b = _swap_halves(_storage(b)) if bfl == FLUX_SWAPPED else b
        return first.lora_A, b, alpha, None
    rows = flux_part_rows(bfl, [m.out_features if m is not None else None for m in parts], first.in_features)
    # the rows go on record where reading could not tell them from the fused module's shape
    record: dict = {} if flux_part_rows(bfl, [], first.in_features, sum(rows)) == rows else {"rows": rows}
    A = [_storage(m.lora_A) if m is not None else None for m in parts]
    B = [_storage(m.lora_B) if m is not None else None for m in parts]
    a0, s0 = A[parts.index(first)], _kohya_alpha(first) / first.rank
    if all(_kohya_alpha(m) / m.rank == s0 and a.dtype == a0.dtype and a.raw() == a0.raw() for m, a in
           zip(parts, A) if m is not None) and len({b.dtype for b in B if b is not None}) == 1:
        bd = next(b for b in B if b is not None).dtype
        zero = lambda n: np.zeros((n, first.rank), STORAGE[bd])  # noqa: E731
        stack = [b.array if b is not None else zero(n) for b, n in zip(B, rows)]
        return first.lora_A, HostTensor(bd, np.concatenate(stack)), _kohya_alpha(first), record
    ranks = [m.rank if m is not None else 0 for m in parts]
    ratios = [_kohya_alpha(m) / m.rank / s0 if m is not None else 1.0 for m in parts]
    ad, bd = ({x.dtype for x in X if x is not None} for X in (A, B))
    ad = ad.pop() if len(ad) == 1 else "F64" if "F64" in ad else "F32"
    bd = bd.pop() if len(bd) == 1 else "F64" if "F64" in bd else "F32"
    if bd not in ("F32", "F64") and any(math.frexp(r)[0] != 0.5 for r in ratios):
        bd = "F32"  # a scale ratio that is no power of two: one float32 rounding, not a half-precision one
    a = np.concatenate([(x if x.dtype == ad else host_tensor(float_values(x), ad)).array for x in A if x is not None])
    b = np.zeros((sum(rows), sum(ranks)), STORAGE[bd])
    r0 = c0 = 0
    for x, n, r, ratio in zip(B, rows, ranks, ratios):
        if x is not None:
            same = ratio == 1.0 and x.dtype == bd
            b[r0:r0 + n, c0:c0 + r] = (x if same else host_tensor(float_values(x).astype("f8") * ratio, bd)).array
        r0, c0 = r0 + n, c0 + r
    alphas = [_kohya_alpha(m) if m is not None else None for m in parts]
    return HostTensor(ad, a), HostTensor(bd, b), s0 * sum(ranks), {**record, "ranks": ranks, "alphas": alphas}


def fused_record(raw: str | None) -> dict[str, dict]:
    """The fused-module note that ``flux_fuse``'s records make in a kohya file's metadata:
    lora_name -> {"rows": [...], "ranks": [...], "alphas": [...]} (each optional, ranks and alphas
    together); entries or fields of another shape are left out."""
    import json

    try:
        note = json.loads(raw or "{}")
    except ValueError:
        return {}
    def counts(x):
        return isinstance(x, list) and all(type(r) is int and r >= 0 for r in x)

    out: dict[str, dict] = {}
    for k, v in (note.items() if isinstance(note, dict) else ()):
        if not isinstance(v, dict):
            continue
        rows, ranks, alphas, entry = v.get("rows"), v.get("ranks"), v.get("alphas"), {}
        if counts(rows):
            entry["rows"] = rows
        if (counts(ranks) and isinstance(alphas, list) and len(ranks) == len(alphas)
                and all((a is None) == (r == 0) and (a is None or (type(a) in (int, float) and a > 0))
                        for r, a in zip(ranks, alphas))):
            entry.update(ranks=ranks, alphas=alphas)
        out[k] = entry
    return out


def flux_split(m, bfl: str, record) -> list | None:
    """A LoRA module read under a BFL name as the diffusers modules it holds (None: keep it whole),
    split by its ``fused_record`` entry where B is zero off the recorded blocks."""
    from dataclasses import replace

    import numpy as np

    from loratool.adapter import LayerKind, float_values
    from loratool.safetensors_io import HostTensor, host_tensor

    names = flux_from_bfl(bfl)
    if names is None or m.kind != LayerKind.LINEAR:
        return None
    if len(names) == 1:
        if bfl == FLUX_SWAPPED:
            if m.out_features % 2:
                return None
            return [replace(m, name=f"transformer.{names[0]}", lora_B=_swap_halves(_storage(m.lora_B)))]
        return [replace(m, name=f"transformer.{names[0]}")]
    record = record or {}
    rows = record.get("rows")
    if rows is None or len(rows) != len(names) or sum(rows) != m.out_features:
        rows = flux_part_rows(bfl, [], m.in_features, m.out_features)
    if rows is None:
        return None
    a, b = _storage(m.lora_A), _storage(m.lora_B)
    edges = np.cumsum([0, *rows])
    if len(record.get("ranks", ())) == len(names) and sum(record["ranks"]) == m.rank:
        ranks, alphas = record["ranks"], record["alphas"]
        cols = np.cumsum([0, *ranks])
        mask = np.ones(b.shape, bool)
        for i in range(len(names)):
            mask[edges[i]:edges[i + 1], cols[i]:cols[i + 1]] = False
        if not float_values(b)[mask].any():
            out, s_f = [], m.alpha / m.rank
            for i, (n, r, al) in enumerate(zip(names, ranks, alphas)):
                if r == 0:
                    continue  # a part that the fused module held as zero rows only
                bi = HostTensor(b.dtype, b.array[edges[i]:edges[i + 1], cols[i]:cols[i + 1]])
                ratio = al / r / s_f
                if ratio != 1.0:
                    bi = host_tensor(float_values(bi).astype("f8") / ratio, b.dtype)
                out.append(replace(m, name=f"transformer.{n}", lora_A=HostTensor(a.dtype, a.array[cols[i]:cols[i + 1]]),
                                   lora_B=bi, alpha=float(al)))
            return out
    return [replace(m, name=f"transformer.{n}", lora_B=HostTensor(b.dtype, b.array[edges[i]:edges[i + 1]]))
            for i, n in enumerate(names)]
