"""Adapter sketches: the effective delta, whatever the form the adapter is stored in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._keys import module_key
from modelhash.fingerprint._lora import AdapterConfig, LoraGroup, adapter_configs, sketch_group
from modelhash.fingerprint._project import project

F64 = np.float64


def _group(key: str = "unet:x") -> LoraGroup:
    return LoraGroup(key, key)


def _sk(arrays: dict[str, np.ndarray], configs: dict[str, AdapterConfig] | None = None) -> np.ndarray:
    out = sketch_group(_group(), arrays, configs or {})
    assert not isinstance(out, str), out
    return out.values


def _factors(seed: int, out: int, inp: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((out, rank)), rng.standard_normal((rank, inp))


lora_shapes = st.tuples(
    st.integers(16, 48), st.integers(16, 48), st.integers(1, 8), st.integers(0, 2**16)
)


@settings(max_examples=25, deadline=None)
@given(lora_shapes, st.floats(0.25, 64))
def test_sketch_is_the_effective_delta(shape: tuple[int, int, int, int], alpha: float) -> None:
    out, inp, rank, seed = shape
    up, down = _factors(seed, out, inp, rank)
    got = _sk({"up": up, "down": down, "alpha": np.array(alpha)})
    np.testing.assert_allclose(got, project(alpha / rank * up @ down), rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(lora_shapes)
def test_refactorisation_invariance(shape: tuple[int, int, int, int]) -> None:
    """up·R, R⁻¹·down is the same adapter."""
    out, inp, rank, seed = shape
    up, down = _factors(seed, out, inp, rank)
    r = np.random.default_rng(seed + 1).standard_normal((rank, rank)) + 3 * np.eye(rank)
    a = _sk({"up": up, "down": down})
    b = _sk({"up": up @ r, "down": np.linalg.solve(r, down)})
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(lora_shapes, st.floats(0.25, 64), st.floats(0.25, 64))
def test_alpha_rank_rescaling_invariance(
    shape: tuple[int, int, int, int], alpha: float, new_alpha: float
) -> None:
    """Changing alpha and compensating in the factors leaves the delta unchanged."""
    out, inp, rank, seed = shape
    up, down = _factors(seed, out, inp, rank)
    a = _sk({"up": up, "down": down, "alpha": np.array(alpha)})
    b = _sk({"up": up * (alpha / new_alpha), "down": down, "alpha": np.array(new_alpha)})
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(lora_shapes, st.integers(1, 64), st.booleans())
def test_peft_config_scaling(shape: tuple[int, int, int, int], alpha: int, rslora: bool) -> None:
    """PEFT's lora_alpha/r (or /sqrt(r)) from its config equals kohya's alpha tensor."""
    out, inp, rank, seed = shape
    up, down = _factors(seed, out, inp, rank)
    cfg = AdapterConfig(r=rank, alpha=alpha, rslora=rslora)
    kohya_alpha = alpha * (np.sqrt(rank) if rslora else 1.0)
    a = _sk({"up": up, "down": down}, {"": cfg})
    b = _sk({"up": up, "down": down, "alpha": np.array(kohya_alpha)})
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_loha_and_lokr_materialised() -> None:
    rng = np.random.default_rng(0)
    w1a, w1b, w2a, w2b = (rng.standard_normal(s) for s in [(32, 4), (4, 24), (32, 4), (4, 24)])
    got = _sk({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
               "alpha": np.array(2.0)})
    np.testing.assert_allclose(got, project((w1a @ w1b) * (w2a @ w2b) * 0.5), atol=1e-9)
    w1 = rng.standard_normal((4, 4))
    w2a, w2b = rng.standard_normal((8, 2)), rng.standard_normal((2, 6 * 9))
    got = _sk({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": np.array(1.0)})
    np.testing.assert_allclose(got, project(np.kron(w1, w2a @ w2b) * 0.5), atol=1e-9)
    assert sketch_group(_group(), {"up": w1, "down": w1, "tucker": w1}, {}) == (
        "tucker-decomposed factors"
    )


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet:down_blocks_0_attentions_0_proj_in"),
        ("base_model.model.down_blocks.0.attentions.0.proj_in", "unet:down_blocks_0_attentions_0_proj_in"),
        ("unet.down_blocks.0.attentions.0.proj_in", "unet:down_blocks_0_attentions_0_proj_in"),
        ("unet/down_blocks.0.attentions.0.proj_in", "unet:down_blocks_0_attentions_0_proj_in"),
        ("model.diffusion_model.input_blocks.1.1.proj_in", "unet:down_blocks_0_attentions_0_proj_in"),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k",
         "unet:down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"),
        ("model.diffusion_model.input_blocks.3.0.op", "unet:down_blocks_0_downsamplers_0_conv"),
        ("model.diffusion_model.output_blocks.2.1.conv", "unet:up_blocks_0_upsamplers_0_conv"),
        ("model.diffusion_model.output_blocks.5.2.conv", "unet:up_blocks_1_upsamplers_0_conv"),
        ("model.diffusion_model.output_blocks.4.0.skip_connection",
         "unet:up_blocks_1_resnets_1_conv_shortcut"),
        ("model.diffusion_model.middle_block.2.emb_layers.1", "unet:mid_block_resnets_1_time_emb_proj"),
        ("model.diffusion_model.time_embed.0", "unet:time_embedding_linear_1"),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
         "unet:down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "te1:encoder_layers_0_self_attn_q_proj"),
        ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj",
         "te1:encoder_layers_0_self_attn_q_proj"),
        ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "te2:encoder_layers_0_mlp_fc1"),
        # diffusers' old text-encoder LoRAs (the reader has already cut ``_lora.up``)
        ("text_encoder.text_model.encoder.layers.0.self_attn.to_q", "te1:encoder_layers_0_self_attn_q_proj"),
        ("text_encoder_2.text_model.encoder.layers.3.self_attn.to_out",
         "te2:encoder_layers_3_self_attn_out_proj"),
        ("base_model.model.model.layers.0.self_attn.q_proj", ":layers_0_self_attn_q_proj"),
        ("model.layers.0.self_attn.q_proj", ":layers_0_self_attn_q_proj"),
    ],
)
def test_module_keys(name: str, key: str) -> None:
    assert module_key(name) == key


def test_adapter_configs_from_sidecar_and_metadata() -> None:
    side = json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"to_q": 8}}).encode()
    cfg = adapter_configs({}, side)[""]
    assert cfg.scale("base_model.model.a.to_k", 4) == 2.0
    assert cfg.scale("base_model.model.a.to_q", 8) == 1.0
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 1})}
    assert adapter_configs(meta, None)["unet"].scale("unet.x", 2) == 0.5
    assert adapter_configs({"lora_adapter_metadata": "{not json"}, b"[]") == {}


def _peft_and_kohya(tmp_path: Path, alpha: float = 8.0, rank: int = 4) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    modules = [f"down_blocks.0.attentions.0.transformer_blocks.0.attn{i}.to_q" for i in (1, 2)]
    peft: dict[str, np.ndarray] = {}
    kohya: dict[str, np.ndarray] = {}
    for m in modules:
        up = rng.standard_normal((64, rank)).astype(np.float32)
        down = rng.standard_normal((rank, 48)).astype(np.float32)
        peft[f"base_model.model.{m}.lora_A.weight"] = down
        peft[f"base_model.model.{m}.lora_B.weight"] = up
        k = "lora_unet_" + m.replace(".", "_")
        # kohya stores alpha = rank, with the scale folded into the up factor.
        kohya[f"{k}.lora_down.weight"] = down.astype(np.float16)
        kohya[f"{k}.lora_up.weight"] = (up * (alpha / rank)).astype(np.float16)
        kohya[f"{k}.alpha"] = np.array(rank, dtype=np.float32)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(peft, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": alpha}))
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    return folder / "adapter_model.safetensors", tmp_path / "kohya.safetensors"


def test_kohya_and_peft_files_sketch_alike(tmp_path: Path) -> None:
    peft_path, kohya_path = _peft_and_kohya(tmp_path)
    a = fingerprint_file(peft_path)
    b = fingerprint_file(kohya_path)
    assert a.sketch is not None and b.sketch is not None
    assert a.sketch.kind == b.sketch.kind == "lora"
    assert set(a.sketch.tensors) == set(b.sketch.tensors) and len(a.sketch) == 2
    for key, t in a.sketch.tensors.items():
        u = b.sketch.tensors[key].values
        assert np.linalg.norm(u - t.values) / np.linalg.norm(t.values) < 2e-3


def test_peft_without_config_notes_the_scale(tmp_path: Path) -> None:
    peft_path, _ = _peft_and_kohya(tmp_path)
    (peft_path.parent / "adapter_config.json").unlink()
    fp = fingerprint_file(peft_path)
    assert any("alpha unknown" in n for n in fp.notes)


def test_old_diffusers_text_encoder_lora_lines_up_with_its_peft_twin(tmp_path: Path) -> None:
    """diffusers' older text-encoder LoRAs (``self_attn.to_q_lora.up``...) hold the same
    deltas as PEFT's ``q_proj.lora_B``, under CLIP's own module names."""
    rng = np.random.default_rng(3)
    old: dict[str, np.ndarray] = {}
    peft: dict[str, np.ndarray] = {}
    prefix = "text_encoder.text_model.encoder.layers.0.self_attn"
    for diffusers, clip in (("to_q", "q_proj"), ("to_v", "v_proj"), ("to_out", "out_proj")):
        down = rng.standard_normal((4, 64)).astype(np.float32)
        up = rng.standard_normal((64, 4)).astype(np.float32)
        old[f"{prefix}.{diffusers}_lora.down.weight"] = down
        old[f"{prefix}.{diffusers}_lora.up.weight"] = up
        peft[f"{prefix}.{clip}.lora_A.weight"] = down
        peft[f"{prefix}.{clip}.lora_B.weight"] = up
    save_file(old, tmp_path / "old.safetensors")
    save_file(peft, tmp_path / "peft.safetensors")
    a = fingerprint_file(tmp_path / "old.safetensors").sketch
    b = fingerprint_file(tmp_path / "peft.safetensors").sketch
    assert a is not None and b is not None and a.kind == b.kind == "lora"
    assert set(a.tensors) == set(b.tensors) == {
        f"te1:encoder_layers_0_self_attn_{m}" for m in ("q_proj", "v_proj", "out_proj")}
    for k, t in a.tensors.items():
        np.testing.assert_allclose(t.values, b.tensors[k].values, rtol=1e-6)
