"""The sketch projection, its streaming form in the read pass, dtypes, storage, band keys."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from modelhash.fingerprint import SKETCH_ALGORITHM, Sketch, fingerprint_file
from modelhash.fingerprint._dequant import DECODERS, decode
from modelhash.fingerprint._project import K, matrix_shape, project, projections
from modelhash.fingerprint._sketch import TensorSketch, band_keys

dims = st.integers(min_value=2, max_value=48)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_algorithm_name_carries_k() -> None:
    assert f"sketch-rademacher-k{K}-v1" == SKETCH_ALGORITHM


def test_projection_known_answer() -> None:
    """The signs come from BLAKE3 XOF, so they are fixed forever for this version."""
    a, bt = projections(3, 5)
    assert a.shape == (K, 3) and bt.shape == (5, K)
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert a[:2].astype(int).tolist() == [[-1, 1, -1], [1, 1, 1]]
    assert bt[:, 0].astype(int).tolist() == [-1, 1, -1, -1, -1]


def test_projection_depends_on_shape_only() -> None:
    a1, b1 = projections(8, 9)
    a2, b2 = projections(8, 9)
    assert a1 is a2 and b1 is b2
    a3, _ = projections(8, 10)
    assert not np.array_equal(a1, a3)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((16,), None),
        ((32, 16, 1, 1), (32, 16)),
        ((4, 8, 3, 3), (4, 72)),
        ((320, 768), (320, 768)),
        ((1, 1024), None),
        ((8, 8), None),
        ((3, 8, 16), (3, 128)),
    ],
)
def test_matrix_shape(shape: tuple[int, ...], expected: tuple[int, int] | None) -> None:
    assert matrix_shape(shape) == expected


@settings(max_examples=25, deadline=None)
@given(m=dims, n=dims, seed=st.integers(0, 2**16), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_linearity(m: int, n: int, seed: int, a: float, b: float) -> None:
    """S(aX + bY) = aS(X) + bS(Y): deltas can be taken on sketches."""
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((m, n)), rng.standard_normal((m, n))
    np.testing.assert_allclose(
        project(a * x + b * y), a * project(x) + b * project(y), atol=1e-9
    )


def test_inner_products_preserved_on_average() -> None:
    """Johnson-Lindenstrauss: sketch cosine tracks the true cosine of the matrices."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 384))
    for rho in (0.0, 0.5, 0.9):
        y = rho * x + math.sqrt(1 - rho**2) * rng.standard_normal(x.shape)
        assert abs(_cos(project(x), project(y)) - _cos(x, y)) < 0.2


def _write(tmp_path: Path, tensors: dict[str, np.ndarray], name: str = "m.safetensors") -> Path:
    p = tmp_path / name
    save_file(tensors, str(p))
    return p


def _tiny(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.attn.q_proj.weight": rng.standard_normal((64, 48)).astype(np.float32),
        "layers.0.conv.weight": rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        "layers.0.proj.weight": rng.standard_normal((24, 40, 1, 1)).astype(np.float32),
        "layers.0.norm.weight": np.ones(64, np.float32),
        "tiny.weight": rng.standard_normal((4, 4)).astype(np.float32),
    }


def test_pass_matches_direct_projection_for_any_chunk(tmp_path: Path) -> None:
    sd = _tiny()
    path = _write(tmp_path, sd)
    ref = fingerprint_file(path).sketch
    assert ref is not None and set(ref.tensors) == {
        ":layers_0_attn_q_proj", ":layers_0_conv", ":layers_0_proj",
    }
    np.testing.assert_allclose(
        ref.tensors[":layers_0_conv"].values,
        project(sd["layers.0.conv.weight"].reshape(32, -1).astype(np.float64)),
        atol=1e-5,
    )
    for chunk in (1, 7, 1000, 4096):
        other = fingerprint_file(path, chunk=chunk).sketch
        assert other is not None
        for key, t in ref.tensors.items():
            np.testing.assert_allclose(other.tensors[key].values, t.values, atol=1e-5)


def test_exact_layers_only(tmp_path: Path) -> None:
    fp = fingerprint_file(_write(tmp_path, _tiny()), layers="exact")
    assert fp.sketch is None and "sketch" not in fp.to_json()


def test_tensor_order_and_1x1_squeeze(tmp_path: Path) -> None:
    sd = _tiny()
    a = fingerprint_file(_write(tmp_path, sd, "a.safetensors")).sketch
    reordered = dict(reversed(list(sd.items())))
    reordered["layers.0.proj.weight"] = sd["layers.0.proj.weight"].reshape(24, 40)
    b = fingerprint_file(_write(tmp_path, reordered, "b.safetensors")).sketch
    assert a is not None and b is not None
    for key, t in a.tensors.items():
        np.testing.assert_allclose(b.tensors[key].values, t.values, atol=1e-6)


def _f8_e4m3(x: np.ndarray) -> np.ndarray:
    """Round to float8 e4m3fn the slow way (nearest representable value)."""
    table = DECODERS["F8_E4M3"].fn(np.arange(256, dtype=np.uint8))
    finite = np.isfinite(table)
    codes = np.arange(256)[finite]
    vals = table[finite]
    idx = np.abs(x.reshape(-1, 1) - vals.reshape(1, -1)).argmin(axis=1)
    return codes[idx].astype(np.uint8).reshape(x.shape)


@pytest.mark.parametrize(
    ("dtype", "bound"), [("F16", 1e-3), ("BF16", 8e-3), ("F8_E4M3", 6e-2)]
)
def test_cast_robustness(tmp_path: Path, dtype: str, bound: float) -> None:
    """A cast moves each sketch by about the cast's relative rounding error."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((96, 80)) * 0.05).astype(np.float32)
    if dtype == "F16":
        raw = w.astype(np.float16).view(np.uint8)
    elif dtype == "BF16":
        raw = (w.view(np.uint32) + 0x8000 >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = _f8_e4m3(w)
    cast = decode(dtype, raw.tobytes()).reshape(w.shape)
    s, c = project(w.astype(np.float64)), project(cast.astype(np.float64))
    assert np.linalg.norm(s - c) / np.linalg.norm(s) < bound


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"])
def test_fp8_tables(dtype: str) -> None:
    table = DECODERS[dtype].fn(np.arange(256, dtype=np.uint8))
    assert np.all(np.isfinite(table))
    assert table[0] == 0.0
    if dtype == "F8_E4M3":
        assert table[0x7E] == 448.0 and table[0x38] == 1.0 and table[0x01] == 2.0**-9
    if dtype == "F8_E5M2":
        np.testing.assert_array_equal(
            table[:0x7B], (np.arange(0x7B, dtype=np.uint16) << 8).view(np.float16)
        )


def test_gguf_dequant_matches_reference() -> None:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                 "IQ4_NL", "IQ4_XS", "MXFP4"):
        qtype = getattr(gguf.GGMLQuantizationType, name)
        dec = DECODERS[name]
        raw = rng.integers(0, 256, size=(3, dec.size), dtype=np.uint8)
        with np.errstate(all="ignore"):
            ref = gguf.quants.dequantize(raw, qtype).reshape(-1)
            ours = decode(name, raw.tobytes())
        mask = np.isfinite(ref) & np.isfinite(ours)
        assert mask.mean() > 0.3
        np.testing.assert_allclose(ours[mask], ref[mask], rtol=1e-5, atol=1e-5, err_msg=name)


def test_q2_0_codes() -> None:
    # ggml-quants.c dequantize_row_q2_0 (not in the reference package yet): codes
    # 0..3 are -1, 0, 1, 2 times the scale, four per byte from the lowest bits.
    block = np.float16(0.5).tobytes() + bytes([0b11100100, 0b00011011] + [0x55] * 14)
    out = decode("Q2_0", block)
    assert out.shape == (64,)
    np.testing.assert_array_equal(out[:8], np.array([-1, 0, 1, 2, 2, 1, 0, -1]) * 0.5)
    np.testing.assert_array_equal(out[8:], 0.0)


def test_storage_round_trip_and_size() -> None:
    rng = np.random.default_rng(0)
    tensors = {
        f"unet:k{i}": TensorSketch(f"unet:k{i}", (320, 768), rng.standard_normal((K, K)) * 1e-4)
        for i in range(20)
    }
    s = Sketch("model", tensors)
    blob = s.to_bytes()
    back = Sketch.from_bytes(blob)
    assert back.kind == "model" and back.algorithm == SKETCH_ALGORITHM
    for key, t in tensors.items():
        assert back.tensors[key].shape == t.shape
        np.testing.assert_allclose(back.tensors[key].values, t.values, rtol=1e-6, atol=1e-12)
    assert len(blob) < 20 * (4 * K * K + 40)
    # Deltas and adapters keep float16, relative to their own peak.
    delta = Sketch("delta", tensors).to_bytes()
    assert len(delta) < 20 * (2 * K * K + 40)
    for key, t in Sketch.from_bytes(delta).tensors.items():
        np.testing.assert_allclose(t.values, tensors[key].values, rtol=1e-3, atol=1e-7)
    # Version 1 blobs (float16 throughout) still read.
    old = Sketch.from_bytes(s.to_bytes(precision="f16"))
    for key, t in old.tensors.items():
        np.testing.assert_allclose(t.values, tensors[key].values, rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError):
        Sketch("lora", tensors).to_bytes(precision="f32")
    with pytest.raises(ValueError):
        Sketch.from_bytes(blob[:-3])
    with pytest.raises(ValueError):
        Sketch.from_bytes(b"XXXX" + blob[4:])


def test_sd15_storage_estimate() -> None:
    """An SD 1.5 checkpoint has ~690 sketched matrices: under 1 MB stored at float32."""
    per_tensor = 4 * K * K + 4 + 8 + 2 + 60
    assert 690 * per_tensor < 1_000_000


def _noisy(s: Sketch, scale: float, seed: int) -> Sketch:
    rng = np.random.default_rng(seed)
    return Sketch(
        s.kind,
        {
            k: TensorSketch(k, t.shape, t.values + scale * rng.standard_normal(t.values.shape))
            for k, t in s.tensors.items()
        },
    )


def _random_sketch(seed: int, n: int = 30) -> Sketch:
    rng = np.random.default_rng(seed)
    shapes = [(64, 64), (128, 64), (64, 256)]
    return Sketch(
        "model",
        {
            f":t{i}": TensorSketch(f":t{i}", shapes[i % 3], rng.standard_normal((K, K)))
            for i in range(n)
        },
    )


def test_band_keys_near_duplicates_share_and_unrelated_do_not() -> None:
    base = _random_sketch(0)
    keys = set(base.band_keys())
    assert len(keys) == 16
    shared = [len(keys & set(_noisy(base, 0.02, s).band_keys())) for s in range(20)]
    assert min(shared) >= 1 and sum(shared) / len(shared) > 8
    unrelated = [len(keys & set(_random_sketch(100 + s).band_keys())) for s in range(200)]
    assert sum(1 for u in unrelated if u) <= 2


def test_band_keys_ignore_names_and_order() -> None:
    base = _random_sketch(0)
    renamed = [(t.shape, t.values) for t in reversed(list(base))]
    assert band_keys(renamed) == base.band_keys()
