"""How many bytes the sketch layer stores per model, measured on real layer shapes.

Builds the tensor shapes of real architectures on torch's ``meta`` device (no
weights are allocated or downloaded), fills them with random fp16 values, writes
one safetensors file per model, fingerprints it with every layer and prints the
stored sketch size (``Sketch.to_bytes()``, what the registry keeps per flag or
base) next to the file size.

    python benchmarks/sketch_size.py [--models sd15,sdxl-unet,llama-1b]
    python benchmarks/sketch_size.py --invariant-plan   # shapes only, no files

``--invariant-plan`` prints, from the shapes alone, which matrices the invariant
layer measures, its stored bytes and the multiply-adds it spends.

Needs torch, diffusers and transformers (for the shapes only) and about 2x the
largest model's fp16 size in free memory and temporary disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelhash.fingerprint import fingerprint_file


def sd15() -> dict[str, tuple[int, ...]]:
    """Stable Diffusion 1.5: UNet, CLIP ViT-L/14 text encoder and VAE, as one checkpoint."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
        ))
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, layers_per_block=2,
        )
    out: dict[str, tuple[int, ...]] = {}
    for prefix, m in (("unet", unet), ("text_encoder", te), ("vae", vae)):
        out.update({f"{prefix}.{k}": tuple(v.shape) for k, v in m.state_dict().items()})
    return out


def sdxl_unet() -> dict[str, tuple[int, ...]]:
    """The SDXL base UNet (2.6 B parameters)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def llama_1b() -> dict[str, tuple[int, ...]]:
    """A Llama-3.2-1B-shaped language model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
            tie_word_embeddings=True,
        ))
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


MODELS: dict[str, Callable[[], dict[str, tuple[int, ...]]]] = {
    "sd15": sd15, "sdxl-unet": sdxl_unet, "llama-1b": llama_1b,
}


def invariant_plan(name: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """The invariant layer's selection for one architecture, as one file of it."""
    from modelhash.fingerprint._invariant import TOP, Candidate, Spectra, Spectrum, select
    from modelhash.fingerprint._keys import module_key, tensor_module
    from modelhash.fingerprint._layouts import pieces
    from modelhash.fingerprint._project import matrix_shape

    cands: list[Candidate] = []
    elements = 0
    for k, shape in shapes.items():
        mn = matrix_shape(shape)
        if mn is None:
            continue
        elements += mn[0] * mn[1]
        for p in pieces(module_key(tensor_module(k)), *mn):
            cands.append(Candidate(p.key, p.rows, mn[1]))
    chosen = select(cands, elements)
    rng = np.random.default_rng(0)
    spectra = Spectra({u.key: Spectrum(u.key, u.shape,
                                       np.sort(rng.random(min(TOP, *u.shape)))[::-1])
                       for u in chosen})
    products = sum(1 for u in chosen if u.b is not None)
    macs = sum(u.cost for u in chosen)
    section = spectra.to_section()
    print(f"{name:12} {len(cands):6} matrices, {len(chosen):4} spectra ({products} products), "
          f"{len(section) / 1024:6.1f} KB ({len(zlib.compress(section, 6)) / 1024:5.1f} KB "
          "compressed) added to the sketch blob, "
          f"{macs / 1e9:6.2f} G multiply-adds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd15,llama-1b")
    ap.add_argument("--invariant-plan", action="store_true",
                    help="print the invariant layer's selection from the shapes only")
    args = ap.parse_args()
    if args.invariant_plan:
        for name in args.models.split(","):
            invariant_plan(name, MODELS[name]())
        return
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    print(f"{'model':12} {'params':>8} {'file MB':>8} {'tensors':>8} {'sketched':>9} "
          f"{'sketch KB':>10} {'per tensor B':>13} {'fingerprint s':>14}")
    for name in args.models.split(","):
        shapes = MODELS[name]()
        sd = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16) for k, s in shapes.items()}
        params = sum(int(np.prod(s)) for s in shapes.values())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.safetensors"
            save_file(sd, str(path))
            del sd
            t = time.perf_counter()
            fp = fingerprint_file(path)
            took = time.perf_counter() - t
            assert fp.sketch is not None
            blob = fp.sketch.to_bytes()
            print(f"{name:12} {params / 1e9:7.2f}B {path.stat().st_size / 1e6:8.0f} {len(shapes):8} "
                  f"{len(fp.sketch):9} {len(blob) / 1024:10.0f} {len(blob) / max(1, len(fp.sketch)):13.0f} {took:14.1f}")


if __name__ == "__main__":
    main()
