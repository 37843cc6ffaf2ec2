"""Layouts: every naming convention of a family, mapped to one canonical module.

The same layer is spelt differently by each tool: diffusers, the original
(ldm / Black Forest Labs / Stability) checkpoints, ComfyUI's prefixes, and the
LoRA trainers (kohya sd-scripts, ai-toolkit, XLabs, PEFT), and llama.cpp renames
every tensor when it writes GGUF. SD 1.x / 2.x / XL single files keep the original
autoencoder's names and OpenCLIP's text tower (``resblocks``, a fused
``in_proj_weight``). Some conventions also *fuse* layers that others
keep apart: BFL's ``img_attn.qkv`` is diffusers' ``to_q``/``to_k``/``to_v`` stacked
row-wise, a single block's ``linear1`` is q, k, v and the MLP input, and the final
AdaLN stores (shift, scale) where diffusers stores (scale, shift).

This module is the table. :data:`RENAMES` map a convention's module path (already
``_``-joined and lower-case, see :mod:`modelhash.fingerprint._keys`) to the canonical
one, the diffusers spelling for diffusion models and the Hugging Face spelling
(without the ``model.`` wrapper) for language models. A fused matrix is renamed to
a canonical *fused* name (diffusers' own ``to_qkv`` / ``to_added_qkv`` where it has
one), and :data:`SPLITS` then say which rows of it belong to which canonical module.
:func:`pieces` turns a tensor into those row blocks, so the sketch layer projects
every canonical module whatever spelling held it, and a LoRA's up factor is split
the same way (a fused-qkv LoRA of rank r is three deltas sharing one down factor).
:data:`ROW_ORDERS` undo row permutations inside one module: llama.cpp's converter
interleaves the rotary halves of each head of q and k, which :func:`pieces` maps
back using the head counts the GGUF metadata carries.

Every row cites the conversion it mirrors; a new family or convention is one more
row, never another branch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where used: exact-only runs never load it
    import numpy as np
    import numpy.typing as npt

    F64 = npt.NDArray[np.float64]

__all__ = [
    "EMBEDDINGS",
    "EMBEDDING_ROW",
    "RENAMES",
    "ROW_ORDERS",
    "SPLITS",
    "TRANSPOSES",
    "Piece",
    "embedding_view",
    "pieces",
    "rename",
]

_SINGLE_FILE = "diffusers loaders/single_file_utils.py "
_DIFFUSERS_FLUX = _SINGLE_FILE + "convert_flux_transformer_checkpoint_to_diffusers"
_DIFFUSERS_SD3 = _SINGLE_FILE + "convert_sd3_transformer_checkpoint_to_diffusers"
_LORA_CONVERSION = "diffusers loaders/lora_conversion_utils.py "
_DIFFUSERS_XLABS = _LORA_CONVERSION + "_convert_xlabs_flux_lora_to_diffusers"
_GGUF_PY = "gguf-py gguf/tensor_mapping.py TensorNameMap (MODEL_ARCH.LLAMA tensor names)"
_LLAMA_CPP = "llama.cpp convert_hf_to_gguf.py LlamaModel.permute"
_TRANSFORMERS = "transformers models/llama/modeling_llama.py LlamaForCausalLM.model"
_DIFFUSERS_OLD_TE = "diffusers utils/state_dict_utils.py DIFFUSERS_OLD_TO_DIFFUSERS"
_DIFFUSERS_FUSE = "diffusers models/attention_processor.py Attention.fuse_projections"
_SD_TO_ORIGINAL = "diffusers scripts/convert_diffusers_to_original_stable_diffusion.py "
_SDXL_TO_ORIGINAL = "diffusers scripts/convert_diffusers_to_original_sdxl.py "
_SD_VAE = (_SD_TO_ORIGINAL + "vae_conversion_map (inverse: " + _SINGLE_FILE
           + "convert_ldm_vae_checkpoint)")
_OPEN_CLIP = (_SDXL_TO_ORIGINAL + "convert_openclip_text_enc_state_dict (inverse: "
              + _SINGLE_FILE + "convert_open_clip_checkpoint)")
_UNET_TO_DIFFUSERS = ("diffusers utils/state_dict_utils.py KEYS_TO_ALWAYS_REPLACE "
                      "('.processor.') and UNET_TO_DIFFUSERS ('.to_out_lora' is 'to_out.0')")
_DEPRECATED_ATTENTION = ("diffusers models/modeling_utils.py "
                         "ModelMixin._convert_deprecated_attention_blocks")


@dataclass(frozen=True)
class Rename:
    """One convention's path of a module (full match) and its canonical path."""

    component: str
    pattern: re.Pattern[str]
    canonical: str
    source: str


def _family(component: str, source: str, rows: list[tuple[str, str]]) -> list[Rename]:
    """Rows of one convention; ``N`` in a pattern is a block index, kept in the canonical."""
    return [
        Rename(
            component,
            re.compile(pattern.replace("_N_", r"_(\d+)_").replace("_N", r"_(\d+)")),
            canonical.replace("_N_", r"_\1_"),
            source,
        )
        for pattern, canonical in rows
    ]


def _rows(component: str, source: str, rows: list[tuple[str, str]]) -> list[Rename]:
    """Rows given as full regular expressions (groups referred to as ``\\1``...)."""
    return [Rename(component, re.compile(p), c, source) for p, c in rows]


_VAE_UP_BLOCKS = 4
"""The VAE decoder's block count in every SD 1.x / 2.x / XL (and Flux) autoencoder:
the original numbers its up blocks from the bottom, diffusers from the top, and the
conversion scripts hard-code the four."""


def _sd_vae() -> list[Rename]:
    """The original (ldm) autoencoder's names to diffusers' AutoencoderKL."""
    rows = [
        (r"(encoder|decoder)_mid_block_1_(.+)", r"\1_mid_block_resnets_0_\2"),
        (r"(encoder|decoder)_mid_block_2_(.+)", r"\1_mid_block_resnets_1_\2"),
        (r"(encoder|decoder)_mid_attn_1_(q|k|v)", r"\1_mid_block_attentions_0_to_\2"),
        (r"(encoder|decoder)_mid_attn_1_proj_out", r"\1_mid_block_attentions_0_to_out_0"),
        (r"(encoder|decoder)_mid_attn_1_norm", r"\1_mid_block_attentions_0_group_norm"),
        (r"(encoder|decoder)_norm_out", r"\1_conv_norm_out"),
        (r"encoder_down_(\d+)_block_(\d+)_nin_shortcut",
         r"encoder_down_blocks_\1_resnets_\2_conv_shortcut"),
        (r"encoder_down_(\d+)_block_(\d+)_(.+)", r"encoder_down_blocks_\1_resnets_\2_\3"),
        (r"encoder_down_(\d+)_downsample_conv", r"encoder_down_blocks_\1_downsamplers_0_conv"),
    ]
    for i in range(_VAE_UP_BLOCKS):
        j = _VAE_UP_BLOCKS - 1 - i
        rows += [
            (rf"decoder_up_{i}_block_(\d+)_nin_shortcut",
             rf"decoder_up_blocks_{j}_resnets_\1_conv_shortcut"),
            (rf"decoder_up_{i}_block_(\d+)_(.+)", rf"decoder_up_blocks_{j}_resnets_\1_\2"),
            (rf"decoder_up_{i}_upsample_conv", rf"decoder_up_blocks_{j}_upsamplers_0_conv"),
        ]
    return _rows("vae", _SD_VAE, rows)


_LDM_UNET = (_SD_TO_ORIGINAL + "unet_conversion_map, unet_conversion_map_resnet, "
             "unet_conversion_map_layer (SDXL: " + _SDXL_TO_ORIGINAL + "the same maps; inverse: "
             + _SINGLE_FILE + "convert_ldm_unet_checkpoint)")
_UNET_BLOCKS = 4
"""Down (and up) blocks of the largest ldm UNet: SD 1.x / 2.x and the SDXL refiner
have four, the SDXL base three; the SD script hard-codes ``range(4)``."""
_LAYERS_PER_BLOCK = 2
"""Resnets per down block (up blocks have one more) in every SD 1.x / 2.x / XL UNet.
The ldm layout numbers its ``input_blocks`` through each down block's resnets and
then its downsampler, ``layers_per_block + 1`` of them, and its ``output_blocks``
through each up block's ``layers_per_block + 1`` resnets; the single-file loader
takes ``layers_per_block`` from the diffusers config, the scripts hard-code 2."""
_LDM_RESNET = [
    ("in_layers_0", "norm1"),
    ("in_layers_2", "conv1"),
    ("emb_layers_1", "time_emb_proj"),
    ("out_layers_0", "norm2"),
    ("out_layers_3", "conv2"),
    ("skip_connection", "conv_shortcut"),
]
"""unet_conversion_map_resnet: the parts of an ldm ``ResBlock`` and diffusers' names."""


def _ldm_resnet(ldm: str, diffusers: str) -> list[tuple[str, str]]:
    """One ldm resnet at ``ldm`` to diffusers' at ``diffusers``: a part anywhere after
    the block is renamed (the loader's ``update_unet_resnet_ldm_to_diffusers`` replaces
    it wherever it is), the first in table order, at its first occurrence."""
    return [
        *[(rf"{ldm}(_.*?)?_{part}(.*)", rf"{diffusers}\1_{name}\2") for part, name in _LDM_RESNET],
        (rf"{ldm}(_.*)?", rf"{diffusers}\1"),
    ]


def _ldm_unet() -> list[Rename]:
    """The ldm UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``) of SD
    1.x / 2.x / XL single files and SDXL kohya LoRAs to diffusers' UNet2DConditionModel.

    Rows are anchored on the ldm words, which no diffusers path starts with, so a
    diffusers path never meets them. ``input_blocks.0.0`` is ``conv_in``; input block
    ``n >= 1`` is down block ``(n - 1) // 3``, its layer ``(n - 1) % 3`` a resnet
    (``.0``) and attention (``.1``), or the downsampler (``.0.op``) for layer 2; output
    block ``n`` is up block ``n // 3``, layer ``n % 3``, its upsampler the ``conv`` at
    ``.1`` or ``.2`` (``.1`` where the block has no attention), any other ``.1`` or
    ``.2`` the layer's attention. (3 is ``layers_per_block + 1``.)
    """
    rows = [
        (r"time_embed_0(_.*)?", r"time_embedding_linear_1\1"),
        (r"time_embed_2(_.*)?", r"time_embedding_linear_2\1"),
        (r"label_emb_0_0(_.*)?", r"add_embedding_linear_1\1"),
        (r"label_emb_0_2(_.*)?", r"add_embedding_linear_2\1"),
        (r"out_0(_.*)?", r"conv_norm_out\1"),
        (r"out_2(_.*)?", r"conv_out\1"),
        (r"input_blocks_0_0(_.*)?", r"conv_in\1"),
    ]
    per = _LAYERS_PER_BLOCK + 1
    for i in range(_UNET_BLOCKS):
        for j in range(_LAYERS_PER_BLOCK):
            n = per * i + j + 1
            rows += _ldm_resnet(f"input_blocks_{n}_0", f"down_blocks_{i}_resnets_{j}")
            rows.append((rf"input_blocks_{n}_1(_.*)?", rf"down_blocks_{i}_attentions_{j}\1"))
        rows.append((rf"input_blocks_{per * (i + 1)}_0_op(.*)",
                     rf"down_blocks_{i}_downsamplers_0_conv\1"))
    rows += [
        *_ldm_resnet("middle_block_0", "mid_block_resnets_0"),
        (r"middle_block_1(_.*)?", r"mid_block_attentions_0\1"),
        *_ldm_resnet("middle_block_2", "mid_block_resnets_1"),
    ]
    for i in range(_UNET_BLOCKS):
        for j in range(per):
            n = per * i + j
            rows += _ldm_resnet(f"output_blocks_{n}_0", f"up_blocks_{i}_resnets_{j}")
            rows += [
                (rf"output_blocks_{n}_[12]_(conv.*)", rf"up_blocks_{i}_upsamplers_0_\1"),
                (rf"output_blocks_{n}_[12](_.*)?", rf"up_blocks_{i}_attentions_{j}\1"),
            ]
    return _rows("unet", _LDM_UNET, rows)


_RES = "open_clip_transformer_resblocks_N"


def _open_clip(component: str) -> list[Rename]:
    """OpenCLIP's text tower (SD 2.x's only text encoder, SDXL's second) to
    transformers' CLIPTextModel(WithProjection). Its paths arrive tagged
    ``open_clip_`` (see :data:`modelhash.fingerprint._keys.PREFIX_CONVENTIONS`);
    ``in_proj_weight`` is q, k and v stacked, split by :data:`SPLITS`.
    ``text_projection`` is stored transposed (x @ P against a Linear's P^T): it is
    renamed to a transposed name that :data:`TRANSPOSES` turns into the Linear's."""
    return [
        *_family(component, _OPEN_CLIP, [
            (f"{_RES}_attn_in_proj_weight", r"encoder_layers_N_self_attn_qkv"),
            (f"{_RES}_attn_out_proj", r"encoder_layers_N_self_attn_out_proj"),
            (f"{_RES}_mlp_c_fc", r"encoder_layers_N_mlp_fc1"),
            (f"{_RES}_mlp_c_proj", r"encoder_layers_N_mlp_fc2"),
            (f"{_RES}_ln_1", r"encoder_layers_N_layer_norm1"),
            (f"{_RES}_ln_2", r"encoder_layers_N_layer_norm2"),
        ]),
        *_rows(component, _OPEN_CLIP, [
            (r"open_clip_token_embedding", r"embeddings_token_embedding"),
            (r"open_clip_positional_embedding", r"embeddings_position_embedding"),
            (r"open_clip_ln_final", r"final_layer_norm"),
            (r"open_clip_text_projection", r"text_projection_transposed"),
        ]),
    ]


RENAMES: list[Rename] = [
    # Flux: Black Forest Labs' original names (also ComfyUI's, and kohya's and
    # ai-toolkit's when they save in BFL form) to diffusers' FluxTransformer2DModel;
    # the final layer is shared with SD3, whose AdaLN also stores (shift, scale).
    *_family("unet", _DIFFUSERS_FLUX, [
        (r"img_in", r"x_embedder"),
        (r"txt_in", r"context_embedder"),
        (r"time_in_in_layer", r"time_text_embed_timestep_embedder_linear_1"),
        (r"time_in_out_layer", r"time_text_embed_timestep_embedder_linear_2"),
        (r"vector_in_in_layer", r"time_text_embed_text_embedder_linear_1"),
        (r"vector_in_out_layer", r"time_text_embed_text_embedder_linear_2"),
        (r"guidance_in_in_layer", r"time_text_embed_guidance_embedder_linear_1"),
        (r"guidance_in_out_layer", r"time_text_embed_guidance_embedder_linear_2"),
        (r"double_blocks_N_img_mod_lin", r"transformer_blocks_N_norm1_linear"),
        (r"double_blocks_N_txt_mod_lin", r"transformer_blocks_N_norm1_context_linear"),
        (r"double_blocks_N_img_attn_qkv", r"transformer_blocks_N_attn_to_qkv"),
        (r"double_blocks_N_txt_attn_qkv", r"transformer_blocks_N_attn_to_added_qkv"),
        (r"double_blocks_N_img_attn_proj", r"transformer_blocks_N_attn_to_out_0"),
        (r"double_blocks_N_txt_attn_proj", r"transformer_blocks_N_attn_to_add_out"),
        (r"double_blocks_N_img_mlp_0", r"transformer_blocks_N_ff_net_0_proj"),
        (r"double_blocks_N_img_mlp_2", r"transformer_blocks_N_ff_net_2"),
        (r"double_blocks_N_txt_mlp_0", r"transformer_blocks_N_ff_context_net_0_proj"),
        (r"double_blocks_N_txt_mlp_2", r"transformer_blocks_N_ff_context_net_2"),
        (r"single_blocks_N_linear1", r"single_transformer_blocks_N_attn_to_qkv_mlp"),
        (r"single_blocks_N_linear2", r"single_transformer_blocks_N_proj_out"),
        (r"single_blocks_N_modulation_lin", r"single_transformer_blocks_N_norm_linear"),
        (r"final_layer_linear", r"proj_out"),
        (r"final_layer_adaln_modulation_1", r"norm_out_linear_shift_scale"),
    ]),
    # Flux LoRAs in XLabs' trainer names (attention processors only).
    *_family("unet", _DIFFUSERS_XLABS, [
        (r"double_blocks_N_processor_qkv_lora1", r"transformer_blocks_N_attn_to_qkv"),
        (r"double_blocks_N_processor_qkv_lora2", r"transformer_blocks_N_attn_to_added_qkv"),
        (r"double_blocks_N_processor_proj_lora1", r"transformer_blocks_N_attn_to_out_0"),
        (r"double_blocks_N_processor_proj_lora2", r"transformer_blocks_N_attn_to_add_out"),
        (r"single_blocks_N_processor_qkv_lora", r"single_transformer_blocks_N_attn_to_qkv"),
        (r"single_blocks_N_processor_proj_lora", r"single_transformer_blocks_N_proj_out"),
    ]),
    # SD3 / SD3.5: Stability's MMDiT names to diffusers' SD3Transformer2DModel.
    *_family("unet", _DIFFUSERS_SD3, [
        (r"joint_blocks_N_x_block_attn_qkv", r"transformer_blocks_N_attn_to_qkv"),
        (r"joint_blocks_N_context_block_attn_qkv", r"transformer_blocks_N_attn_to_added_qkv"),
        (r"joint_blocks_N_x_block_attn2_qkv", r"transformer_blocks_N_attn2_to_qkv"),
        (r"joint_blocks_N_x_block_attn_proj", r"transformer_blocks_N_attn_to_out_0"),
        (r"joint_blocks_N_x_block_attn2_proj", r"transformer_blocks_N_attn2_to_out_0"),
        (r"joint_blocks_N_context_block_attn_proj", r"transformer_blocks_N_attn_to_add_out"),
        (r"joint_blocks_N_x_block_mlp_fc1", r"transformer_blocks_N_ff_net_0_proj"),
        (r"joint_blocks_N_x_block_mlp_fc2", r"transformer_blocks_N_ff_net_2"),
        (r"joint_blocks_N_context_block_mlp_fc1", r"transformer_blocks_N_ff_context_net_0_proj"),
        (r"joint_blocks_N_context_block_mlp_fc2", r"transformer_blocks_N_ff_context_net_2"),
        (r"joint_blocks_N_x_block_adaln_modulation_1", r"transformer_blocks_N_norm1_linear"),
        (r"joint_blocks_N_context_block_adaln_modulation_1",
         r"transformer_blocks_N_norm1_context_linear_maybe_shift_scale"),
        (r"x_embedder_proj", r"pos_embed_proj"),
        (r"t_embedder_mlp_0", r"time_text_embed_timestep_embedder_linear_1"),
        (r"t_embedder_mlp_2", r"time_text_embed_timestep_embedder_linear_2"),
        (r"y_embedder_mlp_0", r"time_text_embed_text_embedder_linear_1"),
        (r"y_embedder_mlp_2", r"time_text_embed_text_embedder_linear_2"),
    ]),
    # SD 1.x / 2.x / XL single-file checkpoints: the ldm UNet, the autoencoder, and
    # OpenCLIP text encoders. A1111 / ComfyUI write these names, and kohya's SDXL LoRAs
    # the UNet's.
    *_ldm_unet(),
    # diffusers' older LoRAs on attention processors (``attn1.processor.to_q_lora``,
    # ``to_out_lora``): the processor's module is the attention's own.
    *_rows("unet", _UNET_TO_DIFFUSERS, [
        (r"(.*)_processor_(to_[qkv])", r"\1_\2"),
        (r"(.*)_processor_to_out", r"\1_to_out_0"),
        (r"(.*)_to_out", r"\1_to_out_0"),
    ]),
    *_sd_vae(),
    *_open_clip("te1"),
    *_open_clip("te2"),
    # diffusers' older text-encoder LoRAs name CLIP's projections as its attention
    # processors do (``self_attn.to_q_lora``, ``to_out_lora``).
    *(row for te in ("te1", "te2") for row in _rows(te, _DIFFUSERS_OLD_TE, [
        (r"(.*)_self_attn_to_([qkv])", r"\1_self_attn_\2_proj"),
        (r"(.*)_self_attn_to_out(_0)?", r"\1_self_attn_out_proj"),
    ])),
    # Autoencoders saved by diffusers before its attention rename.
    *_rows("vae", _DEPRECATED_ATTENTION, [
        (r"(.+)_attentions_(\d+)_query", r"\1_attentions_\2_to_q"),
        (r"(.+)_attentions_(\d+)_key", r"\1_attentions_\2_to_k"),
        (r"(.+)_attentions_(\d+)_value", r"\1_attentions_\2_to_v"),
        (r"(.+)_attentions_(\d+)_proj_attn", r"\1_attentions_\2_to_out_0"),
    ]),
    # Language models: the Hugging Face wrapper word, then llama.cpp's GGUF names.
    Rename("", re.compile(r"model_(layers_\d+_.+|embed_tokens|norm)"), r"\1", _TRANSFORMERS),
    *_family("", _GGUF_PY, [
        (r"token_embd", r"embed_tokens"),
        (r"output_norm", r"norm"),
        (r"output", r"lm_head"),
        (r"blk_N_attn_norm", r"layers_N_input_layernorm"),
        (r"blk_N_attn_q", r"layers_N_self_attn_q_proj_rotary"),
        (r"blk_N_attn_k", r"layers_N_self_attn_k_proj_rotary"),
        (r"blk_N_attn_v", r"layers_N_self_attn_v_proj"),
        (r"blk_N_attn_output", r"layers_N_self_attn_o_proj"),
        (r"blk_N_attn_q_norm", r"layers_N_self_attn_q_norm"),
        (r"blk_N_attn_k_norm", r"layers_N_self_attn_k_norm"),
        (r"blk_N_ffn_norm", r"layers_N_post_attention_layernorm"),
        (r"blk_N_ffn_gate", r"layers_N_mlp_gate_proj"),
        (r"blk_N_ffn_up", r"layers_N_mlp_up_proj"),
        (r"blk_N_ffn_down", r"layers_N_mlp_down_proj"),
    ]),
]
"""Module paths per component: (convention's path, canonical path); first match wins."""


@dataclass(frozen=True)
class Part:
    """One canonical module inside a fused matrix.

    ``rows`` is how many of the fused rows it takes: ``"n"`` (the input width, as
    for a single block's q, k and v), ``"1/k"`` (an equal share), or ``"rest"``.
    ``at`` is where those rows start in the canonical module (0 unless the
    convention stores the module's own rows in another order).
    """

    target: str
    rows: str
    at: str = "0"


@dataclass(frozen=True)
class Split:
    """A fused canonical path, the modules its rows hold in order, and when it applies.

    ``ratio`` (rows / input width), if set, must hold for the split to apply.
    """

    pattern: re.Pattern[str]
    parts: tuple[Part, ...]
    source: str
    ratio: int | None = None


def _s(pattern: str, parts: list[tuple[str, str] | tuple[str, str, str]], source: str,
       ratio: int | None = None) -> Split:
    return Split(re.compile(pattern), tuple(Part(*p) for p in parts), source, ratio)


_THIRD = "1/3"
SPLITS: list[Split] = [
    _s(r"(.*)_attn(2?)_to_qkv", [(r"\1_attn\2_to_q", _THIRD), (r"\1_attn\2_to_k", _THIRD),
                                 (r"\1_attn\2_to_v", _THIRD)], _DIFFUSERS_FUSE),
    _s(r"(.*)_self_attn_qkv", [(r"\1_self_attn_q_proj", _THIRD), (r"\1_self_attn_k_proj", _THIRD),
                                (r"\1_self_attn_v_proj", _THIRD)], _OPEN_CLIP),
    _s(r"(.*)_attn_to_added_qkv", [(r"\1_attn_add_q_proj", _THIRD), (r"\1_attn_add_k_proj", _THIRD),
                                   (r"\1_attn_add_v_proj", _THIRD)], _DIFFUSERS_FUSE),
    _s(r"(.*)_attn_to_qkv_mlp", [(r"\1_attn_to_q", "n"), (r"\1_attn_to_k", "n"),
                                 (r"\1_attn_to_v", "n"), (r"\1_proj_mlp", "rest")],
       _DIFFUSERS_FLUX),
    # SD3's last context block has only (shift, scale); the others keep their order.
    _s(r"(.*)_maybe_shift_scale", [(r"\1", "1/2", "1/2"), (r"\1", "1/2", "0")], _DIFFUSERS_SD3,
       ratio=2),
    _s(r"(.*)_maybe_shift_scale", [(r"\1", "rest")], _DIFFUSERS_SD3),
    _s(r"(.*)_shift_scale", [(r"\1", "1/2", "1/2"), (r"\1", "1/2", "0")], _DIFFUSERS_FLUX),
]
"""Fused canonical paths and the row blocks they hold; first match wins."""


RowOrder = Callable[[int, Mapping[str, str]], "npt.NDArray[np.intp] | None"]
"""Given a matrix's row count and the file's hints, the inverse of its row order."""


def _rotary(count_key: str) -> RowOrder:
    """The inverse of llama.cpp's q/k row permutation, given the GGUF head count key.

    ``permute`` reshapes rows as (heads, 2, head_dim / 2) and swaps the last two
    axes, so stored row p holds original row ``order[p]`` below.
    """

    def order(rows: int, hints: Mapping[str, str]) -> npt.NDArray[np.intp] | None:
        import numpy as np

        arch = hints.get("general.architecture", "")
        heads = _count(hints.get(f"{arch}.attention.{count_key}"))
        if count_key == "head_count_kv" and heads is None:
            heads = _count(hints.get(f"{arch}.attention.head_count"))
        if heads is None or rows % (2 * heads):
            return None
        idx = np.arange(rows, dtype=np.intp).reshape(heads, 2, rows // heads // 2)
        out: npt.NDArray[np.intp] = idx.swapaxes(1, 2).reshape(-1)
        return out

    return order


def _count(value: str | None) -> int | None:
    if value is None or not value.isdigit() or not 0 < int(value) <= 1 << 16:
        return None
    return int(value)


@dataclass(frozen=True)
class RowOrderRule:
    """A canonical path whose stored rows are permuted, the inverse, and where it applies."""

    pattern: re.Pattern[str]
    canonical: str
    order: RowOrder
    architectures: frozenset[str]
    source: str


ROTARY_ARCHITECTURES = frozenset({
    "llama", "deci", "granite", "granitemoe", "arcee", "afmoe", "smollm3", "cogvlm",
    "llama-embed", "nanbeige",
})
"""GGUF architectures whose converter permutes q and k: ``LlamaModel`` and the
subclasses that keep its ``undo_permute = True`` (not llama4, apertus, mistral3),
and DeciLM's own copy of ``permute`` (llama.cpp conversion/llama.py, granite.py...)."""

ROW_ORDERS: list[RowOrderRule] = [
    RowOrderRule(re.compile(r"(.*)_q_proj_rotary"), r"\1_q_proj", _rotary("head_count"),
                 ROTARY_ARCHITECTURES, _LLAMA_CPP),
    RowOrderRule(re.compile(r"(.*)_k_proj_rotary"), r"\1_k_proj", _rotary("head_count_kv"),
                 ROTARY_ARCHITECTURES, _LLAMA_CPP),
]
"""Canonical paths stored with permuted rows, and how to put the rows back."""


@dataclass(frozen=True)
class Transpose:
    """A canonical path stored as the transpose of its canonical module."""

    pattern: re.Pattern[str]
    canonical: str
    source: str


TRANSPOSES: list[Transpose] = [
    # OpenCLIP keeps the text projection as a parameter P used as x @ P; transformers'
    # CLIPTextModelWithProjection has a Linear whose weight is P^T.
    Transpose(re.compile(r"(.*)text_projection_transposed"), r"\1text_projection", _OPEN_CLIP),
]
"""Stored matrices that are the transpose of their canonical module: the sketch
projects them with the two sides' signs swapped (see
:class:`modelhash.fingerprint._project.SketchJob`), so they sketch as the module."""


def _first_word(pattern: str) -> str | None:
    """The first ``_``-separated word of every path ``pattern`` can match, if its
    literal start fixes one (it runs up to a ``_`` or is the whole pattern), else None."""
    depth = 0
    escaped = in_class = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "|" and depth == 0:
            return None  # a top-level alternative may start anyhow
    literal = re.match(r"[^\\.^$*+?{}\[\]|()]*", pattern)
    text = literal[0] if literal else ""
    if text != pattern and pattern[len(text)] in "*+?{":
        text = text[:-1]  # a quantifier makes its character optional
    if "_" in text:
        return text.split("_", 1)[0]
    return text if text == pattern else None


@cache
def _row_words() -> tuple[tuple[Rename, str | None], ...]:
    return tuple((r, _first_word(r.pattern.pattern)) for r in RENAMES)


_CANDIDATES: dict[tuple[str, str], list[Rename]] = {}


def _candidates(component: str, word: str) -> list[Rename]:
    """The rows of ``component`` that a path whose first word is ``word`` may match, in
    table order: those fixing that word and those fixing none."""
    found = _CANDIDATES.get((component, word))
    if found is None:
        found = [r for r, w in _row_words() if r.component == component and w in (word, None)]
        if len(_CANDIDATES) < 4096:  # words come from files: keep the memo bounded
            _CANDIDATES[(component, word)] = found
    return found


def rename(component: str, path: str) -> str:
    """The canonical path of ``path`` in ``component`` (unchanged if no row matches)."""
    for r in _candidates(component, path.split("_", 1)[0]):
        if m := r.pattern.fullmatch(path):
            return m.expand(r.canonical)
    return path


@dataclass(frozen=True)
class Piece:
    """Rows ``start:start+count`` of a stored matrix, as rows of canonical ``key``.

    The canonical module has ``rows`` rows; stored row ``start + i`` is its row
    ``order[i]`` (or ``at + i`` when ``order`` is None).
    """

    key: str
    rows: int
    start: int
    count: int
    at: int = 0
    order: npt.NDArray[np.intp] | None = None
    transposed: bool = False
    """The stored matrix is the canonical module's transpose (``rows`` is then the
    canonical row count, the stored matrix's column count); always a whole matrix."""

    def targets(self) -> npt.NDArray[np.intp]:
        """Canonical row of each stored row of this piece."""
        import numpy as np

        if self.order is not None:
            return self.order
        return np.arange(self.at, self.at + self.count, dtype=np.intp)


def _size(spec: str, m: int, n: int, left: int) -> int | None:
    if spec == "n":
        return n
    if spec == "rest":
        return left
    if spec.startswith("1/"):
        k = int(spec[2:])
        return m // k if m % k == 0 else None
    return int(spec)


def pieces(key: str, m: int, n: int, hints: Mapping[str, str] | None = None) -> list[Piece]:
    """The canonical modules a stored ``m x n`` matrix under ``key`` holds, as row pieces.

    A key that no split or row-order rule names is one piece, itself. A fused key
    whose shape does not fit its split (a convention we do not know, a hostile file)
    is also kept whole under its fused name, never mis-split.
    """
    component, _, path = key.partition(":")
    for tr in TRANSPOSES:
        if mt := tr.pattern.fullmatch(path):
            return [Piece(f"{component}:{mt.expand(tr.canonical)}", n, 0, m, transposed=True)]
    for rule in ROW_ORDERS:
        if mr := rule.pattern.fullmatch(path):
            canonical = f"{component}:{mr.expand(rule.canonical)}"
            arch = (hints or {}).get("general.architecture", "")
            order = rule.order(m, hints or {}) if arch in rule.architectures else None
            return [Piece(canonical, m, 0, m, order=order)]
    for split in SPLITS:
        if not (ms := split.pattern.fullmatch(path)):
            continue
        if split.ratio is not None and m != split.ratio * n:
            continue
        out = _split(component, ms, split, m, n)
        if out is not None:
            return out
    return [Piece(key, m, 0, m)]


def _split(component: str, ms: re.Match[str], split: Split, m: int, n: int) -> list[Piece] | None:
    sizes: list[int] = []
    left = m
    for part in split.parts:
        size = _size(part.rows, m, n, left)
        if size is None or size <= 0 or size > left:
            return None
        sizes.append(size)
        left -= size
    if left:
        return None
    totals: dict[str, int] = {}
    for part, size in zip(split.parts, sizes, strict=True):
        target = ms.expand(part.target)
        totals[target] = totals.get(target, 0) + size
    out: list[Piece] = []
    start = 0
    for part, size in zip(split.parts, sizes, strict=True):
        target = ms.expand(part.target)
        at = _size(part.at, totals[target], n, 0) if part.at != "0" else 0
        if at is None:
            return None
        out.append(Piece(f"{component}:{target}", totals[target], start, size, at=at))
        start += size
    return out



def split_adapter(
    key: str, arrays: Mapping[str, F64], hints: Mapping[str, str] | None = None
) -> list[tuple[str, dict[str, F64]]]:
    """An adapter module's factors per canonical module: a fused up factor split by rows.

    A LoRA on a fused matrix has ΔW = up · down; the rows of ΔW that belong to one
    canonical module are those rows of ``up`` times the same ``down``, exactly what
    diffusers' converters write when they split such a LoRA. Any other adapter
    (LoHa, LoKr, or a shape the split does not fit) stays whole under ``key``.
    """
    import numpy as np

    up, down = arrays.get("up"), arrays.get("down")
    if up is None or down is None or up.ndim < 2 or down.ndim < 2:
        return [(key, dict(arrays))]
    m = up.shape[0]
    n = int(np.prod(down.shape[1:]))
    found = pieces(key, m, n, hints)
    if len(found) == 1 and found[0].transposed:
        # (up · down)ᵀ = downᵀ · upᵀ: the same rank, its factors swapped.
        if down.ndim != 2:
            return [(key, dict(arrays))]
        return [(found[0].key, {**arrays, "up": np.ascontiguousarray(down.T),
                                "down": np.ascontiguousarray(up.reshape(m, -1).T)})]
    if len(found) == 1 and found[0].key == key and found[0].order is None:
        return [(key, dict(arrays))]
    up2 = up.reshape(m, -1)
    out: dict[str, dict[str, F64]] = {}
    for p in found:
        part = out.setdefault(p.key, {**arrays, "up": np.zeros((p.rows, up2.shape[1]))})
        part["up"][p.targets()] = up2[p.start : p.start + p.count]
    return [(k, v) for k, v in out.items()]


EMBEDDINGS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"emb_params|string_to_param\.[^.]+"), "te1:embedding"),
    (re.compile(r"clip_l"), "te1:embedding"),
    (re.compile(r"clip_g"), "te2:embedding"),
]
"""Textual-inversion tensors (A1111 ``.pt``, safetensors ``emb_params``, SDXL
``clip_l``/``clip_g``) and the canonical key of the vectors each holds."""

EMBEDDING_ROW = 32
"""Elements per sketched row of an embedding: its vectors, read in order, are viewed
as rows of this width, so even a single 768-wide vector is a 24 x 32 matrix."""


def embedding_view(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, int]] | None:
    """The canonical key and matrix shape of a textual-inversion tensor, or None."""
    total = 1
    for d in shape:
        total *= d
    if total % EMBEDDING_ROW or total < 2 * EMBEDDING_ROW:
        return None
    for pattern, key in EMBEDDINGS:
        if pattern.fullmatch(name):
            return key, (total // EMBEDDING_ROW, EMBEDDING_ROW)
    return None
