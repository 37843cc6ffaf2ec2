"""Canonical module keys: one spelling for a layer, whatever convention named it.

The sketch layer stores one sketch per weight matrix, keyed by the module that owns
it, so that the same layer lines up across conventions: a checkpoint tensor
``unet/down_blocks.0.attentions.0.proj_in.weight`` (diffusers), the ldm spelling
``model.diffusion_model.input_blocks.1.1.proj_in.weight``, a kohya LoRA's
``lora_unet_down_blocks_0_attentions_0_proj_in`` and a PEFT LoRA's
``base_model.model.down_blocks.0.attentions.0.proj_in`` all become
``unet:down_blocks_0_attentions_0_proj_in``.

A key is ``component:path``: the component (``unet`` for any denoiser, ``te1``/``te2``/
``te3`` for text encoders, ``vae``) comes from a table of prefixes, else from the path's
first word, else is empty; the path is lower-case with every separator turned into
``_``. Conventions (the ldm UNet layout of single-file SD 1.x/2.x/XL checkpoints and
SDXL kohya LoRAs among them) are rows of :data:`modelhash.fingerprint._layouts.RENAMES`.
A bare name (no component prefix) gets its component from its first words, so a
LoRA or checkpoint saved without ``transformer.`` or ``unet.`` still lines up, and an
autoencoder saved alone (``encoder.down.0.block.0.conv1``, ``decoder.up_blocks.0...``,
``quant_conv``) lines up with the ``vae`` of a full checkpoint. The words are the
autoencoder's own block names, never a bare ``encoder.``/``decoder.``, which text
encoders (``encoder.layers``), T5 (``encoder.block``) and speech models also use.
"""

from __future__ import annotations

import re

from modelhash.fingerprint._layouts import rename

__all__ = ["COMPONENT_PREFIXES", "PREFIX_CONVENTIONS", "module_key", "tensor_module"]

COMPONENT_PREFIXES: list[tuple[str, str]] = [
    ("model.diffusion_model.", "unet"),
    ("diffusion_model.", "unet"),
    ("lora_unet_", "unet"),
    ("lora_transformer_", "unet"),
    # SimpleTuner's LyCORIS wrapper names the denoiser's modules ``lycoris_`` +
    # diffusers path (ComfyUI comfy/lora.py model_lora_keys_unet).
    ("lycoris_", "unet"),
    ("transformer/", "unet"),
    ("transformer.", "unet"),
    ("unet/", "unet"),
    ("unet.", "unet"),
    ("cond_stage_model.transformer.", "te1"),
    ("cond_stage_model.model.", "te1"),
    ("conditioner.embedders.0.transformer.", "te1"),
    ("conditioner.embedders.1.model.", "te2"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
    ("text_encoders.clip_l.transformer.", "te1"),
    ("text_encoders.clip_g.transformer.", "te2"),
    # SD3's T5: Stability / ComfyUI single files, diffusers' third text encoder
    # (diffusers loaders/single_file_utils.py convert_sd3_t5_checkpoint_to_diffusers
    # strips the prefix), kohya sd-scripts' lora_sd3 LoRAs.
    ("text_encoders.t5xxl.transformer.", "te3"),
    ("text_encoder_3/", "te3"),
    ("text_encoder_3.", "te3"),
    ("text_encoder_2/", "te2"),
    ("text_encoder_2.", "te2"),
    ("text_encoder/", "te1"),
    ("text_encoder.", "te1"),
    ("first_stage_model.", "vae"),
    ("vae/", "vae"),
    ("vae.", "vae"),
]
"""Name prefixes that say which component of a pipeline a tensor belongs to."""

PREFIX_CONVENTIONS: dict[str, str] = {
    "cond_stage_model.model.": "open_clip",
    "conditioner.embedders.1.model.": "open_clip",
}
"""Prefixes that also say which naming convention follows: the path is then tagged
with it (``open_clip_...``), so that a convention's rows in
:data:`modelhash.fingerprint._layouts.RENAMES` apply to it alone (OpenCLIP's
``text_projection`` is the transpose of transformers' module of the same name)."""

_STRIP = ("module.", "_orig_mod.", "base_model.model.")
_UNET_WORDS = re.compile(
    r"^(down_blocks|up_blocks|mid_block|conv_in|conv_out|conv_norm_out|time_embedding|"
    r"add_embedding|input_blocks|middle_block|output_blocks|time_embed|label_emb|"
    # diffusion transformers, diffusers (Flux, SD3, PixArt...) and original names
    r"transformer_blocks|single_transformer_blocks|time_text_embed|x_embedder|"
    r"context_embedder|pos_embed|norm_out|proj_out|"
    r"double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer(?!_norm)|"
    r"joint_blocks|t_embedder|y_embedder)(_|$)"
)
_VAE_WORDS = re.compile(
    # an autoencoder saved alone: the original (ldm) names, then diffusers' AutoencoderKL
    r"^((encoder|decoder)_(conv_in|conv_out|norm_out|conv_norm_out|"
    r"down_\d+_(block|downsample)|up_\d+_(block|upsample)|mid_(block|attn)_\d+|"
    r"down_blocks_\d+_(resnets|downsamplers)|up_blocks_\d+_(resnets|upsamplers)|"
    r"mid_block_(resnets|attentions))|"
    r"quant_conv|post_quant_conv)(_|$)"
)
_TE_WORDS = re.compile(r"^(text_model_|encoder_layers_\d+_|embeddings_|final_layer_norm)")


def module_key(module: str) -> str:
    """The canonical key of a module path (no ``.weight`` suffix) in any convention."""
    name = module
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    component = ""
    tag = ""
    for prefix, comp in COMPONENT_PREFIXES:
        if name.startswith(prefix):
            component, name = comp, name[len(prefix) :]
            tag = PREFIX_CONVENTIONS.get(prefix, "")
            break
    path = re.sub(r"[./\-]", "_", name.lower())
    if tag:
        path = f"{tag}_{path}"
    if not component:
        if _UNET_WORDS.match(path):
            component = "unet"
        elif _VAE_WORDS.match(path):
            component = "vae"
        elif _TE_WORDS.match(path):
            component = "te1"
    if component in ("te1", "te2"):
        path = path.removeprefix("text_model_")
    return f"{component}:{rename(component, path)}"


def tensor_module(name: str) -> str:
    """The module path that owns a checkpoint tensor: the name without ``.weight``."""
    return name.removesuffix(".weight")
