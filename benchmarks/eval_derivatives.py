"""Does the sketch layer find every re-upload form of a flagged model, and nothing else?

Builds small but real models at run time (random-init tiny architectures, trained
with real optimizer steps), applies the transformations people use on a flagged
item, fingerprints every result with modelhash, and scores each against the flagged
item the way the registry would (flagged fine-tunes stored as a delta against their
reference base, flagged adapters as their LoRA sketch). Prints, per transformation,
the score distribution and detection rate, per negative class the false-positive
rate, and the thresholds with their margins. A second pass then flags every flagged
item in one SQLite registry and checks every upload with the registry's own
retrieval and verification (``find_matches``), against all flags at once, and
reports what it found, what it missed, and any match of another flag.

Two families:

- **sd**: a tiny SD-style pipeline (diffusers UNet2DConditionModel + transformers
  CLIPTextModel) pretrained briefly into a base, then fine-tuned and LoRA-trained
  (peft LoRA, LoHa, LoKr) on other data;
- **llm**: a tiny LlamaForCausalLM, base, fine-tunes, a peft LoRA, GGUF quantisations;
  with ``--llama-cpp DIR`` (and ``--llama-quantize BIN``) also every model saved by
  ``save_pretrained`` and converted by llama.cpp's own tools (benchmarks/llama_cpp_gguf.py);
- **flux**: a tiny FluxTransformer2DModel in every layout the BFL / ComfyUI / kohya
  world writes (see benchmarks/flux_family.py).

    python benchmarks/eval_derivatives.py [--replicates 5] [--steps 40] [--families flux]
    python benchmarks/eval_derivatives.py --families llm --llama-cpp LLAMA_CPP \
        --llama-quantize LLAMA_CPP/build/bin/llama-quantize

``--invariant`` then runs ``benchmarks/eval_invariant.py``: permuted, rotated and
rescaled re-uploads of the sd and llm families, which the invariant layer catches.

Needs torch, transformers, diffusers, peft and gguf; never downloads weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._similarity import (
    THRESHOLDS,
    calibrated,
    compare,
    delta_sketch,
    match,
    shared_direction,
)
from modelhash.fingerprint._sketch import Sketch

torch.set_num_threads(2)
SD = dict[str, torch.Tensor]
N_REFS = 6
"""Known-innocent fine-tunes and adapters per family, registered as references
(``--references`` sets how many of them are used)."""


# ---------------------------------------------------------------- models and data


def sd_models(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    )
    te = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=512, max_position_embeddings=16,
    ))
    return unet, te


def sd_vae(seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
        norm_num_groups=8, sample_size=16,
    )


def vae_state(vae: torch.nn.Module) -> SD:
    return {f"vae/{k}": v.detach().clone() for k, v in vae.state_dict().items()}


def finetune_vae_decoder(start: SD, steps: int, seed: int) -> SD:
    """Fine-tune a VAE's decoder only on reconstruction, as the popular replacement
    SD VAEs (ft-EMA, ft-MSE) were: a large change that many checkpoints then bake in."""
    vae = sd_vae(0)
    vae.load_state_dict({k[4:]: v for k, v in start.items() if k.startswith("vae/")})
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(32, 3, 16, 16, generator=g)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)

    def loss() -> torch.Tensor:
        x = images[torch.randint(0, 32, (8,), generator=g)]
        return torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)

    train(list(vae.decoder.parameters()), loss, steps, 2e-3)
    return vae_state(vae)


def sd_step_fn(data_seed: int) -> Callable[[torch.nn.Module, torch.nn.Module], torch.Tensor]:
    """Denoising loss on a dataset: latents around a dataset pattern, prompts from its vocabulary."""
    g = torch.Generator().manual_seed(1000 + data_seed)
    pattern = torch.randn(4, 8, 8, generator=g)
    vocab = torch.randint(0, 512, (40,), generator=g)

    def loss(unet: torch.nn.Module, te: torch.nn.Module) -> torch.Tensor:
        x0 = pattern + 0.5 * torch.randn(8, 4, 8, 8)
        ids = vocab[torch.randint(0, 40, (8, 16))]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (8,))
        sigma = (t.float() / 1000).view(-1, 1, 1, 1)
        noisy = (1 - sigma).sqrt() * x0 + sigma.sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=te(ids).last_hidden_state).sample
        return torch.nn.functional.mse_loss(pred, noise)

    return loss


def llm_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=64,
    ))


def llm_step_fn(data_seed: int) -> Callable[[torch.nn.Module], torch.Tensor]:
    """Next-token loss on sequences from a dataset-specific sparse Markov chain."""
    g = torch.Generator().manual_seed(2000 + data_seed)
    nxt = torch.randint(0, 512, (512, 4), generator=g)

    def loss(model: torch.nn.Module) -> torch.Tensor:
        seq = [torch.randint(0, 512, (8,))]
        for _ in range(31):
            seq.append(nxt[seq[-1], torch.randint(0, 4, (8,))])
        ids = torch.stack(seq, dim=1)
        return model(input_ids=ids, labels=ids).loss

    return loss


def train(params: list[torch.nn.Parameter], loss: Callable[[], torch.Tensor], steps: int, lr: float) -> None:
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()


def sd_state(unet: torch.nn.Module, te: torch.nn.Module) -> SD:
    out = {f"unet/{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    out.update({f"text_encoder/{k}": v.detach().clone() for k, v in te.state_dict().items()})
    return out


def load_sd(unet: torch.nn.Module, te: torch.nn.Module, sd: SD) -> None:
    unet.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("unet/")})
    te.load_state_dict({k[13:]: v for k, v in sd.items() if k.startswith("text_encoder/")})


# ---------------------------------------------------------------- writers (the tools people use)


def save_st(sd: SD, path: Path, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    out = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(out, str(path), metadata=metadata)
    return path


def save_diffusers(sd: SD, folder: Path, seed: int, shard: str | None = None) -> Path:
    """A diffusers pipeline folder (unet/ + text_encoder/) written with save_pretrained."""
    unet, te = sd_models(seed)
    load_sd(unet, te, sd)
    unet.save_pretrained(folder / "unet", max_shard_size=shard or "10GB")
    te.save_pretrained(folder / "text_encoder", max_shard_size=shard or "10GB")
    (folder / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    return folder


def _ldm_unet_map() -> list[tuple[str, str]]:
    """(ldm, diffusers) prefixes, as in diffusers' convert_diffusers_to_original_stable_diffusion.py."""
    layer: list[tuple[str, str]] = []
    for i in range(4):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        layer.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return layer


_LDM_SIMPLE = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
               ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
_LDM_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
               ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def to_ldm(sd: SD) -> SD:
    """A diffusers SD state dict in the original single-file (ldm) naming."""
    out: SD = {}
    for k, v in sd.items():
        if k.startswith("text_encoder/"):
            out["cond_stage_model.transformer." + k[13:]] = v
            continue
        if k.startswith("vae/"):
            out["first_stage_model." + k[4:]] = v
            continue
        name = k[5:]
        for ldm, hf in _LDM_SIMPLE:
            if name.startswith(hf):
                name = ldm + name[len(hf):]
        if "resnets" in name:
            for ldm, hf in _LDM_RESNET:
                name = name.replace(hf, ldm)
        for ldm, hf in _ldm_unet_map():
            if name.startswith(hf):
                name = ldm + name[len(hf):]
                break
        out["model.diffusion_model." + name] = v
    return out


def merge(a: SD, b: SD, alpha: float) -> SD:
    return {k: alpha * a[k] + (1 - alpha) * b[k] if a[k].is_floating_point() else a[k] for k in a}


def dare(base: SD, models: list[tuple[SD, float]], density: float, seed: int) -> SD:
    """mergekit's dare_linear: each delta keeps a random ``density`` of its entries,
    rescaled by 1/density, then the deltas are added with their weights."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in models[0][0]:
        b = base[k]
        if not b.is_floating_point():
            out[k] = b
            continue
        acc = torch.zeros_like(b, dtype=torch.float32)
        for m, w in models:
            d = (m[k] - b).float()
            keep = torch.rand(d.shape, generator=g) < density
            acc += w * torch.where(keep, d / density, torch.zeros_like(d))
        out[k] = (b.float() + acc).to(b.dtype)
    return out


def ties(base: SD, models: list[tuple[SD, float]], density: float) -> SD:
    """mergekit's ties: trim each delta to its top ``density`` by magnitude, elect
    each entry's sign by the weighted sum, and average the entries that agree."""
    out = {}
    for k in models[0][0]:
        b = base[k]
        if not b.is_floating_point():
            out[k] = b
            continue
        trimmed = []
        for m, w in models:
            d = (m[k] - b).float()
            n = max(1, int(density * d.numel()))
            cut = d.abs().flatten().kthvalue(d.numel() - n + 1).values if n < d.numel() else -1.0
            trimmed.append(w * torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
        stack = torch.stack(trimmed)
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        weights = torch.tensor([w for _, w in models]).reshape(-1, *([1] * b.dim()))
        num = (stack * agree).sum(0)
        den = (weights * agree).sum(0).clamp_min(1e-12)
        out[k] = (b.float() + num / den).to(b.dtype)
    return out


def prune(sd: SD, frac: float) -> SD:
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.dim() >= 2:
            cut = v.abs().flatten().kthvalue(max(1, int(frac * v.numel()))).values
            v = torch.where(v.abs() <= cut, torch.zeros_like(v), v)
        out[k] = v
    return out


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")


def extract_lora(ft: SD, base: SD, rank: int) -> SD:
    """A kohya LoRA of ``ft - base`` by truncated SVD, as kohya's extract_lora_from_models does."""
    from diffusers.utils import convert_state_dict_to_kohya

    plain: SD = {}
    for k, w in ft.items():
        mod = k.removeprefix("unet/").removesuffix(".weight")
        if not k.startswith("unet/") or not k.endswith(".weight") or not mod.endswith(LORA_TARGETS):
            continue
        if w.ndim not in (2, 4) or (w.ndim == 4 and tuple(w.shape[2:]) != (1, 1)):
            continue
        d = (w - base[k]).float()
        u, sv, vh = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
        r = min(rank, sv.shape[0])
        up, down = u[:, :r] * sv[:r], vh[:r]
        if w.ndim == 4:
            up, down = up.reshape(*up.shape, 1, 1), down.reshape(*down.shape, 1, 1)
        plain[f"unet.{mod}.lora_A.weight"] = down.contiguous()
        plain[f"unet.{mod}.lora_B.weight"] = up.contiguous()
    # convert_state_dict_to_kohya writes alpha = rank: scale 1, the delta as extracted.
    return convert_state_dict_to_kohya(plain)


def write_gguf(sd: SD, path: Path, qtype: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    for k, v in sd.items():
        arr = v.float().numpy()
        if arr.ndim == 2 and arr.shape[1] % 32 == 0:
            w.add_tensor(k, gguf.quants.quantize(arr, kind), raw_dtype=kind)
        else:
            w.add_tensor(k, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- scenario


@dataclass
class Case:
    family: str
    name: str
    path: Path
    flagged: str
    expect: str | None  # the match types accepted ("a|b"), None for a negative
    group: str  # transformation name or negative class


def build_sd(work: Path, rep: int, steps: int, base_sd: SD, cases: list[Case], flagged: dict[str, Path],
             refs: list[Path]) -> None:
    from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    d = work / f"sd{rep}"
    d.mkdir()
    seed = 100 + rep

    def finetune(data: int, start: SD, n: int = steps) -> SD:
        unet, te = sd_models(0)
        load_sd(unet, te, start)
        loss = sd_step_fn(data)
        train([*unet.parameters(), *te.parameters()], lambda: loss(unet, te), n, 2e-4)
        return sd_state(unet, te)

    def adapter(cfg: object, data: int, folder: Path) -> tuple[SD, object]:
        unet, te = sd_models(0)
        load_sd(unet, te, base_sd)
        torch.manual_seed(data)
        pm = get_peft_model(unet, cfg)  # type: ignore[arg-type]
        loss = sd_step_fn(data)
        train(list(pm.parameters()), lambda: loss(pm, te), steps, 1e-3)
        pm.save_pretrained(str(folder))
        lora_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
        merged = pm.merge_and_unload()
        return {**{f"unet/{k}": v.detach().clone() for k, v in merged.state_dict().items()},
                **{f"text_encoder/{k}": v.detach().clone() for k, v in te.state_dict().items()}}, lora_sd

    F = finetune(seed * 10 + 1, base_sd)
    G = finetune(seed * 10 + 2, base_sd)
    H = finetune(seed * 10 + 3, base_sd)
    target = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights="gaussian")
    L_baked, L_sd = adapter(lcfg, seed * 10 + 4, d / "L_peft")
    L2_baked, _ = adapter(LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights="gaussian"), seed * 10 + 5, d / "L2_peft")
    loha_baked, _ = adapter(LoHaConfig(r=4, alpha=8, target_modules=target), seed * 10 + 6, d / "LoHa_peft")
    lokr_baked, _ = adapter(LoKrConfig(r=4, alpha=8, target_modules=target), seed * 10 + 7, d / "LoKr_peft")

    if rep == 0:
        # Known-innocent public derivatives of the base, registered as references: the
        # registry learns from them what every fine-tune and adapter of the base shares.
        for i in range(N_REFS):
            refs.append(save_st(finetune(9000 + i, base_sd), d / f"ref_F{i}.safetensors", torch.float16))
            adapter(LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights="gaussian"), 9100 + i, d / f"ref_L{i}")
            refs.append(d / f"ref_L{i}" / "adapter_model.safetensors")
    flagged[f"sd{rep}:F"] = save_st(F, d / "F.safetensors")
    flagged[f"sd{rep}:L"] = d / "L_peft" / "adapter_model.safetensors"
    flagged[f"sd{rep}:LoHa"] = d / "LoHa_peft" / "adapter_model.safetensors"
    flagged[f"sd{rep}:LoKr"] = d / "LoKr_peft" / "adapter_model.safetensors"

    def add(name: str, path: Path, flag: str, expect: str | None, group: str | None = None) -> None:
        cases.append(Case("sd", f"sd{rep}:{name}", path, f"sd{rep}:{flag}", expect, group or f"{name} [sd]"))

    # Transformations of the flagged fine-tune F.
    add("F fp16", save_st(F, d / "F16.safetensors", torch.float16), "F", "near-duplicate")
    add("F bf16", save_st(F, d / "Fbf16.safetensors", torch.bfloat16), "F", "near-duplicate")
    add("F fp8 e4m3", save_st(F, d / "F8.safetensors", torch.float8_e4m3fn), "F", "near-duplicate|derived")
    torch.save({k: v.half() for k, v in to_ldm(F).items()}, d / "F_ldm.ckpt")
    add("F ldm names, torch.save fp16", d / "F_ldm.ckpt", "F", "near-duplicate")
    add("F diffusers save_pretrained sharded", save_diffusers(F, d / "F_diffusers", seed, "40KB"), "F", "near-duplicate")
    add("F pruned 30% (magnitude)", save_st(prune(F, 0.3), d / "Fprune.safetensors", torch.float16), "F", "derived")
    add("F trained further", save_st(finetune(seed * 10 + 8, F, steps // 2), d / "Fmore.safetensors"), "F", "derived")
    for a in (0.7, 0.5, 0.3):
        add(f"merge {a:.1f} F + {1 - a:.1f} sibling", save_st(merge(F, G, a), d / f"merge{a}.safetensors", torch.float16), "F", "derived")
    add("TIES merge F + sibling (density 0.5)", save_st(ties(base_sd, [(F, 1.0), (G, 1.0)], 0.5), d / "ties.safetensors", torch.float16), "F", "derived")
    add("DARE merge 0.5 F + 0.5 sibling (density 0.5)", save_st(dare(base_sd, [(F, 0.5), (G, 0.5)], 0.5, seed), d / "dare.safetensors", torch.float16), "F", "derived")
    add("F + unrelated LoRA baked", save_st({k: F[k] + (L2_baked[k] - base_sd[k]) if F[k].is_floating_point() else F[k] for k in F}, d / "F_L2.safetensors"), "F", "derived")
    # A fine-tune flagged with a replacement VAE baked in (as many SD checkpoints are).
    vae_ft = finetune_vae_decoder(base_sd, 3 * steps, seed)
    FV = {**F, **vae_ft}
    flagged[f"sd{rep}:FV"] = save_st(FV, d / "FV.safetensors")
    add("F + replacement VAE, fp16", save_st(FV, d / "FV16.safetensors", torch.float16), "FV", "near-duplicate")
    add("F + replacement VAE, VAE swapped back to the original", save_st({**F, **{k: v for k, v in base_sd.items() if k.startswith("vae/")}}, d / "FV_orig.safetensors", torch.float16), "FV", "near-duplicate|derived")
    add("sibling with the same replacement VAE", save_st({**G, **vae_ft}, d / "GV.safetensors", torch.float16), "FV", None, "another model with the same baked VAE")
    add("base with the same replacement VAE", save_st({**base_sd, **vae_ft}, d / "baseV.safetensors", torch.float16), "FV", None, "another model with the same baked VAE")
    add("sibling with the same replacement VAE vs F", save_st({**G, **vae_ft}, d / "GV.safetensors", torch.float16), "F", None, "another model with the same baked VAE")
    # Transformations of the flagged LoRA L.
    peft_cfg = json.loads((d / "L_peft" / "adapter_config.json").read_text())
    plain = {k.removeprefix("base_model.model."): v for k, v in L_sd.items()}
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in plain.items()})
    add("L kohya (diffusers convert_state_dict_to_kohya)", save_st(kohya, d / "L_kohya.safetensors"), "L", "lora")
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": peft_cfg["r"], "unet.lora_alpha": peft_cfg["lora_alpha"]})}
    add("L diffusers format fp16", save_st({f"unet.{k}": v for k, v in plain.items()}, d / "L_diffusers.safetensors", torch.float16, meta), "L", "lora")
    refac = {}
    g = torch.Generator().manual_seed(seed)
    for k, v in kohya.items():
        if k.endswith(".lora_down.weight"):
            mod = k.removesuffix(".lora_down.weight")
            up = kohya[mod + ".lora_up.weight"]
            r = v.shape[0]
            R = torch.randn(r, r, generator=g) + 2 * torch.eye(r)
            new_alpha = 1.0
            s = (float(kohya[mod + ".alpha"]) / r) / (new_alpha / r)
            refac[mod + ".lora_up.weight"] = ((up.reshape(up.shape[0], r) @ R) * s).reshape(up.shape)
            refac[mod + ".lora_down.weight"] = torch.linalg.solve(R, v.reshape(r, -1)).reshape(v.shape)
            refac[mod + ".alpha"] = torch.tensor(new_alpha)
    add("L refactorised up·R, R⁻¹·down, alpha rescaled", save_st(refac, d / "L_refac.safetensors"), "L", "lora")
    add("L baked into base (peft merge_and_unload)", save_st(L_baked, d / "L_baked.safetensors", torch.float16), "L", "lora-baked")
    half = {k: base_sd[k] + 0.5 * (L_baked[k] - base_sd[k]) if base_sd[k].is_floating_point() else base_sd[k] for k in L_baked}
    add("L baked at strength 0.5", save_st(half, d / "L_half.safetensors", torch.float16), "L", "lora-baked")
    mixed = {k: base_sd[k] + 0.5 * (L_baked[k] - base_sd[k]) + 0.5 * (L2_baked[k] - base_sd[k]) if base_sd[k].is_floating_point() else base_sd[k] for k in L_baked}
    add("L and another LoRA baked at 0.5 each", save_st(mixed, d / "L_L2_half.safetensors", torch.float16), "L", "lora-baked")
    on_g = {k: G[k] + (L_baked[k] - base_sd[k]) if G[k].is_floating_point() else G[k] for k in G}
    add("L baked into a sibling fine-tune", save_st(on_g, d / "L_on_G.safetensors", torch.float16), "L", "lora-baked")
    torch.save(to_ldm({k: v.half() for k, v in L_baked.items()}), d / "L_baked_ldm.ckpt")
    add("L baked, ldm names, torch.save", d / "L_baked_ldm.ckpt", "L", "lora-baked")
    add("LoHa baked (peft merge_and_unload)", save_st(loha_baked, d / "LoHa_baked.safetensors", torch.float16), "LoHa", "lora-baked")
    add("LoKr baked (peft merge_and_unload)", save_st(lokr_baked, d / "LoKr_baked.safetensors", torch.float16), "LoKr", "lora-baked")
    # Negatives.
    base16 = save_st(base_sd, d / "base16.safetensors", torch.float16)
    for flag in ("F", "L", "LoHa", "LoKr"):
        add(f"base vs {flag}", base16, flag, None, "base of the flagged item")
    for name, sib in (("G", G), ("H", H)):
        p = save_st(sib, d / f"{name}.safetensors", torch.float16)
        add(f"sibling {name}", p, "F", None, "sibling fine-tune")
        add(f"sibling {name} vs L", p, "L", None, "sibling fine-tune")
    add("merge of two siblings", save_st(merge(G, H, 0.5), d / "GH.safetensors", torch.float16), "F", None, "merge of siblings")
    add("TIES merge of two siblings", save_st(ties(base_sd, [(G, 1.0), (H, 1.0)], 0.5), d / "GH_ties.safetensors", torch.float16), "F", None, "TIES / DARE merge of siblings")
    add("DARE merge of two siblings", save_st(dare(base_sd, [(G, 0.5), (H, 0.5)], 0.5, seed), d / "GH_dare.safetensors", torch.float16), "F", None, "TIES / DARE merge of siblings")
    # Community merges average many fine-tunes of one base: averaging cancels each
    # sibling's own delta and keeps what they share, so the merge's delta cosine with
    # F rises with the number of ingredients while its coefficient does not.
    K1 = finetune(seed * 10 + 9, base_sd)
    K2 = finetune(5000 + seed, base_sd)  # seed * 10 + 11 would be the next replicate's F data
    four = {k: (G[k] + H[k] + K1[k] + K2[k]) / 4 if G[k].is_floating_point() else G[k] for k in G}
    add("merge of four siblings", save_st(four, d / "GHK.safetensors", torch.float16), "F", None, "merge of four siblings")
    add("merge 0.5 F + 0.5 four-sibling merge", save_st(merge(F, four, 0.5), d / "F_GHK.safetensors", torch.float16), "F", "derived")
    # A LoRA extracted from the flagged fine-tune keeps a low-rank part of its delta.
    for rank in (8, 4):
        add(f"LoRA extracted from F (SVD rank {rank}, kohya)", save_st(extract_lora(F, base_sd, rank), d / f"F_lora{rank}.safetensors", torch.float16), "F", "derived")
    add("LoRA extracted from a sibling (rank 8)", save_st(extract_lora(G, base_sd, 8), d / "G_lora8.safetensors", torch.float16), "F", None, "LoRA extracted from a sibling")
    add("other LoRA L2", d / "L2_peft" / "adapter_model.safetensors", "L", None, "other LoRA, same base")
    add("other LoRA L2 vs LoHa", d / "L2_peft" / "adapter_model.safetensors", "LoHa", None, "other LoRA, same base")
    l2b = save_st(L2_baked, d / "L2_baked.safetensors", torch.float16)
    pair = {k: base_sd[k] + 0.5 * (L2_baked[k] - base_sd[k]) + 0.5 * (loha_baked[k] - base_sd[k]) if base_sd[k].is_floating_point() else base_sd[k] for k in L_baked}
    add("two other adapters (L2, LoHa) baked at 0.5 each vs L", save_st(pair, d / "L2_LoHa_half.safetensors", torch.float16), "L", None, "two other adapters baked at 0.5 each")
    for flag in ("L", "LoHa", "LoKr", "F"):
        add(f"other LoRA L2 baked vs {flag}", l2b, flag, None, "other LoRA baked")
    for s in (1, 2):
        unet, te = sd_models(7000 + 10 * rep + s)
        p = save_st(sd_state(unet, te), d / f"rand{s}.safetensors", torch.float16)
        for flag in ("F", "L"):
            add(f"random init {s} vs {flag}", p, flag, None, "random init, same architecture")


def build_llm(work: Path, rep: int, steps: int, base: SD, cases: list[Case], flagged: dict[str, Path],
              refs: list[Path], llama_cpp: Path | None = None, quantizer: Path | None = None) -> None:
    from peft import LoraConfig, get_peft_model

    d = work / f"llm{rep}"
    d.mkdir()
    seed = 200 + rep

    def finetune(data: int, start: SD, n: int = steps, only: tuple[str, ...] = ()) -> SD:
        m = llm_model(0)
        m.load_state_dict(start)
        loss = llm_step_fn(data)
        for name, p in m.named_parameters():
            p.requires_grad_(not only or any(w in name for w in only))
        train(list(m.parameters()), lambda: loss(m), n, 2e-4)
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    F = finetune(seed * 10 + 1, base)
    G = finetune(seed * 10 + 2, base)

    def adapter(data: int, folder: Path) -> SD:
        m = llm_model(0)
        m.load_state_dict(base)
        torch.manual_seed(data)
        pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
        loss = llm_step_fn(data)
        train(list(pm.parameters()), lambda: loss(pm), steps, 1e-3)
        pm.save_pretrained(str(folder))
        return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}

    L_baked = adapter(seed * 10 + 3, d / "L_peft")
    L2_baked = adapter(seed * 10 + 4, d / "L2_peft")
    L3_baked = adapter(seed * 10 + 5, d / "L3_peft")

    if rep == 0:
        for i in range(N_REFS):
            refs.append(save_st(finetune(9200 + i, base), d / f"ref_F{i}.safetensors", torch.bfloat16))
            adapter(9300 + i, d / f"ref_L{i}")
            refs.append(d / f"ref_L{i}" / "adapter_model.safetensors")
    flagged[f"llm{rep}:F"] = save_st(F, d / "F.safetensors")
    flagged[f"llm{rep}:L"] = d / "L_peft" / "adapter_model.safetensors"

    def add(name: str, path: Path, flag: str, expect: str | None, group: str | None = None) -> None:
        cases.append(Case("llm", f"llm{rep}:{name}", path, f"llm{rep}:{flag}", expect, group or f"{name} [llm]"))

    add("F fp16", save_st(F, d / "F16.safetensors", torch.float16), "F", "near-duplicate")
    for q in ("Q8_0", "Q5_1", "Q4_0"):
        add(f"F GGUF {q}", write_gguf(F, d / f"F_{q}.gguf", q), "F", "near-duplicate|derived")
    m = llm_model(0)
    m.load_state_dict(F)
    m.save_pretrained(d / "F_sharded", max_shard_size="300KB")
    add("F save_pretrained sharded", d / "F_sharded", "F", "near-duplicate")
    torch.save(F, d / "F.bin")
    add("F torch.save", d / "F.bin", "F", "near-duplicate")
    add("merge 0.5 F + 0.5 sibling", save_st(merge(F, G, 0.5), d / "merge.safetensors", torch.float16), "F", "derived")
    add("TIES merge F + sibling (density 0.5)", save_st(ties(base, [(F, 1.0), (G, 1.0)], 0.5), d / "ties.safetensors", torch.bfloat16), "F", "derived")
    add("DARE merge 0.5 F + 0.5 sibling (density 0.5)", save_st(dare(base, [(F, 0.5), (G, 0.5)], 0.5, seed), d / "dare.safetensors", torch.bfloat16), "F", "derived")
    add("L baked (peft merge_and_unload)", save_st(L_baked, d / "L_baked.safetensors", torch.bfloat16), "L", "lora-baked")
    add("L baked, GGUF Q8_0", write_gguf(L_baked, d / "L_baked_q8.gguf", "Q8_0"), "L", "lora-baked")
    mixed = {k: base[k] + 0.5 * (L_baked[k] - base[k]) + 0.5 * (L2_baked[k] - base[k]) if base[k].is_floating_point() else base[k] for k in L_baked}
    add("L and another LoRA baked at 0.5 each", save_st(mixed, d / "L_L2_half.safetensors", torch.bfloat16), "L", "lora-baked")
    base16 = save_st(base, d / "base16.safetensors", torch.float16)
    add("base vs F", base16, "F", None, "base of the flagged item")
    add("base vs L", base16, "L", None, "base of the flagged item")
    add("base GGUF Q4_0 vs F", write_gguf(base, d / "base_q4.gguf", "Q4_0"), "F", None, "base of the flagged item")
    g16 = save_st(G, d / "G.safetensors", torch.float16)
    add("sibling G", g16, "F", None, "sibling fine-tune")
    add("sibling G vs L", g16, "L", None, "sibling fine-tune")
    r = llm_model(9000 + rep)
    p = save_st({k: v.detach() for k, v in r.state_dict().items()}, d / "rand.safetensors", torch.float16)
    add("random init vs F", p, "F", None, "random init, same architecture")
    add("random init vs L", p, "L", None, "random init, same architecture")
    add("other LoRA L2 vs L", d / "L2_peft" / "adapter_model.safetensors", "L", None, "other LoRA, same base")
    add("other LoRA L2 baked vs L", save_st(L2_baked, d / "L2_baked.safetensors", torch.bfloat16), "L", None, "other LoRA baked")
    pair = {k: base[k] + 0.5 * (L2_baked[k] - base[k]) + 0.5 * (L3_baked[k] - base[k]) if base[k].is_floating_point() else base[k] for k in L_baked}
    add("two other LoRAs baked at 0.5 each vs L", save_st(pair, d / "L2_L3_half.safetensors", torch.bfloat16), "L", None, "two other adapters baked at 0.5 each")
    if llama_cpp is not None:
        build_llm_llama_cpp(d, seed, {"F": F, "G": G, "base": base, "L": L_baked},
                            lambda: finetune(seed * 10 + 6, base, only=("q_proj", "k_proj")),
                            add, flagged, rep, llama_cpp, quantizer)


LLAMA_CPP_OUTTYPES = ("f16", "bf16", "q8_0")
LLAMA_QUANTIZE_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "IQ4_XS", "Q4_0", "Q5_0")


def build_llm_llama_cpp(d: Path, seed: int, models: dict[str, SD], qk_finetune: Callable[[], SD],
                        add: Callable[..., None], flagged: dict[str, Path], rep: int,
                        llama_cpp: Path, quantizer: Path | None) -> None:
    """The llm family through llama.cpp's own tools: each model saved by transformers'
    ``save_pretrained``, converted by ``convert_hf_to_gguf.py`` (which renames every
    tensor and permutes the rows of q and k per head) to f16, bf16 and q8_0, and the f16
    file quantised by ``llama-quantize`` to K-quant mixes and legacy types.

    Besides F and the baked LoRA L, a fine-tune QK of q and k only is flagged: its whole
    delta sits in the permuted matrices, so it is found only if the permutation is undone.
    """
    from llama_cpp_gguf import convert, quantize

    QK = qk_finetune()
    flagged[f"llm{rep}:QK"] = save_st(QK, d / "QK.safetensors")
    models = {**models, "QK": QK}
    folders = {}
    for name, sd in models.items():
        m = llm_model(0)
        m.load_state_dict(sd)
        m.save_pretrained(d / f"hf_{name}")
        folders[name] = d / f"hf_{name}"
    files: dict[tuple[str, str], Path] = {}
    jobs = []
    for name, folder in folders.items():
        for outtype in LLAMA_CPP_OUTTYPES:
            files[name, outtype] = d / f"{name}_llama_{outtype}.gguf"
            jobs.append((folder, files[name, outtype], outtype))
    convert(llama_cpp, jobs)
    if quantizer is not None:
        for name in folders:
            for qtype in LLAMA_QUANTIZE_TYPES:
                files[name, qtype] = quantize(quantizer, files[name, "f16"], d / f"{name}_llama_{qtype}.gguf", qtype)
    kinds = LLAMA_CPP_OUTTYPES + (LLAMA_QUANTIZE_TYPES if quantizer is not None else ())
    tag = "[llm, llama.cpp]"
    for kind in kinds:
        add(f"F llama.cpp {kind}", files["F", kind], "F", "near-duplicate|derived", f"F llama.cpp {kind} {tag}")
        add(f"QK llama.cpp {kind}", files["QK", kind], "QK", "near-duplicate|derived", f"QK (q/k-only fine-tune) llama.cpp {kind} {tag}")
        add(f"L baked llama.cpp {kind}", files["L", kind], "L", "lora-baked", f"L baked llama.cpp {kind} {tag}")
        for flag in ("F", "QK", "L"):
            add(f"base llama.cpp {kind} vs {flag}", files["base", kind], flag, None, f"base llama.cpp {tag}")
            add(f"sibling G llama.cpp {kind} vs {flag}", files["G", kind], flag, None, f"sibling fine-tune llama.cpp {tag}")
        add(f"F llama.cpp {kind} vs QK", files["F", kind], "QK", None, f"F (not a q/k-only tune) llama.cpp vs QK {tag}")


# ---------------------------------------------------------------- scoring and the table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--verbose", action="store_true", help="print every case")
    ap.add_argument("--references", type=int, default=N_REFS,
                    help=f"known-innocent fine-tunes and adapters used per family (0 to {N_REFS}; 0: no "
                    "shared direction is removed)")
    ap.add_argument("--no-registry", action="store_true",
                    help="skip the second pass through a registry (retrieval + verification)")
    ap.add_argument("--families", nargs="+", default=["sd", "llm", "flux"],
                    choices=["sd", "llm", "flux"], help="families to build (default: all)")
    ap.add_argument("--llama-cpp", metavar="DIR", type=Path,
                    help="a llama.cpp source tree: the llm family then also converts its models with its "
                    "convert_hf_to_gguf.py (f16, bf16, q8_0)")
    ap.add_argument("--llama-quantize", metavar="BIN", type=Path,
                    help="a llama-quantize binary built from that tree: the f16 conversions are then also "
                    f"quantised to {', '.join(LLAMA_QUANTIZE_TYPES)}")
    ap.add_argument("--keep", metavar="DIR", help="build the models in DIR (must not hold an earlier run) and keep them")
    ap.add_argument("--invariant", action="store_true",
                    help="then run benchmarks/eval_invariant.py (permutations, rotations and "
                    "rescalings of the sd and llm families) with the same replicates and steps")
    args = ap.parse_args()
    fams = set(args.families)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        cases: list[Case] = []
        flagged: dict[str, Path] = {}
        refs: dict[str, list[Path]] = {fam: [] for fam in fams}
        bases: dict[str, Path] = {}
        if "sd" in fams:
            unet, te = sd_models(1)
            train([*unet.parameters(), *te.parameters()], lambda: sd_step_fn(0)(unet, te), 4 * args.steps, 5e-4)
            sd_base = {**sd_state(unet, te), **vae_state(sd_vae(1))}
            bases["sd"] = save_st(sd_base, work / "sd_base.safetensors")
        if "llm" in fams:
            llm = llm_model(1)
            train(list(llm.parameters()), lambda: llm_step_fn(0)(llm), 4 * args.steps, 5e-4)
            llm_base = {k: v.detach().clone() for k, v in llm.state_dict().items()}
            bases["llm"] = save_st(llm_base, work / "llm_base.safetensors")
        if "flux" in fams:
            from flux_family import build_flux, flux_base

            fx_base = flux_base(args.steps, train)
            bases["flux"] = save_st(fx_base, work / "flux_base.safetensors")

        def add_case(family: str, name: str, path: Path, flag: str, expect: str | None, group: str) -> None:
            cases.append(Case(family, name, path, flag, expect, group))

        for rep in range(args.replicates):
            if "sd" in fams:
                build_sd(work, rep, args.steps, sd_base, cases, flagged, refs["sd"])
            if "llm" in fams:
                build_llm(work, rep, args.steps, llm_base, cases, flagged, refs["llm"],
                          args.llama_cpp, args.llama_quantize)
            if "flux" in fams:
                build_flux(work, rep, args.steps, fx_base, add_case, flagged, refs["flux"],
                           train, save_st, write_gguf)
        # Each replicate's flagged fine-tune is an innocent sibling of the others': the
        # registry pass compares it with every flag, so the direct pass does too.
        for fam in sorted(fams):
            for rep in range(args.replicates if args.replicates > 1 else 0):
                other = (rep + 1) % args.replicates
                cases.append(Case(fam, f"{fam}{rep}:flagged F vs replicate {other}'s F",
                                  flagged[f"{fam}{rep}:F"], f"{fam}{other}:F", None,
                                  "another replicate's flagged fine-tune"))
                if f"{fam}{rep}:QK" in flagged:  # the llm family with --llama-cpp
                    cases.append(Case(fam, f"{fam}{rep}:flagged QK vs replicate {other}'s QK",
                                      flagged[f"{fam}{rep}:QK"], f"{fam}{other}:QK", None,
                                      "another replicate's flagged q/k-only fine-tune"))
        # Each family's references alternate: fine-tune, adapter, fine-tune, ...
        refs = {fam: v[: 2 * max(0, min(args.references, N_REFS))] for fam, v in refs.items()}
        # Unrelated models: the other family's uploads against each flagged item.
        for rep in range(args.replicates if {"sd", "llm"} <= fams else 0):
            cases.append(Case("x", f"x{rep}:llm F vs sd F", flagged[f"llm{rep}:F"], f"sd{rep}:F", None, "unrelated model"))
            cases.append(Case("x", f"x{rep}:sd F vs llm F", flagged[f"sd{rep}:F"], f"llm{rep}:F", None, "unrelated model"))
            cases.append(Case("x", f"x{rep}:sd L vs llm L", flagged[f"sd{rep}:L"], f"llm{rep}:L", None, "unrelated model"))
        built = time.perf_counter() - t0
        sketches: dict[Path, Sketch] = {}
        summaries: dict[Path, dict[str, str]] = {}

        def sk(p: Path) -> Sketch:
            if p not in sketches:
                fp = fingerprint_file(p)
                assert fp.sketch is not None
                sketches[p] = fp.sketch
                summaries[p] = fp.summary()
            return sketches[p]

        base_sk = {fam: sk(p) for fam, p in bases.items()}
        # Per family and flagged kind, the direction the references share (fine-tune
        # references for flagged fine-tunes, adapter references for flagged adapters).
        shared = {
            (fam, kind): shared_direction([s for p in refs[fam] if (s := sk(p)).kind == kind], base_sk[fam])
            for fam in bases for kind in ("model", "lora")
        }
        # ...and the thresholds those references calibrate (raised where they are
        # more alike than the fixed thresholds assume), as the registry does.
        cal = {
            (fam, kind): calibrated([s for p in refs[fam] if (s := sk(p)).kind == kind], base_sk[fam])
            for fam in bases for kind in ("model", "lora")
        }
        for (fam, kind), th in sorted(cal.items()):
            if th != THRESHOLDS:
                raised = {k: round(v, 3) for k, v in vars(th).items()
                          if isinstance(v, float) and v != getattr(THRESHOLDS, k)}
                raised.update({f"invariant.{k}": round(v, 3) for k, v in vars(th.invariant).items()
                               if isinstance(v, float) and v != getattr(THRESHOLDS.invariant, k)})
                print(f"thresholds calibrated on {fam}'s {kind} references: {raised}")
        stored: dict[str, Sketch] = {}
        for key, p in flagged.items():
            s = sk(p)
            fam = key.split(":")[0].rstrip("0123456789")
            stored[key] = delta_sketch(s, base_sk[fam])[0] if s.kind == "model" else s
            if s.kind == "model":  # the registry keeps the flag's invariant layer with it
                stored[key].invariant = s.invariant
        pairing(cases, sk, base_sk)
        rows = []
        for c in cases:
            fam = c.flagged.split(":")[0].rstrip("0123456789")
            up = sk(c.path)
            kind = "lora" if stored[c.flagged].kind == "lora" else "model"
            sh, th = shared[fam, kind], cal[fam, kind]
            cmp = compare(up, stored[c.flagged], base_sk[fam], base_name=f"{fam}-base", shared=sh,
                          thresholds=th)
            m = match(up, stored[c.flagged], base_sk[fam], base_name=f"{fam}-base", shared=sh,
                      thresholds=th)
            rows.append((c, cmp, m))
            if args.verbose:
                print(f"{c.name:55} -> {c.flagged:10} {m.match if m else '-':15} cos={cmp.cosine} z={cmp.z} coef={cmp.coefficient} n={cmp.tensors} bd={cmp.base_distance}")
        scored = time.perf_counter() - t0 - built
        n_refs = {fam: len(v) for fam, v in refs.items()}
        print(f"references (known-innocent derivatives, half fine-tunes, half adapters): {n_refs}")
        report(rows, args.replicates, built, scored, len(sketches), shared_removed=args.references >= THRESHOLDS.shared_min_samples)
        if not args.no_registry:
            registry_pass(work, bases, refs, flagged, cases, sk, summaries, rows, args.verbose)
    if args.invariant:
        from eval_invariant import run

        run(args.replicates, args.steps, [f for f in args.families if f in ("sd", "llm")])


def registry_pass(work: Path, bases: dict[str, Path], refs: dict[str, list[Path]],
                  flagged: dict[str, Path], cases: list[Case],
                  sk: Callable[[Path], Sketch], summaries: dict[Path, dict[str, str]],
                  rows: list[tuple[Case, object, object]], verbose: bool = False) -> None:
    """Every case again, through a registry: flag every flagged item in one SQLite
    registry (both bases and the references registered first), then check each upload with
    ``find_matches``, the retrieval and verification a check runs."""
    from modelhash.registry._db import make_engine, session_scope
    from modelhash.registry._migrations import upgrade
    from modelhash.registry.crud.bases import create_base
    from modelhash.registry.crud.flags import create_flag
    from modelhash.registry.crud.keys import CLI
    from modelhash.registry.crud.sketches import find_matches
    from modelhash.wire import BaseCreate, FlagCreate, encode_sketch

    url = f"sqlite:///{work / 'registry.db'}"
    upgrade(url)
    engine = make_engine(url)
    t0 = time.perf_counter()
    try:
        with session_scope(engine) as session:
            for fam, p in bases.items():
                create_base(session, data=BaseCreate(name=f"{fam}-base", fingerprint=summaries[p], sketch=encode_sketch(sk(p))), actor=CLI)
        for fam, paths in refs.items():
            for i, p in enumerate(paths):
                sketch = encode_sketch(sk(p))
                with session_scope(engine) as session:
                    create_base(session, data=BaseCreate(name=f"{fam}-reference-{i}", fingerprint=summaries[p], sketch=sketch), actor=CLI)
        ids: dict[str, str] = {}
        for key, p in flagged.items():
            with session_scope(engine) as session:
                flag, _ = create_flag(session, data=FlagCreate(category="other", fingerprint=summaries[p], sketch=encode_sketch(sk(p))), actor=CLI)
                ids[key] = flag.id
        names = {v: k for k, v in ids.items()}
        with session_scope(engine) as session:
            from sqlmodel import select

            from modelhash.registry.models import ReferenceBase as Base
            from modelhash.registry.models import SketchRow

            base_names = {b.id: b.name for b in session.exec(select(Base))}
            filed = {r.owner_id: (r.kind, base_names.get(r.base_id or "", "-"))
                     for r in session.exec(select(SketchRow).where(SketchRow.owner_type == "flag"))}
        print("\nflags filed as (kind, base): " + ", ".join(
            f"{names[f]}: {k} / {b}" for f, (k, b) in sorted(filed.items(), key=lambda x: names[x[0]])))
        direct = {id(c): m for c, _, m in rows}
        found = missed = false_pos = disagree = 0
        others: list[tuple[Case, str, str]] = []
        for c in cases:
            with session_scope(engine) as session:
                found_hits = find_matches(session, sk(c.path))
            hits = {h.flag_id: h.verdict.match for h in found_hits}
            evidence = {h.flag_id: h.verdict.evidence for h in found_hits}
            target = ids[c.flagged]
            m = direct[id(c)]
            if c.expect is not None:
                if hits.get(target) in c.expect.split("|"):
                    found += 1
                else:
                    missed += 1
                    print(f"  registry missed: {c.name} -> {c.flagged} (direct: {m.match if m else None})")  # type: ignore[attr-defined]
            elif target in hits:
                false_pos += 1
                print(f"  registry false positive: {c.name} -> {c.flagged} as {hits[target]}")
            if (target in hits) != (m is not None):
                disagree += 1
            others += [(c, names.get(f, f), t) for f, t in hits.items() if f != target]
            if verbose:
                for f, ev in evidence.items():
                    if f != target:
                        print(f"  other flag: {c.name} -> {names.get(f, f)} {hits[f]} {ev}")
        n_pos = sum(1 for c in cases if c.expect is not None)
        n_neg = len(cases) - n_pos
        print(f"\nregistry pass ({len(flagged)} flags, {len(bases)} bases, {sum(map(len, refs.values()))} references, SQLite, {time.perf_counter() - t0:.0f} s): "
              f"detected {found}/{n_pos} positives, {false_pos}/{n_neg} false positives, "
              f"{disagree} verdicts differ from the direct comparison")
        # F and FV (F with a replacement VAE) are one fine-tune: each matches the other's
        # derivatives, as it should. Anything else is listed.
        rep_of = lambda key: key.split(":")[0]  # noqa: E731
        kind_of = lambda key: key.split(":")[1]  # noqa: E731
        flagged_files = {p: k for k, p in flagged.items()}
        # The upload's own flag: the case's, or the flag whose file the upload is.
        own_flag = lambda c: flagged_files.get(c.path, c.flagged)  # noqa: E731
        same = [o for o in others if rep_of(o[1]) == rep_of(own_flag(o[0]))
                and {kind_of(o[1]), kind_of(own_flag(o[0]))} <= {"F", "FV"}
                and flagged_files.get(o[0].path) != o[1]]
        print(f"matches of another flag than the case's own: {len(others)}, of which {len(same)} "
              "are the same fine-tune flagged with and without its replacement VAE; the rest:")
        own = [o for o in others if flagged_files.get(o[0].path) == o[1]]
        if own:
            print(f"  ({len(own)} of them: the upload is itself the flagged file of that flag)")
        # A file scored as a negative against one flag may be a positive case of another
        # (F's conversions, scored against the q/k-only flag QK, are F's re-uploads).
        positive_of: dict[Path, set[str]] = defaultdict(set)
        for c in cases:
            if c.expect is not None:
                positive_of[c.path].add(c.flagged)
        also = [o for o in others if o[1] in positive_of[o[0].path] and o not in own]
        if also:
            print(f"  ({len(also)} of them: the upload is a positive case of that flag elsewhere)")
        for c, flag, kind in others:
            if (c, flag, kind) not in same and (c, flag, kind) not in own and (c, flag, kind) not in also:
                print(f"  {c.name} (case flag {c.flagged}) -> {flag} ({kind})")
    finally:
        engine.dispose()


def pairing(cases: list[Case], sk: Callable[[Path], Sketch], base_sk: dict[str, Sketch]) -> None:
    """Tensor-pairing coverage per family: the share of the base's sketched weight
    matrices that each checkpoint upload holds under the same canonical key and shape."""
    by_group: dict[tuple[str, str], list[float]] = defaultdict(list)
    for c in cases:
        fam = c.flagged.split(":")[0].rstrip("0123456789")
        up, base = sk(c.path), base_sk[fam]
        if up.kind != "model" or c.family != fam:
            continue
        same = sum(1 for k, t in base.tensors.items()
                   if k in up.tensors and up.tensors[k].shape == t.shape)
        by_group[fam, c.group].append(same / max(1, len(base.tensors)))
    print("\ntensor pairing (checkpoint uploads: share of the base's weight matrices under the same canonical key)")
    for (fam, group), shares in sorted(by_group.items()):
        print(f"  {fam:5} {group:60} min {min(shares):6.1%}  ({len(base_sk[fam].tensors)} matrices)")


def _fmt(xs: list[float], f: str = ".3f") -> str:
    if not xs:
        return "-"
    return f"{min(xs):{f}} / {statistics.median(xs):{f}} / {max(xs):{f}}"


def report(rows: list[tuple[Case, object, object]], reps: int, built: float, scored: float, n_files: int,
           shared_removed: bool) -> None:
    t = THRESHOLDS
    # With the references' shared direction removed, the lower thresholds apply.
    lora_cos = t.shared_lora_cosine if shared_removed else t.lora_cosine
    floor = t.shared_min_coefficient if shared_removed else t.min_coefficient
    pos: dict[str, list[tuple[Case, object, object]]] = defaultdict(list)
    neg: dict[str, list[tuple[Case, object, object]]] = defaultdict(list)
    for r in rows:
        (pos if r[0].expect else neg)[r[0].group].append(r)
    print(f"\nsketch evaluation: {reps} replicates per family, {n_files} files fingerprinted; "
          f"models built in {built:.0f} s, fingerprinted and scored in {scored:.0f} s\n")
    print("POSITIVES (must match)                               n  detected  type ok   cosine min/med/max       z min/med/max            coefficient min/med/max")
    all_pos_cos, all_pos_z = [], []
    for group, rs in pos.items():
        det = sum(1 for c, _, m in rs if m is not None)
        ok = sum(1 for c, _, m in rs if m is not None and m.match in (c.expect or "").split("|"))  # type: ignore[attr-defined]
        cos = [x.cosine for _, x, _ in rs if x.cosine is not None]  # type: ignore[attr-defined]
        z = [x.z for _, x, _ in rs if x.z is not None]  # type: ignore[attr-defined]
        coef = [x.coefficient for _, x, _ in rs if x.coefficient is not None]  # type: ignore[attr-defined]
        all_pos_cos += cos
        all_pos_z += z
        label = group
        print(f"{label:52} {len(rs):2}  {det / len(rs):7.0%}  {ok:3}/{len(rs):<3} {_fmt(cos):24} {_fmt(z, '.1f'):24} {_fmt(coef)}")
    print("\nNEGATIVES (must not match)                           n  false+   cosine max    z max     coefficient max")
    all_neg_cos, all_neg_z = [], []
    for group, rs in neg.items():
        fp = sum(1 for _, _, m in rs if m is not None)
        cos = [x.cosine for _, x, _ in rs if x.cosine is not None]  # type: ignore[attr-defined]
        z = [x.z for _, x, _ in rs if x.z is not None]  # type: ignore[attr-defined]
        coef = [x.coefficient for _, x, _ in rs if x.coefficient is not None]  # type: ignore[attr-defined]
        all_neg_cos += cos
        all_neg_z += z
        print(f"{group:52} {len(rs):2}  {fp / len(rs):6.0%}   {max(cos) if cos else float('nan'):9.3f}  {max(z) if z else float('nan'):8.1f}  {max(coef) if coef else float('nan'):9.3f}"
              + ("" if cos else "   (no delta: upload not derived from the base)"))
    n_pos = sum(len(v) for v in pos.values())
    n_det = sum(1 for rs in pos.values() for _, _, m in rs if m is not None)
    n_neg = sum(len(v) for v in neg.values())
    n_fp = sum(1 for rs in neg.values() for _, _, m in rs if m is not None)
    print(f"\nthresholds (fixed; where a family's references raised them, the calibrated values printed "
          f"above apply, and the margins below are the fixed thresholds'): z >= {t.z} and (delta cosine >= {t.cosine} with coefficient >= {floor} against a fine-tune, delta cosine >= {lora_cos} against an adapter, or cosine >= {t.carried_cosine} with coefficient in {t.carried_coefficient}); near-duplicate: cosine >= {t.near_cosine} "
          f"and coefficient in {t.near_coefficient}; without a base, raw distance <= {t.raw_distance}; "
          f"tensors align at raw cosine >= {t.pair_cosine}; uploads farther than {t.base_distance} from the base get no delta")
    print(f"detected {n_det}/{n_pos} positives, {n_fp}/{n_neg} false positives")
    neg_rows = [r for rs in neg.values() for r in rs if r[1].cosine is not None]  # type: ignore[attr-defined]
    pos_rows = [r for rs in pos.values() for r in rs if r[1].cosine is not None]  # type: ignore[attr-defined]
    if pos_rows and neg_rows:
        neg_cos = max(x.cosine for _, x, _ in neg_rows)  # type: ignore[attr-defined]
        by_cos = [x.cosine for c, x, _ in pos_rows if x.cosine >= t.cosine and not c.flagged.endswith((":L", ":LoHa", ":LoKr"))]  # type: ignore[attr-defined]
        carried = [x for _, x, _ in pos_rows if x.cosine < t.cosine]  # type: ignore[attr-defined]
        neg_floor = [x.coefficient for _, x, _ in neg_rows if x.cosine >= t.carried_cosine]  # type: ignore[attr-defined]
        neg_cos = max(x.cosine for c, x, _ in neg_rows if not c.flagged.endswith((":L", ":LoHa", ":LoKr")))  # type: ignore[attr-defined]
        print(f"cosine rule (fine-tune flags): lowest positive it catches {min(by_cos):.3f}, highest negative {neg_cos:.3f}, "
              f"threshold {t.cosine} (margin {t.cosine - neg_cos:+.3f} over the worst negative)")
        lora_pos = [x.cosine for c, x, _ in pos_rows if c.flagged.endswith((":L", ":LoHa", ":LoKr")) and x.cosine >= lora_cos]  # type: ignore[attr-defined]
        lora_neg = [x.cosine for c, x, _ in neg_rows if c.flagged.endswith((":L", ":LoHa", ":LoKr"))]  # type: ignore[attr-defined]
        if lora_pos and lora_neg:
            print(f"adapter flags: lowest positive cosine the cosine rule catches {min(lora_pos):.3f}, highest negative "
                  f"{max(lora_neg):.3f}, threshold {lora_cos} (margin {lora_cos - max(lora_neg):+.3f})")
        # Against fine-tunes the cosine rule also needs the coefficient floor.
        ft_pos = [x.coefficient for c, x, _ in pos_rows if c.flagged.endswith(":F") and x.cosine >= t.cosine]  # type: ignore[attr-defined]
        ft_neg = [x.coefficient for c, x, _ in neg_rows if c.flagged.endswith(":F") and x.cosine >= t.cosine]  # type: ignore[attr-defined]
        ft_neg_all = [x.coefficient for c, x, _ in neg_rows if c.flagged.endswith(":F")]  # type: ignore[attr-defined]
        if ft_pos:
            print(f"coefficient floor (fine-tune flags): lowest positive coefficient the cosine rule catches "
                  f"{min(ft_pos):.3f}, highest negative coefficient {max(ft_neg_all, default=float('nan')):.3f} "
                  f"({len(ft_neg)} negatives pass the cosine threshold, up to coefficient "
                  f"{max(ft_neg, default=float('nan')):.3f}), floor {floor}")
        if carried:
            lo, hi = t.carried_coefficient
            print(f"carried rule (cosine >= {t.carried_cosine}, coefficient in [{lo}, {hi}]): catches {len(carried)} positives "
                  f"at cosine {min(x.cosine for x in carried):.3f}..{max(x.cosine for x in carried):.3f}, coefficient "
                  f"{min(x.coefficient for x in carried):.3f}..{max(x.coefficient for x in carried):.3f}; negatives above the cosine floor "
                  f"reach coefficient {max(neg_floor, default=0.0):.3f} (margin {lo - max(neg_floor, default=0.0):+.3f})")
        print(f"z: lowest positive {min(all_pos_z):.1f}, highest negative {max(all_neg_z):.1f}, threshold {t.z} "
              "(z guards against sketch noise; siblings are genuinely correlated, so z does not separate them)")

if __name__ == "__main__":
    main()
