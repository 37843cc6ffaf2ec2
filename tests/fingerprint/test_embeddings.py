"""Textual-inversion embeddings: one canonical name and a sketch, whatever the file.

tests/fixtures/embeddings/ was written by tests/fixtures/make_embedding_fixtures.py:
the same single 768-wide vector as an A1111 ``.pt`` and as safetensors ``emb_params``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._similarity import match
from modelhash.fingerprint._sketch import Sketch

EMB = Path(__file__).resolve().parents[1] / "fixtures" / "embeddings"


def sketch(path: Path) -> Sketch:
    s = fingerprint_file(path).sketch
    assert s is not None
    return s


def vector() -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(EMB / "emb.safetensors"))["emb_params"]


def test_a1111_and_safetensors_name_the_vectors_alike() -> None:
    pt, st = fingerprint_file(EMB / "a1111.pt"), fingerprint_file(EMB / "emb.safetensors")
    assert pt.model.kind == st.model.kind == "embedding"
    assert {t.name for t in pt.tensors} == {"emb_params", "emb_token"}
    (pv,) = (t for t in pt.tensors if t.name == "emb_params")
    (sv,) = st.tensors
    assert (pv.name, pv.dtype, pv.shape, pv.blake3) == (sv.name, sv.dtype, sv.shape, sv.blake3)
    # The placeholder's token id is bookkeeping: the two files hold one embedding.
    assert pt.content == st.content


def test_only_the_placeholder_token_id_is_left_out_of_the_content_hash(tmp_path: Path) -> None:
    v = vector()
    plain = fingerprint_file(EMB / "emb.safetensors").content
    cases = {
        "token id": ({"emb_params": v, "emb_token": np.array(265, dtype=np.int64)}, True),
        "float emb_token": ({"emb_params": v, "emb_token": np.array([265.0], dtype=np.float32)}, False),
        "several ids": ({"emb_params": v, "emb_token": np.array([265, 266], dtype=np.int64)}, False),
        "no vectors": ({"emb_params_x": v, "emb_token": np.array(265, dtype=np.int64)}, False),
        "other vectors": ({"emb_params": v + 1, "emb_token": np.array(265, dtype=np.int64)}, False),
    }
    for name, (tensors, same) in cases.items():
        save_file(tensors, str(tmp_path / "e.safetensors"))
        assert (fingerprint_file(tmp_path / "e.safetensors").content == plain) is same, name


@pytest.mark.parametrize("form", ["pt", "f16", "bf16_like", "sdxl_clip_l"])
def test_a_one_vector_embedding_matches_after_resave_or_cast(tmp_path: Path, form: str) -> None:
    flagged = sketch(EMB / "emb.safetensors")
    assert set(flagged.tensors) == {"te1:embedding"}
    v = vector()
    if form == "pt":
        upload = sketch(EMB / "a1111.pt")
    else:
        if form == "f16":
            tensors = {"emb_params": v.astype(np.float16)}
        elif form == "bf16_like":
            tensors = {"emb_params": (v.view(np.uint32) & 0xFFFF0000).view(np.float32)}
        else:
            g = np.random.default_rng(5).standard_normal((1, 1280)).astype(np.float32)
            tensors = {"clip_l": v, "clip_g": g}
        save_file(tensors, str(tmp_path / "u.safetensors"))
        upload = sketch(tmp_path / "u.safetensors")
    m = match(upload, flagged)
    assert m is not None and m.match == "near-duplicate"


def test_another_embedding_does_not_match(tmp_path: Path) -> None:
    flagged = sketch(EMB / "emb.safetensors")
    rng = np.random.default_rng(1)
    for i in range(5):
        other = (rng.standard_normal((1, 768)) * 0.02).astype(np.float32)
        save_file({"emb_params": other}, str(tmp_path / f"o{i}.safetensors"))
        assert match(sketch(tmp_path / f"o{i}.safetensors"), flagged) is None


def test_multi_vector_and_sdxl_pairs_get_both_encoders(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    save_file({"clip_l": rng.standard_normal((4, 768)).astype(np.float32),
               "clip_g": rng.standard_normal((4, 1280)).astype(np.float32)},
              str(tmp_path / "xl.safetensors"))
    s = sketch(tmp_path / "xl.safetensors")
    assert {k: t.shape for k, t in s.tensors.items()} == {
        "te1:embedding": (96, 32), "te2:embedding": (160, 32)
    }
