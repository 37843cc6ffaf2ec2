"""SD 1.x and SDXL: diffusers pipelines and their single-file originals give one sketch.

Fixtures under tests/fixtures/sd/ were written by tests/fixtures/make_sd_layouts.py:
diffusers' own ``convert_diffusers_to_original_stable_diffusion.py`` and
``convert_diffusers_to_original_sdxl.py`` made the original files (ldm UNet, ldm
autoencoder with its up blocks numbered the other way, OpenCLIP's fused
``in_proj_weight``), and diffusers' single-file loader maps them back exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._keys import module_key
from modelhash.fingerprint._similarity import match
from modelhash.fingerprint._sketch import Sketch

SD = Path(__file__).resolve().parents[1] / "fixtures" / "sd"
KINDS = ["sd15", "sdxl"]
TRANSPOSED = {"te2:text_projection"}
"""OpenCLIP stores its projection transposed: it is sketched with the two sides'
signs swapped, so it equals the Linear's sketch up to float32 summation order."""


@pytest.fixture(scope="module")
def sketches() -> dict[str, Sketch]:
    out: dict[str, Sketch] = {}
    for kind in KINDS:
        for p in [SD / kind / "diffusers", *sorted((SD / kind).glob("*.safetensors"))]:
            sketch = fingerprint_file(p).sketch
            assert sketch is not None
            out[f"{kind}/{p.stem}"] = sketch
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_and_original_files_sketch_the_same(sketches: dict[str, Sketch], kind: str) -> None:
    ours, original = sketches[f"{kind}/diffusers"], sketches[f"{kind}/original"]
    assert set(original.tensors) == set(ours.tensors)
    for k, t in ours.tensors.items():
        assert original.tensors[k].shape == t.shape, k
        if k in TRANSPOSED:
            scale = float(np.abs(t.values).max())
            np.testing.assert_allclose(original.tensors[k].values, t.values, atol=1e-5 * scale)
            continue
        np.testing.assert_allclose(original.tensors[k].values, t.values, rtol=1e-9, atol=1e-9)
    components = {k.partition(":")[0] for k in ours.tensors}
    assert components == ({"unet", "te1", "vae"} if kind == "sd15" else {"unet", "te1", "te2"})
    m = match(original, ours)
    assert m is not None and m.match == "near-duplicate"


def test_openclip_fused_attention_is_split_into_q_k_v(sketches: dict[str, Sketch]) -> None:
    original = sketches["sdxl/original"]
    for layer in range(2):
        for x in "qkv":
            assert f"te2:encoder_layers_{layer}_self_attn_{x}_proj" in original.tensors
    assert not any(k.endswith("_qkv") for k in original.tensors)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lora", ["lora_kohya", "other_kohya"])
def test_kohya_lora_lines_up_with_both_layouts(
    sketches: dict[str, Sketch], kind: str, lora: str
) -> None:
    adapter = sketches[f"{kind}/{lora}"]
    assert len(adapter.tensors) > 0
    for layout in ("diffusers", "original"):
        checkpoint = sketches[f"{kind}/{layout}"]
        missing = [k for k in adapter.tensors if k not in checkpoint.tensors]
        assert not missing, missing[:5]
    # SDXL LoRAs name UNet modules by sgm blocks, SD 1.x ones by diffusers blocks.
    with (SD / kind / f"{lora}.safetensors").open("rb") as f:
        header = f.read(1 << 16)
    assert (b"lora_unet_input_blocks_" in header) == (kind == "sdxl")


@pytest.mark.parametrize("base", ["diffusers", "original"])
def test_sgm_named_lora_baked_into_an_original_checkpoint_is_found(
    sketches: dict[str, Sketch], base: str
) -> None:
    ref = sketches[f"sdxl/{base}"]
    m = match(sketches["sdxl/baked_original"], sketches["sdxl/lora_kohya"], ref)
    assert m is not None and m.match == "lora-baked"
    assert m.evidence["tensors_compared"] == len(sketches["sdxl/lora_kohya"])
    assert match(sketches["sdxl/baked_original"], sketches["sdxl/other_kohya"], ref) is None


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("first_stage_model.decoder.up.0.block.1.conv2", "vae:decoder_up_blocks_3_resnets_1_conv2"),
        ("first_stage_model.decoder.up.3.upsample.conv", "vae:decoder_up_blocks_0_upsamplers_0_conv"),
        ("first_stage_model.encoder.down.1.block.0.nin_shortcut",
         "vae:encoder_down_blocks_1_resnets_0_conv_shortcut"),
        ("first_stage_model.encoder.mid.attn_1.proj_out", "vae:encoder_mid_block_attentions_0_to_out_0"),
        ("first_stage_model.decoder.mid.block_2.conv1", "vae:decoder_mid_block_resnets_1_conv1"),
        ("vae.decoder.mid_block.attentions.0.query", "vae:decoder_mid_block_attentions_0_to_q"),
        ("vae/encoder.down_blocks.1.resnets.0.conv1", "vae:encoder_down_blocks_1_resnets_0_conv1"),
        ("cond_stage_model.model.transformer.resblocks.5.mlp.c_fc", "te1:encoder_layers_5_mlp_fc1"),
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
         "te2:encoder_layers_0_self_attn_qkv"),
        ("conditioner.embedders.1.model.positional_embedding", "te2:embeddings_position_embedding"),
        ("text_encoder_2.text_model.embeddings.position_embedding", "te2:embeddings_position_embedding"),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "te2:encoder_layers_0_mlp_fc1"),
    ],
)
def test_original_sd_names_map_to_diffusers(name: str, key: str) -> None:
    assert module_key(name) == key


def test_a_transposed_projection_sketches_as_its_linear_whatever_its_shape(tmp_path: Path) -> None:
    """OpenCLIP's ``text_projection`` P (width x projection) is the Linear weight Pᵀ of
    transformers' CLIPTextModelWithProjection: non-square here, so the two sides'
    signs must really be swapped; a LoRA on it (ΔP = up · down) is ΔPᵀ = downᵀ · upᵀ."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(8)
    p = rng.standard_normal((48, 20)).astype(np.float32)
    save_file({"conditioner.embedders.1.model.text_projection": p}, str(tmp_path / "o.safetensors"))
    save_file({"text_encoder_2.text_projection.weight": np.ascontiguousarray(p.T)},
              str(tmp_path / "d.safetensors"))
    a = fingerprint_file(tmp_path / "o.safetensors").sketch
    b = fingerprint_file(tmp_path / "d.safetensors").sketch
    assert a is not None and b is not None
    assert set(a.tensors) == set(b.tensors) == {"te2:text_projection"}
    ta, tb = a.tensors["te2:text_projection"], b.tensors["te2:text_projection"]
    assert ta.shape == tb.shape == (20, 48)
    np.testing.assert_allclose(ta.values, tb.values, atol=1e-5 * float(np.abs(tb.values).max()))
    assert a.invariant is not None and b.invariant is not None
    np.testing.assert_allclose(a.invariant.items["te2:text_projection"].values,
                               b.invariant.items["te2:text_projection"].values, rtol=1e-9)
    # An adapter on it: the factors swap, so ΔW = ΔPᵀ under the Linear's key.
    from modelhash.fingerprint._layouts import split_adapter

    up, down = rng.standard_normal((48, 4)), rng.standard_normal((4, 20))
    key = module_key("conditioner.embedders.1.model.text_projection")
    ((k, f),) = split_adapter(key, {"up": up, "down": down})
    assert k == "te2:text_projection"
    np.testing.assert_allclose(f["up"] @ f["down"], (up @ down).T)
