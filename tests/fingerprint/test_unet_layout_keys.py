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
from modelhash.fingerprint._layouts import RENAMES, _first_word

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
    # what changed: input blocks 13 and output blocks 12-13 stay as they are, and
    # the processor suffix of an ldm path stays, its block renamed
    assert module_key("model.diffusion_model.input_blocks.13.1.proj_in") == "unet:input_blocks_13_1_proj_in"
    assert module_key("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_processor_to_q") == (
        "unet:down_blocks_1_attentions_0_transformer_blocks_0_attn1_processor_to_q")
    assert len(beyond) + len(suffixed) == len(changed) < len(edges) // 5


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


def test_diffusers_and_transformer_paths_match_no_ldm_row() -> None:
    """No row written for the ldm layout fullmatches a diffusers, Flux or SD3 path."""
    ldm_rows = [r for r in RENAMES if r.source.startswith("diffusers scripts/convert_diffusers_to_original")
                and r.component == "unet"]
    assert len(ldm_rows) > 100
    paths = {tensor_module(hf).replace(".", "_").lower() for u in UNETS for hf, _ in data()["pairs"][u]}
    paths |= {k.partition(":")[2] for k in data()["keys"].values() if k.startswith("unet:")}
    hits = [(p, r.pattern.pattern) for p in paths for r in ldm_rows if r.pattern.fullmatch(p)]
    assert not hits, hits[:5]


def test_the_first_word_index_never_hides_a_matching_row() -> None:
    """``rename`` tries only the rows whose literal start fixes the path's first word
    (and those fixing none): every row that matches a path must be among them."""
    inputs = sorted({*data()["keys"], *data()["edges"]})[::3]
    paths = {re.sub(r"[./\-]", "_", m.lower()) for m in inputs}
    paths |= {p.split("_", 2)[-1] for p in paths}  # also without a two-word prefix
    paths |= {"output", "output_norm", "out", "out_0", "outer_0", "t_embedder_mlp_0", "t"}
    words = {r.pattern.pattern: _first_word(r.pattern.pattern) for r in RENAMES}
    assert sum(w is None for w in words.values()) < 20
    for r in RENAMES:
        w = words[r.pattern.pattern]
        if w is not None:
            hidden = [p for p in paths if r.pattern.fullmatch(p) and p.split("_", 1)[0] != w]
            assert not hidden, (r.pattern.pattern, hidden[:3])


@pytest.mark.parametrize(("pattern", "word"), [
    ("output", "output"), ("out_0(_.*)?", "out"), ("model_(layers_\\d+_.+|norm)", "model"),
    ("abc_x|def", None), ("a_?b", None), ("ab_c?", "ab"), ("(.*)_to_out", None),
    ("a_b[(]|c", None), ("x\\|y_z", None), ("a_b[|]c", "a"),
])
def test_first_word_of_a_pattern(pattern: str, word: str | None) -> None:
    assert _first_word(pattern) == word
