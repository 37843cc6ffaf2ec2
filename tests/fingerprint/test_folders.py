"""Model folders: sharded checkpoints, diffusers pipelines, Hugging Face caches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import save_file

from modelhash.errors import UnsupportedFormatError
from modelhash.fingerprint import fingerprint_file, fingerprint_path

from .conftest import tiny_state_dict


def make_sharded(folder: Path, *, break_index: str | None = None) -> None:
    folder.mkdir(parents=True)
    sd = tiny_state_dict()
    names = sorted(sd)
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({k: sd[k] for k in names[:3]}, str(folder / a))
    save_file({k: sd[k] for k in names[3:]}, str(folder / b))
    wm = {k: (a if i < 3 else b) for i, k in enumerate(names)}
    if break_index == "move":
        wm[names[0]] = b
    if break_index == "escape":
        wm[names[0]] = "../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


def test_shard_that_disagrees_with_its_index_is_refused(tmp_path: Path) -> None:
    make_sharded(tmp_path / "m", break_index="move")
    (out,) = fingerprint_path(tmp_path / "m")
    assert out.error is not None and "disagrees with its index" in out.error.diagnostics()


def test_index_cannot_point_outside_the_folder(tmp_path: Path) -> None:
    make_sharded(tmp_path / "m", break_index="escape")
    (out,) = fingerprint_path(tmp_path / "m")
    assert out.error is not None and "bad shard" in out.error.diagnostics()


def test_missing_shard(tmp_path: Path) -> None:
    make_sharded(tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    (out,) = fingerprint_path(tmp_path / "m")
    assert out.error is not None and "shard missing" in out.error.diagnostics()


def test_diffusers_pipeline_is_one_model(tmp_path: Path) -> None:
    root = tmp_path / "pipe"
    (root / "unet").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "scheduler").mkdir()
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"]})
    )
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    save_file(tiny_state_dict(1), str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file(tiny_state_dict(2), str(root / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    save_file(tiny_state_dict(3), str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    fp = fingerprint_file(root)
    assert fp.format == "diffusers"
    assert len(fp.files) == 2  # the fp16 variant is not read twice
    assert {t.name.split("/")[0] for t in fp.tensors} == {"unet", "vae"}


def test_hf_cache_entry_resolves_refs_main(tmp_path: Path) -> None:
    entry = tmp_path / "models--org--tiny"
    blobs = entry / "blobs"
    blobs.mkdir(parents=True)
    save_file(tiny_state_dict(), str(blobs / "abc123"))
    for rev in ("1111", "2222"):
        snap = entry / "snapshots" / rev
        snap.mkdir(parents=True)
        (snap / "model.safetensors").symlink_to(blobs / "abc123")
        (snap / "config.json").write_text("{}")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("2222")
    (out,) = fingerprint_path(entry)
    assert out.ok
    assert out.path.endswith("snapshots/2222/model.safetensors")


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    (out,) = fingerprint_path(tmp_path)
    assert isinstance(out.error, UnsupportedFormatError)


def test_missing_path(tmp_path: Path) -> None:
    (out,) = fingerprint_path(tmp_path / "nope.safetensors")
    assert out.error is not None and "no such file" in out.error.diagnostics()


def test_collection_refused_by_fingerprint_file(tmp_path: Path) -> None:
    save_file(tiny_state_dict(), str(tmp_path / "a.safetensors"))
    save_file(tiny_state_dict(1), str(tmp_path / "b.safetensors"))
    with pytest.raises(UnsupportedFormatError, match="2 separate models"):
        fingerprint_file(tmp_path)
