"""The content layer's invariances: what must not change it, and what must."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import save_file

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._content import canonical_names

from .conftest import tiny_state_dict

NO_FIXTURE_RESET = [HealthCheck.function_scoped_fixture]


def content(path: Path) -> str:
    return fingerprint_file(path).content.hex


def test_tensor_order_and_metadata_do_not_matter(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    save_file(sd, str(a))
    save_file(dict(reversed(list(sd.items()))), str(b), metadata={"format": "pt", "modelspec.title": "x"})
    assert a.read_bytes() != b.read_bytes()
    assert content(a) == content(b)


def test_wrapper_prefixes_do_not_matter(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    a, b, c = (tmp_path / n for n in ("a.safetensors", "b.safetensors", "c.safetensors"))
    save_file(sd, str(a))
    save_file({f"module.{k}": v for k, v in sd.items()}, str(b))
    save_file({f"module._orig_mod.{k}": v for k, v in sd.items()}, str(c))
    assert content(a) == content(b) == content(c)


def test_prefix_shared_by_only_some_names_is_kept() -> None:
    assert canonical_names(["module.a", "b"]) == ["module.a", "b"]
    assert canonical_names(["module.a", "module.b"]) == ["a", "b"]


def test_cast_rename_and_value_change_all_change_it(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    base = tmp_path / "base.safetensors"
    save_file(sd, str(base))
    variants = {
        "cast": {**sd, "encoder.layer.0.weight": sd["encoder.layer.0.weight"].astype(np.float16)},
        "rename": {("decoder" + k[7:] if k.startswith("encoder") else k): v for k, v in sd.items()},
        "value": {**sd, "scale": np.array(2.5000002, dtype=np.float32)},
        "reshape": {**sd, "embed.ids": sd["embed.ids"].reshape(7, 1)},
        "drop": {k: v for k, v in sd.items() if k != "scale"},
    }
    seen = {content(base)}
    for name, v in variants.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(v, str(p))
        c = content(p)
        assert c not in seen, name
        seen.add(c)


def test_sharding_does_not_matter(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    whole = tmp_path / "whole.safetensors"
    save_file(sd, str(whole))
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(folder / fname))
        weight_map.update({k: fname for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    fp = fingerprint_file(folder)
    assert fp.format == "safetensors-sharded"
    assert len(fp.files) == 2
    assert fp.content.hex == content(whole)


@settings(max_examples=40, deadline=None, suppress_health_check=NO_FIXTURE_RESET)
@given(
    arrays=st.lists(
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float16, np.int8, np.int64]),
            shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
            elements={"allow_nan": False},
        ),
        min_size=1,
        max_size=5,
    ),
    data=st.data(),
)
def test_property_permutation_and_chunking_invariance(tmp_path: Path, arrays: list[np.ndarray], data: st.DataObject) -> None:
    sd = {f"t{i}.weight": a for i, a in enumerate(arrays)}
    order = data.draw(st.permutations(list(sd)))
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    save_file(sd, str(a))
    save_file({k: sd[k] for k in order}, str(b))
    chunk = data.draw(st.integers(min_value=1, max_value=512))
    assert fingerprint_file(a).content == fingerprint_file(b, chunk=chunk).content


@settings(max_examples=40, deadline=None, suppress_health_check=NO_FIXTURE_RESET)
@given(
    arr=hnp.arrays(dtype=np.float32, shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=6), elements={"allow_nan": False}),
    idx=st.integers(min_value=0),
)
def test_property_any_changed_value_changes_it(tmp_path: Path, arr: np.ndarray, idx: int) -> None:
    changed = arr.copy()
    flat = changed.reshape(-1).view(np.uint32)
    flat[idx % flat.size] ^= 1
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    save_file({"w": arr}, str(a))
    save_file({"w": changed}, str(b))
    assert fingerprint_file(a).content != fingerprint_file(b).content


def test_per_tensor_digests_are_exposed(write_safetensors: Callable[..., Path]) -> None:
    import blake3

    sd = tiny_state_dict()
    fp = fingerprint_file(write_safetensors(sd))
    got = {t.name: t for t in fp.tensors}
    for k, v in sd.items():
        assert got[k].blake3 == blake3.blake3(np.ascontiguousarray(v).tobytes()).hexdigest()
        assert got[k].shape == v.shape


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_tiny_chunks_give_the_same_answer(write_safetensors: Callable[..., Path], chunk: int) -> None:
    p = write_safetensors()
    assert fingerprint_file(p, chunk=chunk).to_json() == fingerprint_file(p).to_json()


@pytest.mark.parametrize("wrapper", ["model.", "net.", "ema_model.", "model.model."])
def test_any_prefix_every_name_shares_is_a_wrapper(tmp_path: Path, wrapper: str) -> None:
    sd = tiny_state_dict()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(sd, str(a))
    save_file({wrapper + k: v for k, v in sd.items()}, str(b))
    assert content(a) == content(b)


@pytest.mark.parametrize(
    "names",
    [
        # one module's parameters: the prefix is the module, not a wrapper
        ["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"],
        ["lora_unet_x.alpha", "lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"],
        ["x.weight", "x.bias"],
        # a component or an adapter marker says what the tensors are
        ["transformer.a.weight", "transformer.b.weight"],
        ["text_encoder_2.a.weight", "text_encoder_2.b.weight"],
        ["model.diffusion_model.a.weight", "model.diffusion_model.b.weight"],
        ["base_model.model.a.lora_A.weight", "base_model.model.a.lora_B.weight"],
    ],
)
def test_meaningful_shared_prefixes_are_kept(names: list[str]) -> None:
    assert canonical_names(names) == names


def test_shards_agree_on_what_is_a_wrapper() -> None:
    from modelhash.fingerprint._content import canonical_unit_names

    shards = [["model.layers.0.weight", "model.embed.weight"], ["lm_head.weight"]]
    assert canonical_unit_names(shards) == shards
    lightning = [["model.a.weight"], ["model.b.weight"]]
    assert canonical_unit_names(lightning) == [["a.weight"], ["b.weight"]]


@pytest.mark.parametrize(
    "names",
    [
        # a LoRA on one module list or one subtree keeps its structure
        ["double_blocks.0.processor.qkv_lora1.down.weight", "double_blocks.0.processor.proj_lora1.up.weight"],
        ["text_model.encoder.layers.0.q.lora_A.weight", "text_model.encoder.layers.1.q.lora_A.weight"],
        ["mid_block.attentions.0.a.weight", "mid_block.resnets.0.b.weight"],
    ],
)
def test_structure_is_not_a_wrapper(names: list[str]) -> None:
    assert canonical_names(names) == names


def test_a1111_embeddings_name_their_vectors_like_safetensors() -> None:
    assert canonical_names(["string_to_token.*", "string_to_param.*"]) == ["emb_token", "emb_params"]
    assert canonical_names(["emb_params"]) == ["emb_params"]
    two = ["string_to_param.a", "string_to_param.b"]
    assert canonical_names(two) == two
