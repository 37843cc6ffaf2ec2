"""The Flux family of benchmarks/eval_derivatives.py: one tiny FluxTransformer2DModel
and every layout the Black Forest Labs / ComfyUI / kohya world writes it in.

The base is pretrained on a mixture of four regression tasks, so that fine-tunes on
other tasks are not artificially alike. Checkpoints are converted to BFL names with
the inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` (fused
``img_attn.qkv``, ``linear1`` = q, k, v and the MLP input, the final AdaLN halves
swapped), to ComfyUI's ``model.diffusion_model.`` prefix, to ComfyUI's fp8_scaled
form (``scale_weight`` beside each fp8 weight, a ``scaled_fp8`` marker) and to GGUF
Q8_0 with BFL names. LoRAs are trained with peft on diffusers modules and converted
to kohya's fused BFL form the way sd-scripts' ``convert_flux_lora.py`` does (down
factors stacked, up factors block-diagonal), to ComfyUI's ``diffusion_model.``
``lora_A``/``lora_B`` names, and to PEFT names with and without ``transformer.``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

SD = dict[str, torch.Tensor]
CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
INNER = 32
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                "to_add_out", "proj_mlp"]


def flux_model(seed: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**CONFIG)


def flux_step_fn(task: int) -> Callable[[torch.nn.Module], torch.Tensor]:
    """Denoising-like regression: predict a task-specific function of image and text."""
    g = torch.Generator().manual_seed(3000 + task)
    w_img = torch.randn(16, 16, generator=g) / 4
    w_txt = torch.randn(32, 16, generator=g) / 6
    img_ids, txt_ids = torch.zeros(16, 3), torch.zeros(8, 3)

    def loss(model: torch.nn.Module) -> torch.Tensor:
        x, txt, pooled = torch.randn(4, 16, 16), torch.randn(4, 8, 32), torch.randn(4, 32)
        target = torch.tanh(x @ w_img + (txt.mean(1) @ w_txt)[:, None, :])
        out = model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled,
                    timestep=torch.rand(4), img_ids=img_ids, txt_ids=txt_ids,
                    guidance=torch.full((4,), 3.5)).sample
        return torch.nn.functional.mse_loss(out, target)

    return loss


def mixture_step_fn(tasks: list[int]) -> Callable[[torch.nn.Module], torch.Tensor]:
    fns = [flux_step_fn(t) for t in tasks]
    return lambda m: sum((f(m) for f in fns), torch.zeros(())) / len(fns)


# ---------------------------------------------------------------- layouts

def _bfl_pairs(n_double: int, n_single: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """diffusers -> BFL module names: one-to-one, and fused BFL module -> its parts."""
    simple = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
    }
    fused: dict[str, list[str]] = {}
    for i in range(n_double):
        t, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        simple.update({
            t + "norm1.linear": b + "img_mod.lin", t + "norm1_context.linear": b + "txt_mod.lin",
            t + "attn.to_out.0": b + "img_attn.proj", t + "attn.to_add_out": b + "txt_attn.proj",
            t + "ff.net.0.proj": b + "img_mlp.0", t + "ff.net.2": b + "img_mlp.2",
            t + "ff_context.net.0.proj": b + "txt_mlp.0", t + "ff_context.net.2": b + "txt_mlp.2",
        })
        fused[b + "img_attn.qkv"] = [t + "attn.to_" + x for x in "qkv"]
        fused[b + "txt_attn.qkv"] = [t + f"attn.add_{x}_proj" for x in "qkv"]
    for i in range(n_single):
        t, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        simple.update({t + "norm.linear": b + "modulation.lin", t + "proj_out": b + "linear2"})
        fused[b + "linear1"] = [*(t + "attn.to_" + x for x in "qkv"), t + "proj_mlp"]
    return simple, fused


PAIRS = _bfl_pairs(CONFIG["num_layers"], CONFIG["num_single_layers"])  # type: ignore[arg-type]


def to_bfl(sd: SD) -> SD:
    """diffusers -> BFL (the inverse of diffusers' converter; q/k norm scales, which
    are never sketched, are left out)."""
    simple, fused = PAIRS
    out: SD = {}
    for d, b in simple.items():
        for leaf in ("weight", "bias"):
            out[f"{b}.{leaf}"] = sd[f"{d}.{leaf}"]
    for b, parts in fused.items():
        for leaf in ("weight", "bias"):
            out[f"{b}.{leaf}"] = torch.cat([sd[f"{p}.{leaf}"] for p in parts])
    for leaf in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{leaf}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    return out


def lora_to_kohya(lora: SD, scale: float) -> SD:
    """A peft LoRA on diffusers modules -> kohya's BFL form, fused modules included
    (sd-scripts convert_flux_lora.py: downs stacked, ups block-diagonal)."""
    simple, fused = PAIRS
    out: SD = {}

    def put(bfl: str, down: torch.Tensor, up: torch.Tensor) -> None:
        name = "lora_unet_" + bfl.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up * scale
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))

    for d, b in simple.items():
        if f"{d}.lora_A.weight" in lora:
            put(b, lora[f"{d}.lora_A.weight"], lora[f"{d}.lora_B.weight"])
    for b, parts in fused.items():
        have = [p for p in parts if f"{p}.lora_A.weight" in lora]
        if not have:
            continue
        downs = [lora[f"{p}.lora_A.weight"] for p in have]
        rows = {p: (lora[f"{p}.lora_B.weight"] if p in have else None) for p in parts}
        r = sum(x.shape[0] for x in downs)
        ups: list[torch.Tensor] = []
        col = 0
        for p in parts:
            up = rows[p]
            m = up.shape[0] if up is not None else (INNER if "proj_mlp" not in p else 4 * INNER)
            block = torch.zeros(m, r)
            if up is not None:
                block[:, col : col + up.shape[1]] = up
                col += up.shape[1]
            ups.append(block)
        put(b, torch.cat(downs), torch.cat(ups))
    return out


def kohya_to_comfy(kohya: SD) -> SD:
    """kohya names -> ComfyUI's ``diffusion_model.`` BFL names with lora_A/lora_B."""
    simple, fused = PAIRS
    names = {"lora_unet_" + b.replace(".", "_"): b for b in [*simple.values(), *fused]}
    out: SD = {}
    for k, v in kohya.items():
        module, _, leaf = k.partition(".")
        leaf = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(leaf, leaf)
        out[f"diffusion_model.{names[module]}.{leaf}"] = v
    return out


def bake_kohya(bfl: SD, kohya: SD) -> SD:
    out = dict(bfl)
    simple, fused = PAIRS
    names = {"lora_unet_" + b.replace(".", "_"): b for b in [*simple.values(), *fused]}
    for k, v in kohya.items():
        if k.endswith(".lora_down.weight"):
            module = k.removesuffix(".lora_down.weight")
            up = kohya[f"{module}.lora_up.weight"]
            alpha = float(kohya[f"{module}.alpha"])
            w = f"{names[module]}.weight"
            out[w] = bfl[w] + alpha / v.shape[0] * up @ v
    return out


def extract_kohya(ft_bfl: SD, base_bfl: SD, rank: int) -> SD:
    """A LoRA extracted from a fine-tune by SVD of each 2-D delta, in kohya BFL names
    (what sd-scripts' flux_extract_lora.py writes)."""
    out: SD = {}
    for k, w in ft_bfl.items():
        if not k.endswith(".weight") or w.ndim != 2:
            continue
        u, s, vh = torch.linalg.svd((w - base_bfl[k]).float(), full_matrices=False)
        name = "lora_unet_" + k.removesuffix(".weight").replace(".", "_")
        out[f"{name}.lora_up.weight"] = (u[:, :rank] * s[:rank]).contiguous()
        out[f"{name}.lora_down.weight"] = vh[:rank].contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def scaled_fp8(sd: SD) -> SD:
    """ComfyUI's fp8_scaled form: 2-D weights as e4m3 codes plus a ``scale_weight``."""
    out: SD = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max().float() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v.to(torch.bfloat16)
    return out


def build_flux(work: Path, rep: int, steps: int, base: SD, add: Callable[..., None],
               flagged: dict[str, Path], refs: list[Path], train: Callable[..., None],
               save_st: Callable[..., Path], write_gguf: Callable[..., Path]) -> None:
    """Flagged items F (a fine-tune, diffusers names) and L (a LoRA, kohya BFL names);
    uploads in every other layout, and negatives in each."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    d = work / f"flux{rep}"
    d.mkdir()
    seed = 300 + rep

    def finetune(task: int, start: SD) -> SD:
        m = flux_model(0)
        m.load_state_dict(start)
        loss = flux_step_fn(task)
        train(list(m.parameters()), lambda: loss(m), steps, 2e-4)
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    def adapter(task: int) -> tuple[SD, SD]:
        m = flux_model(0)
        m.load_state_dict(base)
        torch.manual_seed(task)
        m.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS,
                                 init_lora_weights="gaussian"))
        loss = flux_step_fn(task)
        train([p for p in m.parameters() if p.requires_grad], lambda: loss(m), steps, 1e-3)
        lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(m).items()}
        return lora, lora_to_kohya(lora, 1.0)

    F, G = finetune(seed * 10 + 1, base), finetune(seed * 10 + 2, base)
    L_peft, L = adapter(seed * 10 + 3)
    L2_peft, L2 = adapter(seed * 10 + 4)
    base_bfl = to_bfl(base)
    if rep == 0:
        for i in range(4):
            refs.append(save_st(to_bfl(finetune(9400 + i, base)), d / f"ref_F{i}.safetensors", torch.bfloat16))
            refs.append(save_st(adapter(9500 + i)[1], d / f"ref_L{i}.safetensors"))
    flagged[f"flux{rep}:F"] = save_st(F, d / "F.safetensors")
    flagged[f"flux{rep}:L"] = save_st(L, d / "L_kohya.safetensors")

    def case(name: str, path: Path, flag: str, expect: str | None, group: str | None = None) -> None:
        add("flux", f"flux{rep}:{name}", path, f"flux{rep}:{flag}", expect, group or f"{name} [flux]")

    F_bfl = to_bfl(F)
    case("F in BFL names, bf16", save_st(F_bfl, d / "F_bfl.safetensors", torch.bfloat16), "F", "near-duplicate")
    case("F in ComfyUI names (model.diffusion_model.), fp16",
         save_st({f"model.diffusion_model.{k}": v for k, v in F_bfl.items()}, d / "F_comfy.safetensors", torch.float16),
         "F", "near-duplicate")
    case("F ComfyUI fp8_scaled", save_st(scaled_fp8(F_bfl), d / "F_fp8.safetensors"), "F", "near-duplicate|derived")
    case("F GGUF Q8_0, BFL names", write_gguf(F_bfl, d / "F_q8.gguf", "Q8_0"), "F", "near-duplicate|derived")
    case("LoRA extracted from F (SVD rank 8, kohya BFL)", save_st(extract_kohya(F_bfl, base_bfl, 8), d / "F_extracted.safetensors"), "F", "derived")
    case("L as trained (peft names, no prefix)", save_st(L_peft, d / "L_peft.safetensors"), "L", "lora")
    case("L in diffusers names (transformer. prefix)",
         save_st({f"transformer.{k}": v for k, v in L_peft.items()}, d / "L_diffusers.safetensors"), "L", "lora")
    case("L in ComfyUI names (diffusion_model., lora_A/B, fused)", save_st(kohya_to_comfy(L), d / "L_comfy.safetensors"), "L", "lora")
    L_baked = bake_kohya(base_bfl, L)
    case("L baked into BFL checkpoint, bf16", save_st(L_baked, d / "L_baked.safetensors", torch.bfloat16), "L", "lora-baked")
    case("L baked, ComfyUI fp8_scaled", save_st(scaled_fp8(L_baked), d / "L_baked_fp8.safetensors"), "L", "lora-baked")
    base_up = save_st(base_bfl, d / "base_bfl.safetensors", torch.bfloat16)
    case("base (BFL) vs F", base_up, "F", None, "base of the flagged item")
    case("base (BFL) vs L", base_up, "L", None, "base of the flagged item")
    G_bfl = to_bfl(G)
    g_up = save_st(G_bfl, d / "G_bfl.safetensors", torch.bfloat16)
    case("sibling G (BFL) vs F", g_up, "F", None, "sibling fine-tune")
    case("sibling G (BFL) vs L", g_up, "L", None, "sibling fine-tune")
    case("sibling G fp8_scaled vs F", save_st(scaled_fp8(G_bfl), d / "G_fp8.safetensors"), "F", None, "sibling fine-tune")
    case("LoRA extracted from sibling G vs F", save_st(extract_kohya(G_bfl, base_bfl, 8), d / "G_extracted.safetensors"), "F", None, "LoRA extracted from a sibling")
    case("other LoRA L2 (kohya BFL) vs L", save_st(L2, d / "L2_kohya.safetensors"), "L", None, "other LoRA, same base")
    case("other LoRA L2 (peft) vs L", save_st(L2_peft, d / "L2_peft.safetensors"), "L", None, "other LoRA, same base")
    case("other LoRA L2 baked (BFL) vs L", save_st(bake_kohya(base_bfl, L2), d / "L2_baked.safetensors", torch.bfloat16), "L", None, "other LoRA baked")


def flux_base(steps: int, train: Callable[..., None]) -> SD:
    m = flux_model(1)
    loss = mixture_step_fn([0, 1, 2, 3])
    train(list(m.parameters()), lambda: loss(m), 4 * steps, 5e-4)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}
