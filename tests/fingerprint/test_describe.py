"""describe(): kind, LoRA flavour and architecture from realistic key lists.

Each case lists a handful of the real keys of a layout, with real shapes where a
rule reads them (cross-attention and text widths); other shapes are placeholders.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelhash.fingerprint._describe import ARCHITECTURES, describe

Tensor = tuple[str, str, tuple[int, ...]]
SQ = (4, 4)


def keys(*items: str | tuple[str, tuple[int, ...]], dtype: str = "F16") -> list[Tensor]:
    """Tensors from bare names (placeholder shape) or (name, shape) pairs."""
    out: list[Tensor] = []
    for item in items:
        name, shape = (item, SQ) if isinstance(item, str) else item
        out.append((name, dtype, shape))
    return out


def lora(modules: Iterable[tuple[str, int, int]], style: str, rank: int = 8) -> list[Tensor]:
    """LoRA tensors for ``(module, out_features, in_features)`` in a naming style."""
    out: list[Tensor] = []
    for module, n_out, n_in in modules:
        if style == "kohya":
            out += [
                (f"{module}.lora_down.weight", "F16", (rank, n_in)),
                (f"{module}.lora_up.weight", "F16", (n_out, rank)),
                (f"{module}.alpha", "F16", ()),
            ]
        elif style == "peft":
            out += [
                (f"{module}.lora_A.weight", "F32", (rank, n_in)),
                (f"{module}.lora_B.weight", "F32", (n_out, rank)),
            ]
        elif style == "attn-procs":
            out += [
                (f"{module}_lora.down.weight", "F32", (rank, n_in)),
                (f"{module}_lora.up.weight", "F32", (n_out, rank)),
            ]
        elif style == "loha":
            out += [
                (f"{module}.hada_w1_a", "F16", (n_out, rank)),
                (f"{module}.hada_w1_b", "F16", (rank, n_in)),
                (f"{module}.hada_w2_a", "F16", (n_out, rank)),
                (f"{module}.hada_w2_b", "F16", (rank, n_in)),
                (f"{module}.alpha", "F16", ()),
            ]
        elif style == "lokr":
            out += [
                (f"{module}.lokr_w1", "F16", (8, 8)),
                (f"{module}.lokr_w2_a", "F16", (n_out // 8, rank)),
                (f"{module}.lokr_w2_b", "F16", (rank, n_in // 8)),
                (f"{module}.alpha", "F16", ()),
            ]
        elif style == "gguf":
            out += [
                (f"{module}.weight.lora_a", "F32", (rank, n_in)),
                (f"{module}.weight.lora_b", "F32", (n_out, rank)),
            ]
        else:
            raise ValueError(style)
    return out


UNET = "model.diffusion_model."
SD1_UNET = keys(
    (f"{UNET}input_blocks.0.0.weight", (320, 4, 3, 3)),
    f"{UNET}input_blocks.1.0.in_layers.2.weight",
    f"{UNET}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    (f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
    (f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight", (320, 768)),
    f"{UNET}middle_block.1.proj_in.weight",
    f"{UNET}out.2.weight",
)
LDM_VAE = keys(
    "first_stage_model.encoder.down.0.block.0.conv1.weight",
    "first_stage_model.decoder.up.0.block.0.conv1.weight",
    "first_stage_model.quant_conv.weight",
)

CHECKPOINTS: dict[str, tuple[list[Tensor], str]] = {
    "sd1 ldm": (
        SD1_UNET
        + LDM_VAE
        + keys(
            (
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                (49408, 768),
            ),
            (
                "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                (768, 768),
            ),
        ),
        "sd1",
    ),
    "sd1 unet only": (SD1_UNET, "sd1"),
    "sd2 ldm": (
        keys(
            (f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 1024)),
            f"{UNET}input_blocks.1.1.proj_in.weight",
            ("cond_stage_model.model.token_embedding.weight", (49408, 1024)),
            ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", (3072, 1024)),
            "cond_stage_model.model.ln_final.weight",
        )
        + LDM_VAE,
        "sd2",
    ),
    "sd2 unet only": (
        keys((f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 1024))),
        "sd2",
    ),
    "sdxl ldm": (
        keys(
            (f"{UNET}label_emb.0.0.weight", (1280, 2816)),
            (f"{UNET}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (640, 2048)),
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection",
        )
        + LDM_VAE,
        "sdxl",
    ),
    "sdxl unet by width": (
        keys((f"{UNET}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (640, 2048))),
        "sdxl",
    ),
    "sdxl refiner": (
        keys(
            (f"{UNET}label_emb.0.0.weight", (1536, 2560)),
            (f"{UNET}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (768, 1280)),
            "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
        ),
        "sdxl",
    ),
    "sd3 ldm": (
        keys(
            (f"{UNET}joint_blocks.0.x_block.attn.qkv.weight", (4608, 1536)),
            f"{UNET}joint_blocks.0.context_block.attn.qkv.weight",
            (f"{UNET}context_embedder.weight", (1536, 4096)),
            (f"{UNET}x_embedder.proj.weight", (1536, 16, 2, 2)),
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
        ),
        "sd3",
    ),
    "sd3 diffusers transformer": (
        keys(
            ("transformer_blocks.0.attn.to_k.weight", (1536, 1536)),
            "transformer_blocks.0.attn.add_k_proj.weight",
            ("context_embedder.weight", (1536, 4096)),
            "pos_embed.proj.weight",
            "time_text_embed.timestep_embedder.linear_1.weight",
        ),
        "sd3",
    ),
    "flux ldm": (
        keys(
            ("double_blocks.0.img_attn.qkv.weight", (9216, 3072)),
            "double_blocks.0.img_mod.lin.weight",
            "double_blocks.0.txt_mlp.0.weight",
            ("single_blocks.0.linear1.weight", (21504, 3072)),
            ("img_in.weight", (3072, 64)),
            ("txt_in.weight", (3072, 4096)),
            "time_in.in_layer.weight",
            "vector_in.in_layer.weight",
            "final_layer.linear.weight",
        ),
        "flux",
    ),
    "flux comfy checkpoint": (
        keys(
            f"{UNET}double_blocks.0.img_attn.qkv.weight",
            f"{UNET}single_blocks.37.linear2.weight",
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
            "vae.decoder.up.0.block.0.conv1.weight",
        ),
        "flux",
    ),
    "flux diffusers transformer": (
        keys(
            ("transformer_blocks.0.attn.to_k.weight", (3072, 3072)),
            "transformer_blocks.0.attn.add_k_proj.weight",
            ("single_transformer_blocks.0.attn.to_k.weight", (3072, 3072)),
            ("x_embedder.weight", (3072, 64)),
            ("context_embedder.weight", (3072, 4096)),
            "time_text_embed.timestep_embedder.linear_1.weight",
        ),
        "flux",
    ),
    "qwen-image diffusers transformer": (
        keys(
            ("transformer_blocks.0.attn.to_k.weight", (3072, 3072)),
            "transformer_blocks.0.img_mlp.net.0.proj.weight",
            "transformer_blocks.0.txt_mod.1.weight",
            "img_in.weight",
            "txt_in.weight",
        ),
        "qwen-image",
    ),
    "hunyuan video": (
        keys(
            "double_blocks.0.img_attn_qkv.weight",
            "single_blocks.0.linear1.weight",
            "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight",
        ),
        "hunyuan-video",
    ),
    "sd1 diffusers unet": (
        keys(
            ("conv_in.weight", (320, 4, 3, 3)),
            "down_blocks.0.resnets.0.conv1.weight",
            ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
            "mid_block.attentions.0.proj_in.weight",
            "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q.weight",
            "conv_out.weight",
        ),
        "sd1",
    ),
    "sdxl diffusers unet": (
        keys(
            ("add_embedding.linear_1.weight", (1280, 2816)),
            "down_blocks.0.resnets.0.conv1.weight",
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", (640, 2048)),
        ),
        "sdxl",
    ),
    "sd2 diffusers pipeline folder": (
        keys(
            ("unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", (320, 1024)),
            "unet/conv_in.weight",
            ("text_encoder/text_model.encoder.layers.0.self_attn.q_proj.weight", (1024, 1024)),
            "vae/decoder.up_blocks.0.resnets.0.conv1.weight",
            "vae/encoder.down_blocks.0.resnets.0.conv1.weight",
        ),
        "sd2",
    ),
    "sdxl diffusers pipeline folder": (
        keys(
            "unet/down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "text_encoder/text_model.encoder.layers.0.self_attn.q_proj.weight",
            "text_encoder_2/text_model.encoder.layers.0.self_attn.q_proj.weight",
        ),
        "sdxl",
    ),
    "unet without attention": (
        keys("down_blocks.0.resnets.0.conv1.weight", "up_blocks.0.resnets.0.conv1.weight"),
        "unet",
    ),
    "ldm vae": (
        keys(
            "encoder.conv_in.weight",
            "encoder.down.0.block.0.conv1.weight",
            "decoder.up.0.block.0.conv1.weight",
            "quant_conv.weight",
        ),
        "vae",
    ),
    "diffusers vae": (
        keys(
            "encoder.down_blocks.0.resnets.0.conv1.weight",
            "decoder.up_blocks.0.resnets.0.conv1.weight",
            "post_quant_conv.weight",
        ),
        "vae",
    ),
    "clip text encoder": (
        keys(
            ("text_model.embeddings.token_embedding.weight", (49408, 768)),
            ("text_model.encoder.layers.0.self_attn.q_proj.weight", (768, 768)),
            "text_model.final_layer_norm.weight",
        ),
        "clip",
    ),
    "llama hf": (
        keys(
            ("model.embed_tokens.weight", (32000, 4096)),
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight",
        ),
        "llama-like",
    ),
    "qwen2 hf": (
        keys(
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.k_proj.bias",
            "model.layers.0.mlp.gate_proj.weight",
        ),
        "qwen",
    ),
    "gpt2": (
        keys(
            ("wte.weight", (50257, 768)),
            "wpe.weight",
            ("h.0.attn.c_attn.weight", (768, 2304)),
            "h.0.attn.c_proj.weight",
            "h.0.mlp.c_fc.weight",
            "ln_f.weight",
        ),
        "gpt2",
    ),
    "gpt2 lm head": (
        keys("transformer.wte.weight", "transformer.h.11.attn.c_attn.bias", "lm_head.weight"),
        "gpt2",
    ),
    "bert": (
        keys(
            "bert.embeddings.word_embeddings.weight",
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.0.attention.self.key.weight",
            "bert.encoder.layer.0.attention.output.dense.weight",
            "bert.encoder.layer.0.intermediate.dense.weight",
            "bert.pooler.dense.weight",
        ),
        "bert",
    ),
    "sentence-transformers bert": (
        keys(
            "embeddings.word_embeddings.weight",
            "encoder.layer.5.attention.self.query.bias",
            "encoder.layer.5.output.LayerNorm.weight",
        ),
        "bert",
    ),
    "t5": (
        keys(
            "shared.weight",
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.0.layer.1.DenseReluDense.wi.weight",
            "decoder.block.0.layer.1.EncDecAttention.q.weight",
            "lm_head.weight",
        ),
        "t5",
    ),
    "t5 encoder": (
        keys(
            "shared.weight",
            "encoder.block.23.layer.0.SelfAttention.k.weight",
            "encoder.final_layer_norm.weight",
        ),
        "t5",
    ),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_checkpoints(case: str) -> None:
    tensors, architecture = CHECKPOINTS[case]
    d = describe(tensors, {})
    assert (d.kind, d.flavour, d.architecture) == ("checkpoint", None, architecture)


SD1_LORA_UNET = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", 320, 320),
]
SD1_LORA_TE = [
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 768),
]
SDXL_LORA = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048),
    ("lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_2", 1280, 5120),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
    ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280),
]
FLUX_KOHYA = [
    ("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072),
    ("lora_unet_double_blocks_0_txt_mlp_0", 12288, 3072),
    ("lora_unet_single_blocks_0_linear1", 21504, 3072),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
]
FLUX_KOHYA_DIFFUSERS_NAMES = [
    ("lora_transformer_single_transformer_blocks_0_attn_to_k", 3072, 3072),
    ("lora_transformer_transformer_blocks_0_attn_to_k", 3072, 3072),
    ("lora_transformer_transformer_blocks_0_ff_net_0_proj", 12288, 3072),
]
FLUX_DIFFUSERS = [
    ("transformer.single_transformer_blocks.0.attn.to_k", 3072, 3072),
    ("transformer.transformer_blocks.0.attn.to_k", 3072, 3072),
    ("transformer.transformer_blocks.0.attn.add_q_proj", 3072, 3072),
]
FLUX_DOUBLE_ONLY = [("transformer.transformer_blocks.0.attn.to_k", 3072, 3072)]
FLUX_COMFY = [
    ("diffusion_model.double_blocks.0.img_attn.qkv", 9216, 3072),
    ("diffusion_model.single_blocks.0.linear1", 21504, 3072),
]
SD3_DIFFUSERS = [
    ("transformer.transformer_blocks.0.attn.to_k", 1536, 1536),
    ("transformer.transformer_blocks.0.attn.add_k_proj", 1536, 1536),
]
SDXL_DIFFUSERS = [
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 640, 2048),
    ("unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 1280, 1280),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768),
    ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", 1280, 1280),
]
SD1_ATTN_PROCS = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k", 320, 768),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q", 320, 320),
]
LLAMA_PEFT = [
    ("base_model.model.model.layers.0.self_attn.q_proj", 4096, 4096),
    ("base_model.model.model.layers.0.self_attn.v_proj", 1024, 4096),
    ("base_model.model.model.layers.31.self_attn.q_proj", 4096, 4096),
]
LLAMA_GGUF = [
    ("blk.0.attn_q", 4096, 4096),
    ("blk.0.ffn_gate", 14336, 4096),
]

LORAS: dict[str, tuple[list[Tensor], str, str]] = {
    "kohya sd1": (lora(SD1_LORA_UNET + SD1_LORA_TE, "kohya"), "kohya", "sd1"),
    "kohya sd1 text encoder only": (lora(SD1_LORA_TE, "kohya"), "kohya", "sd1"),
    "kohya sd2": (
        lora(
            [
                ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 1024),
                ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, 1024),
            ],
            "kohya",
        ),
        "kohya",
        "sd2",
    ),
    "kohya sdxl": (lora(SDXL_LORA, "kohya"), "kohya", "sdxl"),
    "kohya sdxl unet only": (lora(SDXL_LORA[:2], "kohya"), "kohya", "sdxl"),
    "kohya flux": (lora(FLUX_KOHYA, "kohya"), "kohya", "flux"),
    "kohya-style flux with diffusers names": (
        lora(FLUX_KOHYA_DIFFUSERS_NAMES, "kohya"),
        "kohya",
        "flux",
    ),
    "kohya dora": (
        lora(SD1_LORA_UNET, "kohya")
        + [(f"{m}.dora_scale", "F16", (1, n_in)) for m, _, n_in in SD1_LORA_UNET],
        "kohya",
        "sd1",
    ),
    "diffusers flux": (lora(FLUX_DIFFUSERS, "peft"), "diffusers", "flux"),
    "diffusers flux double blocks only": (lora(FLUX_DOUBLE_ONLY, "peft"), "diffusers", "flux"),
    "comfy flux": (lora(FLUX_COMFY, "peft"), "diffusers", "flux"),
    "diffusers sd3": (lora(SD3_DIFFUSERS, "peft"), "diffusers", "sd3"),
    "diffusers sdxl": (lora(SDXL_DIFFUSERS, "peft"), "diffusers", "sdxl"),
    "diffusers attn procs sd1": (lora(SD1_ATTN_PROCS, "attn-procs"), "diffusers", "sd1"),
    "diffusers attn procs with unet prefix": (
        lora([(f"unet.{m}", o, i) for m, o, i in SD1_ATTN_PROCS], "attn-procs"),
        "diffusers",
        "sd1",
    ),
    "peft llama": (lora(LLAMA_PEFT, "peft"), "peft", "llama-like"),
    "loha sd1": (lora(SD1_LORA_UNET, "loha"), "loha", "sd1"),
    "loha sdxl": (lora(SDXL_LORA, "loha"), "loha", "sdxl"),
    "lokr sdxl": (lora(SDXL_LORA, "lokr"), "lokr", "sdxl"),
    "gguf llama adapter": (lora(LLAMA_GGUF, "gguf"), "gguf", "llama-like"),
}


@pytest.mark.parametrize("case", sorted(LORAS))
def test_loras(case: str) -> None:
    tensors, flavour, architecture = LORAS[case]
    d = describe(tensors, {})
    assert (d.kind, d.flavour, d.architecture) == ("lora", flavour, architecture)


def test_gguf_adapter_takes_the_architecture_hint() -> None:
    d = describe(lora(LLAMA_GGUF, "gguf"), {"general.architecture": "llama"})
    assert (d.kind, d.flavour, d.architecture) == ("lora", "gguf", "llama")


def test_a_few_bundled_embeddings_keep_a_lora_a_lora() -> None:
    tensors = lora(SD1_LORA_UNET, "kohya") + keys(("bundle_emb.mychar.string_to_param.*", (2, 768)))
    assert describe(tensors, {}).kind == "lora"


EMBEDDINGS: dict[str, tuple[list[Tensor], str]] = {
    "safetensors sd1": (keys(("emb_params", (4, 768))), "sd1"),
    "safetensors sd2": (keys(("emb_params", (8, 1024))), "sd2"),
    "a1111 pt sd1": (
        [*keys(("string_to_param.*", (2, 768))), ("string_to_token.*", "I64", ())],
        "sd1",
    ),
    "sdxl": (keys(("clip_l", (4, 768)), ("clip_g", (4, 1280))), "sdxl"),
}


@pytest.mark.parametrize("case", sorted(EMBEDDINGS))
def test_embeddings(case: str) -> None:
    tensors, architecture = EMBEDDINGS[case]
    d = describe(tensors, {})
    assert (d.kind, d.flavour, d.architecture) == ("embedding", None, architecture)


GGUF_LLAMA = keys(
    ("token_embd.weight", (128256, 4096)),
    "blk.0.attn_norm.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.0.attn_v.weight",
    "blk.0.attn_output.weight",
    "blk.0.ffn_norm.weight",
    "blk.0.ffn_gate.weight",
    "blk.0.ffn_up.weight",
    "blk.0.ffn_down.weight",
    "output_norm.weight",
    "output.weight",
    dtype="Q4_K",
)
GGUF_GPT2 = keys(
    "token_embd.weight",
    "position_embd.weight",
    "blk.0.attn_qkv.weight",
    "blk.0.attn_output.weight",
    "blk.0.ffn_up.weight",
    "blk.0.ffn_down.weight",
    dtype="Q8_0",
)


@pytest.mark.parametrize(
    ("tensors", "hint", "architecture"),
    [
        (GGUF_LLAMA, "llama", "llama"),
        (GGUF_LLAMA, "mistral", "mistral"),
        (GGUF_LLAMA, "qwen2", "qwen"),
        (GGUF_LLAMA, "Qwen3 ", "qwen"),
        (GGUF_LLAMA, None, "llama-like"),
        (GGUF_LLAMA, "bert", "llama-like"),
        (GGUF_LLAMA, "<b>anything</b>", "llama-like"),
        (GGUF_GPT2, "gpt2", "gpt2"),
        (GGUF_GPT2, "llama", "unknown"),
        (keys("enc.blk.0.attn_q.weight", "dec.blk.0.cross_attn_q.weight"), "t5", "t5"),
        (keys("token_types.weight", "blk.0.attn_q.weight"), "bert", "bert"),
    ],
)
def test_gguf_architecture_is_only_a_hint(
    tensors: list[Tensor], hint: str | None, architecture: str
) -> None:
    metadata = {"general.name": "x"} if hint is None else {"general.architecture": hint}
    d = describe(tensors, metadata)
    assert d.architecture == architecture
    assert d.kind == ("checkpoint" if len(tensors) >= 16 or architecture != "unknown" else "other")


def test_gguf_image_model_goes_by_names() -> None:
    tensors = keys("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
    assert describe(tensors, {"general.architecture": "llama"}).architecture == "flux"


def test_unknown_small_file_is_other() -> None:
    d = describe(keys("weight", ("bias", (4,))), {})
    assert (d.kind, d.flavour, d.architecture) == ("other", None, "unknown")


def test_unknown_large_file_is_a_checkpoint() -> None:
    d = describe(keys(*(f"net.{i}.weight" for i in range(20))), {})
    assert (d.kind, d.architecture) == ("checkpoint", "unknown")


def test_empty_is_other() -> None:
    d = describe([], {})
    assert (d.kind, d.architecture, d.tensors, d.parameters, d.dtypes) == (
        "other",
        "unknown",
        0,
        0,
        {},
    )


def test_sizes_and_dtypes_are_counted() -> None:
    tensors = [
        ("a.weight", "F16", (3, 4)),
        ("a.bias", "F32", (3,)),
        ("scale", "F32", ()),
        ("q.weight", "Q8_0", (2, 64)),
        ("empty", "F16", (0, 5)),
    ]
    d = describe(tensors, {})
    assert (d.tensors, d.parameters) == (5, 12 + 3 + 1 + 128 + 0)
    assert d.dtypes == {"F16": 2, "F32": 2, "Q8_0": 1}
    assert d.to_json()["dtypes"] == {"F16": 2, "F32": 2, "Q8_0": 1}


def test_every_architecture_rule_is_exercised() -> None:
    """A rule no case reaches is dead or shadowed by an earlier one."""
    seen = {arch for _, arch in CHECKPOINTS.values()}
    seen |= {arch for _, _, arch in LORAS.values()}
    seen |= {"llama", "mistral", "auraflow"}
    assert {answer for answer, _ in ARCHITECTURES} <= seen


def test_auraflow() -> None:
    tensors = keys(
        "joint_transformer_blocks.0.attn.to_q.weight",
        "single_transformer_blocks.0.attn.to_q.weight",
        "register_tokens",
    )
    assert describe(tensors, {}).architecture == "auraflow"


ALL_CASES = (
    [t for t, _ in CHECKPOINTS.values()]
    + [t for t, _, _ in LORAS.values()]
    + [t for t, _ in EMBEDDINGS.values()]
)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ALL_CASES), st.randoms(use_true_random=False))
def test_tensor_order_does_not_matter(tensors: list[Tensor], rnd: random.Random) -> None:
    shuffled = list(tensors)
    rnd.shuffle(shuffled)
    assert describe(shuffled, {}) == describe(tensors, {})
