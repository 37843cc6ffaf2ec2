"""GGUF K-quants as llama-quantize writes them, fallback types included.

Fixtures under tests/fixtures/llama_k/ were written by
tests/fixtures/make_llama_kquants.py: a one-layer Llama (hidden size 256, 4 heads of
32, 2 key/value heads, intermediate size 80) saved by transformers, converted by
llama.cpp's own convert_hf_to_gguf.py to f16 and quantised by llama-quantize to
Q4_K_M, Q6_K and IQ4_XS. Most matrices take the K-quant type; the attention output (rows of
128 values) and the MLP down projection (rows of 80) cannot, and llama-quantize
writes them in its fallback types instead.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._dequant import decode
from modelhash.fingerprint._similarity import compare, match
from modelhash.fingerprint._sketch import Sketch

LLAMA_K = Path(__file__).resolve().parents[1] / "fixtures" / "llama_k"
QUANTS = ["Q4_K_M", "Q6_K", "IQ4_XS"]


@pytest.fixture(scope="module")
def llama() -> dict[str, Sketch]:
    out: dict[str, Sketch] = {}
    for p in sorted(LLAMA_K.iterdir()):
        if p.suffix in (".gguf", ".safetensors"):
            sketch = fingerprint_file(p).sketch
            assert sketch is not None
            out[p.name] = sketch
    return out


def types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize(
    ("qtype", "expected"),
    [
        # llama-quant.cpp: Q4_K_M puts the output and (use_more_bits) the first
        # layer's v and down in Q6_K, the rest in Q4_K; tensor_type_fallback then
        # demotes rows that are no multiple of 256 (the attention output: Q4_K to
        # Q5_0, Q6_K to Q8_0), and to F16 those that are no multiple of 32 either
        # (the down projection).
        ("Q4_K_M", {"Q4_K", "Q6_K", "Q5_0", "F16"}),
        ("Q6_K", {"Q6_K", "Q8_0", "F16"}),
        # IQ4_XS (no importance matrix needed) falls back to IQ4_NL, its 32-block twin.
        ("IQ4_XS", {"IQ4_XS", "IQ4_NL", "Q6_K", "F16"}),
    ],
)
def test_the_files_hold_k_quants_and_their_fallbacks(qtype: str, expected: set[str]) -> None:
    found = types(LLAMA_K / f"tune_{qtype}.gguf")
    matrices = {k: v for k, v in found.items() if not k.endswith("norm.weight")}
    assert set(matrices.values()) == expected
    assert matrices["blk.0.ffn_down.weight"] == "F16"


@pytest.mark.parametrize("qtype", QUANTS)
def test_every_tensor_decodes_as_gguf_py_dequantises_it(qtype: str) -> None:
    for t in gguf.GGUFReader(LLAMA_K / f"tune_{qtype}.gguf").tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(decode(t.tensor_type.name, raw), ref, err_msg=t.name)


@pytest.mark.parametrize(("name", "qtype"), [("base", "Q4_K_M"), *(("tune", q) for q in QUANTS)])
def test_every_weight_matrix_pairs_with_the_hugging_face_original(
    llama: dict[str, Sketch], name: str, qtype: str
) -> None:
    hf, q = llama[f"{name}_hf.safetensors"], llama[f"{name}_{qtype}.gguf"]
    assert len(hf) == 9 and set(q.tensors) == set(hf.tensors)
    for k, t in hf.tensors.items():
        assert q.tensors[k].shape == t.shape, k
        a, b = q.tensors[k].values.ravel(), t.values.ravel()
        # q and k un-permuted: a wrong row order leaves their sketches uncorrelated.
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99, k


@pytest.mark.parametrize("qtype", QUANTS)
def test_the_fine_tune_is_found_after_conversion_and_quantisation(
    llama: dict[str, Sketch], qtype: str
) -> None:
    base, tune = llama["base_hf.safetensors"], llama["tune_hf.safetensors"]
    m = match(llama[f"tune_{qtype}.gguf"], tune, base)
    assert m is not None and m.match in ("near-duplicate", "derived")
    assert m.evidence["tensors_compared"] == 9


@pytest.mark.parametrize("upload", ["base_Q4_K_M", "other_Q4_K_M"])
def test_the_base_and_a_sibling_are_not(llama: dict[str, Sketch], upload: str) -> None:
    base, tune = llama["base_hf.safetensors"], llama["tune_hf.safetensors"]
    assert match(llama[f"{upload}.gguf"], tune, base) is None
    # Still scored over every matrix: not missed for want of pairing.
    assert compare(llama[f"{upload}.gguf"], tune, base).tensors == 9
