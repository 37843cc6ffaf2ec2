"""The ldm UNet layout's rows, pinned on full-size key lists.

tests/fixtures/unet_keys.json.gz was written by tests/fixtures/make_unet_keys.py: the
full-size SD 1.5, SD 2.x, SDXL base and refiner UNets with their ldm names as
diffusers' conversion scripts write them (checked against its single-file loader),
those names as kohya, PEFT, ComfyUI and attention-processor LoRAs spell them, full-size
Flux and SD3 names, every tensor of every fixture file, and a grid of ldm-like edge
paths, each with the canonical key recorded before the ldm rewrite became table rows.
"""

from __future__ import annotations

import gzip
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from modelhash.fingerprint._keys import module_key, tensor_module

FILE = Path(__file__).resolve().parents[1] / "fixtures" / "unet_keys.json.gz"
UNETS = ["sd15", "sd2", "sdxl", "sdxl_refiner"]


@cache
def data() -> dict[str, Any]:
    out: dict[str, Any] = json.loads(gzip.decompress(FILE.read_bytes()))
    return out


def test_every_recorded_key_is_unchanged() -> None:
    keys: dict[str, str] = data()["keys"]
    assert len(keys) > 25_000
    changed = {m: (want, module_key(m)) for m, want in keys.items() if module_key(m) != want}
    assert not changed, (len(changed), list(changed.items())[:5])


_BLOCK = re.compile(r"(?:model_diffusion_model_|lora_unet_)(input_blocks|output_blocks|middle_block)_(\d+)")
_SUFFIX = re.compile(r"_(processor_to_[qkv]|processor_to_out|to_out)$")


def test_edge_paths_change_only_beyond_the_real_blocks_or_with_processor_suffixes() -> None:
    """Outside the real layouts, a path keeps its recorded key unless its block index
    lies past the four down / up blocks the conversion scripts know (the old code
    computed any index), or it is an ldm path with an attention-processor suffix (no
    tool writes one: processors are diffusers modules), where one row applies, not two."""
    edges: dict[str, str] = data()["edges"]
    changed = [m for m, want in edges.items() if module_key(m) != want]
    beyond, suffixed = [], []
    for m in changed:
        flat = m.replace(".", "_")
        b = _BLOCK.match(flat)
        if b and int(b[2]) >= {"input_blocks": 13, "output_blocks": 12, "middle_block": 3}[b[1]]:
            beyond.append(m)
        elif b and _SUFFIX.search(flat):
            suffixed.append(m)
        else:
            pytest.fail(f"{m}: {edges[m]} became {module_key(m)}")
    assert len(edges) > 5000


@pytest.mark.parametrize("unet", UNETS)
def test_ldm_and_diffusers_names_of_each_tensor_share_one_key(unet: str) -> None:
    pairs: list[list[str]] = data()["pairs"][unet]
    seen: dict[str, str] = {}
    for hf, ldm in pairs:
        key = module_key("unet/" + tensor_module(hf))
        assert key == "unet:" + tensor_module(hf).replace(".", "_").lower(), hf  # diffusers is canonical
        for spelling in ("model.diffusion_model.", "diffusion_model.", "lora_unet_"):
            name = spelling + tensor_module(ldm)
            if spelling == "lora_unet_":
                name = name.replace(".", "_")
            assert module_key(name) == key, (name, module_key(name), key)
        assert seen.setdefault(key, hf) == hf, (hf, seen[key])  # no two tensors share a key


@pytest.mark.parametrize("unet", UNETS)
def test_every_ldm_block_is_renamed(unet: str) -> None:
    for _, ldm in data()["pairs"][unet]:
        path = module_key("model.diffusion_model." + tensor_module(ldm)).partition(":")[2]
        assert not re.match(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_", path), ldm
