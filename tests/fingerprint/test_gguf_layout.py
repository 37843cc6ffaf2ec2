"""GGUF as llama.cpp writes it: renamed tensors and permuted q/k rows map back.

Fixtures under tests/fixtures/llama/ were written by tests/fixtures/make_llama_gguf.py:
a tiny Llama (4 heads, 2 key/value heads) saved by transformers, and the same
weights converted by llama.cpp's own convert_hf_to_gguf.py to f16 and q8_0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._layouts import pieces
from modelhash.fingerprint._similarity import match
from modelhash.fingerprint._sketch import Sketch

LLAMA = Path(__file__).resolve().parents[1] / "fixtures" / "llama"
HINTS = {
    "general.architecture": "llama",
    "llama.attention.head_count": "4",
    "llama.attention.head_count_kv": "2",
}


@pytest.fixture(scope="module")
def llama() -> dict[str, Sketch]:
    out: dict[str, Sketch] = {}
    for p in sorted(LLAMA.iterdir()):
        if p.suffix in (".gguf", ".safetensors"):
            sketch = fingerprint_file(p).sketch
            assert sketch is not None
            out[p.name] = sketch
    return out


@pytest.mark.parametrize("name", ["base", "tune", "qk"])
@pytest.mark.parametrize(("outtype", "tol"), [("f16", 1e-6), ("q8_0", 2e-2)])
def test_every_tensor_pairs_with_the_hugging_face_original(
    llama: dict[str, Sketch], name: str, outtype: str, tol: float
) -> None:
    hf, gguf = llama[f"{name}_hf.safetensors"], llama[f"{name}_{outtype}.gguf"]
    assert len(hf) == 16 and set(gguf.tensors) == set(hf.tensors)
    for k, t in hf.tensors.items():
        peak = float(np.abs(t.values).max())
        np.testing.assert_allclose(gguf.tensors[k].values, t.values, atol=tol * peak, err_msg=k)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_a_q_and_k_only_fine_tune_is_found_after_conversion(
    llama: dict[str, Sketch], outtype: str
) -> None:
    base = llama["base_hf.safetensors"]
    m = match(llama[f"qk_{outtype}.gguf"], llama["qk_hf.safetensors"], base)
    assert m is not None and m.match == "near-duplicate"
    assert m.evidence["tensors_compared"] == 4  # q and k of both layers
    for other in ("other", "tune"):
        assert match(llama[f"{other}_{outtype}.gguf"], llama["qk_hf.safetensors"], base) is None


def test_the_permutation_is_llama_cpps() -> None:
    # convert_hf_to_gguf.py LlamaModel.permute, applied to row indices.
    rows, heads = 32, 4
    w = np.arange(rows)
    permuted = w.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
    (p,) = pieces(":layers_0_self_attn_q_proj_rotary", rows, 32, HINTS)
    assert p.key == ":layers_0_self_attn_q_proj"
    assert p.order is not None
    np.testing.assert_array_equal(p.order, permuted)
    (k,) = pieces(":layers_0_self_attn_k_proj_rotary", 16, 32, HINTS)
    np.testing.assert_array_equal(
        k.order, np.arange(16).reshape(2, 2, 4).swapaxes(1, 2).reshape(16)
    )


@pytest.mark.parametrize(
    "hints",
    [
        {**HINTS, "general.architecture": "qwen2"},  # its converter does not permute
        {"general.architecture": "llama"},  # no head count: nothing to undo with
        {**HINTS, "llama.attention.head_count": "3"},  # does not divide the rows
        {**HINTS, "llama.attention.head_count": "-4"},
    ],
)
def test_no_permutation_without_a_trustworthy_head_count(hints: dict[str, str]) -> None:
    (p,) = pieces(":layers_0_self_attn_q_proj_rotary", 32, 32, hints)
    assert p.key == ":layers_0_self_attn_q_proj" and p.order is None
