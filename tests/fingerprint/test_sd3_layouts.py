"""SD3 / SD3.5: diffusers and Stability (ComfyUI) layouts and every LoRA form give one sketch.

Fixtures under tests/fixtures/sd3/ were written by tests/fixtures/make_sd3_layouts.py:
tiny ``SD3Transformer2DModel``s (``sd3``: SD3 medium's shape; ``sd35``: SD3.5
medium's, with RMS qk norms and a second attention, ``attn2``), their Stability form
checked to convert back exactly through diffusers' own
``convert_sd3_transformer_checkpoint_to_diffusers`` and ``from_single_file``, and one
LoRA written as kohya sd-scripts, ComfyUI, diffusers, PEFT, OneTrainer and SimpleTuner
LyCORIS save it, the twins checked by merging (kohya baked and converted by diffusers
equals the diffusers LoRA fused by diffusers).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._keys import module_key
from modelhash.fingerprint._project import matrix_shape
from modelhash.fingerprint._similarity import match
from modelhash.fingerprint._sketch import Sketch

SD3 = Path(__file__).resolve().parents[1] / "fixtures" / "sd3"
KINDS = ["sd3", "sd35"]
FORMS = ["comfy", "diffusers", "peft_bare", "onetrainer", "lycoris"]


@pytest.fixture(scope="module")
def sk() -> dict[str, Sketch]:
    out: dict[str, Sketch] = {}
    for kind in KINDS:
        for p in sorted((SD3 / kind).glob("*.safetensors")):
            sketch = fingerprint_file(p).sketch
            assert sketch is not None
            out[f"{kind}/{p.stem}"] = sketch
    return out


def header(path: Path) -> dict[str, dict[str, object]]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        out: dict[str, dict[str, object]] = json.loads(f.read(size))
    out.pop("__metadata__", None)
    return out


def matrices(path: Path) -> list[str]:
    """The tensors of a file that are weight matrices (what the sketch layer keeps)."""
    return [k for k, v in header(path).items() if matrix_shape(v["shape"]) is not None]  # type: ignore[arg-type]


def same(a: Sketch, b: Sketch) -> None:
    """Same canonical keys, same sketches (up to float32 summation order: a split or
    swapped matrix is projected in row blocks)."""
    assert set(a.tensors) == set(b.tensors), sorted(set(a.tensors) ^ set(b.tensors))[:6]
    for k, t in a.tensors.items():
        assert t.shape == b.tensors[k].shape, k
        peak = float(np.abs(t.values).max())
        np.testing.assert_allclose(b.tensors[k].values, t.values, rtol=0, atol=1e-6 * peak, err_msg=k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", ["base", "tune"])
def test_every_weight_matrix_pairs_across_layouts(sk: dict[str, Sketch], kind: str, model: str) -> None:
    original = "base_comfy" if model == "base" else "tune_original"
    ours, theirs = sk[f"{kind}/{model}_diffusers"], sk[f"{kind}/{original}"]
    # Every matrix of the diffusers file is sketched under a key of its own...
    assert len(ours) == len(matrices(SD3 / kind / f"{model}_diffusers.safetensors"))
    # ...and the Stability file gives each one the same sketch (100% paired).
    same(ours, theirs)
    # Fewer stored matrices there: q, k and v are one fused matrix.
    assert len(matrices(SD3 / kind / f"{original}.safetensors")) < len(ours)


def test_the_tiny_configs_have_what_they_stand_for(sk: dict[str, Sketch]) -> None:
    sd35 = header(SD3 / "sd35" / "base_comfy.safetensors")
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in sd35
    assert "model.diffusion_model.joint_blocks.1.context_block.attn.ln_q.weight" in sd35
    assert {f"unet:transformer_blocks_0_attn2_to_{x}" for x in "qkv"} <= set(sk["sd35/base_diffusers"].tensors)
    assert sk["sd35/base_diffusers"].tensors["unet:transformer_blocks_0_norm1_linear"].shape == (144, 16)
    sd3 = header(SD3 / "sd3" / "base_comfy.safetensors")
    assert not any("attn2" in k or "ln_q" in k for k in sd3)
    # The last block's context AdaLN is (shift, scale) there, (scale, shift) in diffusers.
    for kind in KINDS:
        assert sk[f"{kind}/base_diffusers"].tensors[
            "unet:transformer_blocks_1_norm1_context_linear"].shape == (32, 16)
        assert "unet:transformer_blocks_1_attn_to_add_out" not in sk[f"{kind}/base_diffusers"].tensors


@pytest.mark.parametrize("kind", KINDS)
def test_layouts_match_as_near_duplicates(sk: dict[str, Sketch], kind: str) -> None:
    for a, b in (("base_comfy", "base_diffusers"), ("tune_diffusers", "tune_original")):
        m = match(sk[f"{kind}/{a}"], sk[f"{kind}/{b}"])
        assert m is not None and m.match == "near-duplicate", (a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base", ["base_diffusers", "base_comfy"])
def test_a_fine_tune_is_found_in_the_other_layout(sk: dict[str, Sketch], kind: str, base: str) -> None:
    for upload, flagged in (("tune_original", "tune_diffusers"), ("tune_diffusers", "tune_original")):
        m = match(sk[f"{kind}/{upload}"], sk[f"{kind}/{flagged}"], sk[f"{kind}/{base}"])
        assert m is not None and m.match == "near-duplicate", (upload, flagged)
        assert m.evidence["tensors_compared"] == len(sk[f"{kind}/{flagged}"])


def test_a_merge_in_stability_names_is_derived_from_the_diffusers_fine_tune(
    sk: dict[str, Sketch], tmp_path: Path
) -> None:
    tune, other = (load_file(str(SD3 / "sd3" / f"{n}_original.safetensors")) for n in ("tune", "other"))
    merged = {k: ((v.astype(np.float32) + other[k]) / 2).astype(np.float16) for k, v in tune.items()}
    save_file(merged, str(tmp_path / "merge.safetensors"))
    upload = fingerprint_file(tmp_path / "merge.safetensors").sketch
    assert upload is not None
    m = match(upload, sk["sd3/tune_diffusers"], sk["sd3/base_diffusers"])
    assert m is not None and m.match == "derived"
    assert 0.3 < m.evidence["coefficient"] < 0.7


def test_a_sibling_fine_tune_or_another_model_is_not_found(sk: dict[str, Sketch]) -> None:
    for base in ("base_diffusers", "base_comfy"):
        assert match(sk["sd3/other_original"], sk["sd3/tune_diffusers"], sk[f"sd3/{base}"]) is None
        assert match(sk["sd3/sibling_comfy"], sk["sd3/tune_diffusers"], sk[f"sd3/{base}"]) is None
    assert match(sk["sd3/sibling_comfy"], sk["sd3/base_diffusers"]) is None
    assert match(sk["sd3/other_original"], sk["sd3/tune_diffusers"]) is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_a_lora_sketches_the_same_in_every_form(sk: dict[str, Sketch], kind: str, form: str) -> None:
    kohya = sk[f"{kind}/flagged_kohya"]
    same(kohya, sk[f"{kind}/flagged_{form}"])
    # Its modules are the checkpoint's, in both layouts.
    for layout in ("base_diffusers", "base_comfy"):
        missing = set(kohya.tensors) - set(sk[f"{kind}/{layout}"].tensors)
        assert not missing, sorted(missing)[:5]


@pytest.mark.parametrize("kind", KINDS)
def test_a_kohya_lora_is_split_and_swapped_like_its_checkpoint(sk: dict[str, Sketch], kind: str) -> None:
    keys = set(sk[f"{kind}/flagged_kohya"].tensors)
    for block in range(2):
        assert {f"unet:transformer_blocks_{block}_attn_to_{x}" for x in "qkv"} <= keys
        assert {f"unet:transformer_blocks_{block}_attn_add_{x}_proj" for x in "qkv"} <= keys
    assert {"unet:norm_out_linear", "unet:transformer_blocks_1_norm1_context_linear"} <= keys
    assert not any(k.endswith(("_qkv", "shift_scale")) for k in keys)
    assert ({f"unet:transformer_blocks_0_attn2_to_{x}" for x in "qkv"} <= keys) == (kind == "sd35")
    # All stored modules are there: the kohya file's fused ones count once each.
    downs = [k for k in header(SD3 / kind / "flagged_kohya.safetensors") if k.endswith("lora_down.weight")]
    fused = sum(k.endswith("qkv.lora_down.weight") for k in downs)
    assert len(keys) == len(downs) + 2 * fused


@pytest.mark.parametrize("form", ["kohya", *FORMS])
def test_a_lora_baked_into_a_comfyui_checkpoint_is_found(sk: dict[str, Sketch], form: str) -> None:
    lora = sk[f"sd3/flagged_{form}"]
    for base in ("base_diffusers", "base_comfy"):
        m = match(sk["sd3/flagged_baked_comfy"], lora, sk[f"sd3/{base}"])
        assert m is not None and m.match == "lora-baked"
        assert m.evidence["tensors_compared"] == len(lora)
        assert match(sk["sd3/other_baked_comfy"], lora, sk[f"sd3/{base}"]) is None


@pytest.mark.parametrize("flagged", ["flagged_kohya", "flagged_diffusers", "flagged_lycoris"])
def test_another_lora_is_not_found_in_any_form(sk: dict[str, Sketch], flagged: str) -> None:
    for upload in ("other_kohya", "other_diffusers"):
        assert match(sk[f"sd3/{upload}"], sk[f"sd3/{flagged}"], sk["sd3/base_diffusers"]) is None
    assert match(sk["sd35/other_kohya"], sk[f"sd35/{flagged}"], sk["sd35/base_diffusers"]) is None
    m = match(sk["sd3/flagged_onetrainer"], sk[f"sd3/{flagged}"], sk["sd3/base_diffusers"])
    assert m is not None and m.match == "lora"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("model.diffusion_model.joint_blocks.0.x_block.attn2.qkv", "unet:transformer_blocks_0_attn2_to_qkv"),
        ("model.diffusion_model.joint_blocks.0.x_block.attn2.proj", "unet:transformer_blocks_0_attn2_to_out_0"),
        ("lora_unet_joint_blocks_3_context_block_mlp_fc2", "unet:transformer_blocks_3_ff_context_net_2"),
        ("diffusion_model.final_layer.adaLN_modulation.1", "unet:norm_out_linear_shift_scale"),
        ("lora_transformer_transformer_blocks_2_attn_add_q_proj", "unet:transformer_blocks_2_attn_add_q_proj"),
        ("lycoris_transformer_blocks_2_attn2_to_out_0", "unet:transformer_blocks_2_attn2_to_out_0"),
        ("transformer.time_text_embed.text_embedder.linear_1",
         "unet:time_text_embed_text_embedder_linear_1"),
        ("y_embedder.mlp.2", "unet:time_text_embed_text_embedder_linear_2"),
        ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1", "te1:encoder_layers_0_mlp_fc1"),
        ("text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1", "te2:encoder_layers_0_mlp_fc1"),
        ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "te2:encoder_layers_0_mlp_fc1"),
    ],
)
def test_sd3_names_map_to_diffusers(name: str, key: str) -> None:
    assert module_key(name) == key


def test_sd3_t5_lines_up_in_a_pipeline_folder_and_a_comfyui_single_file(tmp_path: Path) -> None:
    """SD3's third text encoder: diffusers' ``text_encoder_3/`` and the single file's
    ``text_encoders.t5xxl.transformer.`` (all convert_sd3_t5_checkpoint_to_diffusers
    strips). T5's own names (tests/fixtures/keys/t5_encoder.json), shapes widened so
    that every matrix is large enough to sketch."""
    names = json.loads((SD3.parent / "keys" / "t5_encoder.json").read_text())
    rng = np.random.default_rng(5)
    sd = {k: rng.standard_normal([4 * d for d in shape]).astype(np.float16) for k, shape in names.items()}
    pipe = tmp_path / "pipe"
    (pipe / "text_encoder_3").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "text_encoder_3": ["transformers", "T5EncoderModel"]}))
    save_file(sd, str(pipe / "text_encoder_3" / "model.safetensors"))
    save_file({f"text_encoders.t5xxl.transformer.{k}": v for k, v in sd.items()}, str(tmp_path / "sd3.safetensors"))
    folder, single = fingerprint_file(pipe).sketch, fingerprint_file(tmp_path / "sd3.safetensors").sketch
    assert folder is not None and single is not None
    assert len(folder) == sum(matrix_shape(v.shape) is not None for v in sd.values()) > 10
    assert all(k.startswith("te3:") for k in folder.tensors)
    same(folder, single)
    assert module_key("lora_te3_encoder_block_0_layer_0_SelfAttention_q") in folder.tensors
