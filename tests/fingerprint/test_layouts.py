"""The layout layer: every convention of a family gives the same canonical tensors.

Fixtures under tests/fixtures/flux/ were written by tests/fixtures/make_flux_layouts.py
with diffusers' own converters (BFL checkpoint <-> diffusers; kohya BFL-named LoRA ->
ai-toolkit / PEFT names; XLabs LoRA -> diffusers names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._keys import module_key
from modelhash.fingerprint._layouts import RENAMES, SPLITS, Piece, pieces, split_adapter
from modelhash.fingerprint._similarity import match
from modelhash.fingerprint._sketch import Sketch

FLUX = Path(__file__).resolve().parents[1] / "fixtures" / "flux"


@pytest.fixture(scope="module")
def flux() -> dict[str, Sketch]:
    out: dict[str, Sketch] = {}
    for p in sorted(FLUX.glob("*.safetensors")):
        sketch = fingerprint_file(p).sketch
        assert sketch is not None
        out[p.stem] = sketch
    return out


def same(a: Sketch, b: Sketch) -> None:
    assert set(a.tensors) == set(b.tensors)
    for k, t in a.tensors.items():
        assert t.shape == b.tensors[k].shape, k
        np.testing.assert_allclose(t.values, b.tensors[k].values, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["base_bfl", "base_comfy"])
def test_flux_checkpoints_pair_fully_across_layouts(flux: dict[str, Sketch], layout: str) -> None:
    # 30 weight matrices: every one, including the fused qkv, linear1 and final AdaLN.
    assert len(flux["base_diffusers"]) == 30
    same(flux[layout], flux["base_diffusers"])


@pytest.mark.parametrize("tag", ["flagged", "other"])
@pytest.mark.parametrize("layout", ["comfy", "aitoolkit", "peft_bare"])
def test_flux_loras_sketch_the_same_in_every_layout(
    flux: dict[str, Sketch], tag: str, layout: str
) -> None:
    same(flux[f"{tag}_{layout}"], flux[f"{tag}_kohya"])


def test_xlabs_lora_matches_its_diffusers_conversion(flux: dict[str, Sketch]) -> None:
    assert len(flux["xlabs"]) == 8
    same(flux["xlabs"], flux["xlabs_diffusers"])


@pytest.mark.parametrize("flagged", ["flagged_kohya", "flagged_aitoolkit", "flagged_peft_bare"])
def test_fused_lora_baked_into_a_bfl_checkpoint_is_found(
    flux: dict[str, Sketch], flagged: str
) -> None:
    base = flux["base_diffusers"]
    m = match(flux["flagged_baked_bfl"], flux[flagged], base)
    assert m is not None and m.match == "lora-baked"
    assert m.evidence["tensors_compared"] == len(flux[flagged])
    assert match(flux["other_baked_bfl"], flux[flagged], base) is None


@pytest.mark.parametrize("upload", ["other_kohya", "other_comfy", "other_aitoolkit", "other_peft_bare"])
def test_other_loras_stay_clean_in_every_layout(flux: dict[str, Sketch], upload: str) -> None:
    for flagged in ("flagged_kohya", "flagged_comfy", "flagged_aitoolkit", "flagged_peft_bare"):
        assert match(flux[upload], flux[flagged], flux["base_diffusers"]) is None


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("transformer_blocks.0.attn.to_q", "unet:transformer_blocks_0_attn_to_q"),
        ("single_transformer_blocks.1.proj_mlp", "unet:single_transformer_blocks_1_proj_mlp"),
        ("x_embedder", "unet:x_embedder"),
        ("img_in", "unet:x_embedder"),
        ("double_blocks.2.img_attn.qkv", "unet:transformer_blocks_2_attn_to_qkv"),
        ("lora_unet_double_blocks_2_txt_attn_qkv", "unet:transformer_blocks_2_attn_to_added_qkv"),
        ("lora_unet_single_blocks_0_linear2", "unet:single_transformer_blocks_0_proj_out"),
        ("model.diffusion_model.final_layer.linear", "unet:proj_out"),
        ("joint_blocks.0.x_block.mlp.fc1", "unet:transformer_blocks_0_ff_net_0_proj"),
        ("model.diffusion_model.joint_blocks.3.context_block.attn.qkv",
         "unet:transformer_blocks_3_attn_to_added_qkv"),
        ("blk.0.ffn_down", ":layers_0_mlp_down_proj"),
        ("token_embd", ":embed_tokens"),
        ("model.embed_tokens", ":embed_tokens"),
    ],
)
def test_keys_of_every_family_get_their_component(name: str, key: str) -> None:
    assert module_key(name) == key


def test_splits_follow_the_shape() -> None:
    q, k, v, mlp = pieces("unet:single_transformer_blocks_0_attn_to_qkv_mlp", 7 * 16, 16)
    assert [p.key for p in (q, k, v, mlp)] == [
        "unet:single_transformer_blocks_0_attn_to_q",
        "unet:single_transformer_blocks_0_attn_to_k",
        "unet:single_transformer_blocks_0_attn_to_v",
        "unet:single_transformer_blocks_0_proj_mlp",
    ]
    assert [(p.start, p.count, p.rows) for p in (q, k, v, mlp)] == [
        (0, 16, 16), (16, 16, 16), (32, 16, 16), (48, 64, 64)
    ]
    shift, scale = pieces("unet:norm_out_linear_shift_scale", 64, 16)
    assert (shift.key, shift.start, shift.at) == ("unet:norm_out_linear", 0, 32)
    assert (scale.key, scale.start, scale.at) == ("unet:norm_out_linear", 32, 0)


def test_a_fused_key_that_does_not_fit_its_split_stays_whole() -> None:
    assert pieces("unet:transformer_blocks_0_attn_to_qkv", 32, 16) == [
        Piece("unet:transformer_blocks_0_attn_to_qkv", 32, 0, 32)
    ]
    assert pieces("unet:transformer_blocks_0_attn_to_qkv_mlp", 40, 16) == [
        Piece("unet:transformer_blocks_0_attn_to_qkv_mlp", 40, 0, 40)
    ]


def test_sd3_last_context_block_swaps_only_when_it_has_two_chunks() -> None:
    key = module_key("joint_blocks.5.context_block.adaLN_modulation.1")
    (whole,) = pieces(key, 6 * 16, 16)
    assert whole.key == "unet:transformer_blocks_5_norm1_context_linear" and whole.order is None
    first, second = pieces(key, 2 * 16, 16)
    assert (first.at, second.at) == (16, 0)


def test_fused_lora_up_is_split_by_rows() -> None:
    rng = np.random.default_rng(0)
    up, down = rng.standard_normal((48, 2)), rng.standard_normal((2, 16))
    parts = dict(split_adapter("unet:transformer_blocks_0_attn_to_qkv", {"up": up, "down": down}))
    assert list(parts) == [f"unet:transformer_blocks_0_attn_to_{x}" for x in "qkv"]
    for i, x in enumerate("qkv"):
        np.testing.assert_array_equal(parts[f"unet:transformer_blocks_0_attn_to_{x}"]["up"],
                                      up[16 * i : 16 * (i + 1)])


def test_every_table_row_cites_its_source() -> None:
    assert all(r.source for r in RENAMES) and all(s.source for s in SPLITS)


def test_xlabs_lora_is_described_as_a_flux_lora() -> None:
    m = fingerprint_file(FLUX / "xlabs.safetensors").model
    assert (m.kind, m.flavour, m.architecture) == ("lora", "xlabs", "flux")
    m = fingerprint_file(FLUX / "base_bfl.safetensors").model
    assert (m.kind, m.architecture) == ("checkpoint", "flux")
