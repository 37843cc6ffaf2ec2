"""An autoencoder saved alone lines up with the ``vae`` of a full checkpoint.

A standalone VAE file (``vae-ft-mse-840000-ema-pruned.safetensors`` in the original
ldm names, a diffusers ``vae/diffusion_pytorch_model.safetensors``) has no component
prefix; its first words (``encoder.down.0.block``, ``decoder.up_blocks``,
``quant_conv``...) say it is an autoencoder. The same words must not claim the
names of any other family: real key lists from the fixtures (SD, SDXL, Flux, SD3,
Llama, CLIP) and from tests/fixtures/make_key_lists.py (T5, BART, Whisper, CLIP
vision, which all have ``encoder.``/``decoder.`` names) keep their components.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._keys import module_key, tensor_module
from modelhash.fingerprint._project import matrix_shape
from modelhash.fingerprint._sketch import Sketch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SD15 = FIXTURES / "sd" / "sd15"
LDM_PREFIX = "first_stage_model."


def names(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes of a safetensors file (its header) or a key list."""
    if path.suffix == ".json":
        out: dict[str, list[int]] = json.loads(path.read_text())
        return out
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {k: v["shape"] for k, v in header.items()}


def component(name: str) -> str:
    return module_key(tensor_module(name)).partition(":")[0]


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sd15 autoencoder saved alone: in ldm names (the single file's tensors
    without their ``first_stage_model.`` prefix, as a VAE extracted from it is
    saved) and in diffusers names (the pipeline's ``vae`` file, away from its folder)."""
    d = tmp_path_factory.mktemp("vae")
    original = load_file(str(SD15 / "original.safetensors"))
    ldm = {k.removeprefix(LDM_PREFIX): v for k, v in original.items() if k.startswith(LDM_PREFIX)}
    save_file(ldm, str(d / "vae_ldm.safetensors"))
    shutil.copy(SD15 / "diffusers" / "vae" / "diffusion_pytorch_model.safetensors", d / "vae_diffusers.safetensors")
    return {"ldm": d / "vae_ldm.safetensors", "diffusers": d / "vae_diffusers.safetensors"}


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
@pytest.mark.parametrize("full", ["original.safetensors", "diffusers"])
def test_a_bare_vae_pairs_fully_with_a_checkpoints_vae(bare: dict[str, Path], layout: str, full: str) -> None:
    alone = fingerprint_file(bare[layout]).sketch
    checkpoint = fingerprint_file(SD15 / full).sketch
    assert isinstance(alone, Sketch) and isinstance(checkpoint, Sketch)
    vae = {k: t for k, t in checkpoint.tensors.items() if k.startswith("vae:")}
    stored = [k for k, shape in names(bare[layout]).items() if matrix_shape(shape) is not None]
    # Every weight matrix of the file is sketched, each under its own vae: key...
    assert len(alone) == len(stored) == 40
    assert all(k.startswith("vae:") for k in alone.tensors)
    # ...and each pairs with the checkpoint's: 100% both ways, same sketch.
    assert set(alone.tensors) == set(vae)
    for k, t in vae.items():
        np.testing.assert_allclose(alone.tensors[k].values, t.values, rtol=1e-9, atol=1e-9, err_msg=k)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("encoder.down.0.block.0.conv1", "vae:encoder_down_blocks_0_resnets_0_conv1"),
        ("decoder.up.3.block.2.nin_shortcut", "vae:decoder_up_blocks_0_resnets_2_conv_shortcut"),
        ("decoder.up.1.upsample.conv", "vae:decoder_up_blocks_2_upsamplers_0_conv"),
        ("encoder.mid.attn_1.q", "vae:encoder_mid_block_attentions_0_to_q"),
        ("decoder.mid.block_2.conv1", "vae:decoder_mid_block_resnets_1_conv1"),
        ("encoder.norm_out", "vae:encoder_conv_norm_out"),
        ("quant_conv", "vae:quant_conv"),
        ("post_quant_conv", "vae:post_quant_conv"),
        ("decoder.up_blocks.0.resnets.0.conv1", "vae:decoder_up_blocks_0_resnets_0_conv1"),
        ("encoder.mid_block.attentions.0.query", "vae:encoder_mid_block_attentions_0_to_q"),
        ("decoder.conv_in", "vae:decoder_conv_in"),
        # not an autoencoder's: T5, BART / Whisper, a bare CLIP text model, Whisper's stem
        ("encoder.block.0.layer.0.SelfAttention.q", ":encoder_block_0_layer_0_selfattention_q"),
        ("decoder.block.1.layer.1.EncDecAttention.o", ":decoder_block_1_layer_1_encdecattention_o"),
        ("encoder.final_layer_norm", ":encoder_final_layer_norm"),
        ("decoder.layers.0.fc1", ":decoder_layers_0_fc1"),
        ("encoder.layers.0.mlp.fc1", "te1:encoder_layers_0_mlp_fc1"),
        ("encoder.conv1", ":encoder_conv1"),
        ("final_layer_norm", "te1:final_layer_norm"),
    ],
)
def test_autoencoder_words_and_their_neighbours(name: str, key: str) -> None:
    assert module_key(name) == key


BARE_FILES = {
    # files without component prefixes, and the components their names get
    "flux/base_bfl.safetensors": {"unet"},
    "flux/base_diffusers.safetensors": {"unet"},
    "flux/flagged_peft_bare.safetensors": {"unet"},
    "flux/xlabs.safetensors": {"unet"},
    "sd3/sd3/base_diffusers.safetensors": {"unet"},
    "sd3/sd3/tune_original.safetensors": {"unet"},
    "sd3/sd35/tune_original.safetensors": {"unet"},
    "sd3/sd35/flagged_lycoris.safetensors": {"unet"},
    "sd/sd15/diffusers/unet/diffusion_pytorch_model.safetensors": {"unet"},
    "sd/sd15/diffusers/text_encoder/model.safetensors": {"te1"},
    "sd/sdxl/diffusers/text_encoder/model.safetensors": {"te1"},
    "sd/sdxl/diffusers/text_encoder_2/model.safetensors": {"te1", ""},  # text_projection
    "llama/base_hf.safetensors": {""},
    "torch/model.safetensors": {""},
    "embeddings/emb.safetensors": {""},
    "keys/t5_encoder.json": {""},
    "keys/t5.json": {""},
    "keys/bart.json": {"te1", ""},  # its encoder's layers read as a text encoder's
    "keys/whisper.json": {"te1", ""},
    "keys/clip_vision.json": {"te1", ""},
}


@pytest.mark.parametrize(("path", "expected"), sorted(BARE_FILES.items()))
def test_other_families_keep_their_components(path: str, expected: set[str]) -> None:
    keys = names(FIXTURES / path)
    assert keys
    assert {component(k) for k in keys} == expected


def test_only_autoencoder_names_are_vae_in_any_fixture() -> None:
    files = [*FIXTURES.rglob("*.safetensors"), *(FIXTURES / "keys").glob("*.json")]
    assert len(files) > 50
    for path in files:
        alone = path.parent.name == "vae"  # the diffusers pipeline's autoencoder file
        for k in names(path):
            is_vae = component(k) == "vae"
            assert is_vae == (alone or k.startswith((LDM_PREFIX, "vae.", "vae/"))), (path, k)
