"""Scaled fp8: the sketch of codes x scale, in every scale convention in use."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._dequant import DECODERS
from modelhash.fingerprint._sketch import Sketch

E4M3_MAX = 448.0


def _f8_e4m3(x: np.ndarray) -> np.ndarray:
    """Round to float8 e4m3fn (nearest representable value)."""
    table = DECODERS["F8_E4M3"].fn(np.arange(256, dtype=np.uint8))
    idx = np.abs(x.reshape(-1, 1) - table.reshape(1, -1)).argmin(axis=1)
    return idx.astype(np.uint8).reshape(x.shape)


def write(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> Path:
    """A safetensors file from raw (dtype, shape, bytes), fp8 included."""
    header: dict[str, object] = {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def f32(x: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    return ("F32", x.shape, x.astype("<f4").tobytes())


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"blocks.{i}.linear.weight": (rng.standard_normal((64, 256)) * 0.02 * (i + 1)).astype(np.float32)
        for i in range(3)
    }


def sketch(path: Path) -> Sketch:
    s = fingerprint_file(path).sketch
    assert s is not None
    return s


def rel(a: Sketch, b: Sketch) -> float:
    assert set(a.tensors) == set(b.tensors)
    num = sum(float(np.sum((a.tensors[k].values - t.values) ** 2)) for k, t in b.tensors.items())
    den = sum(float(np.sum(t.values**2)) for t in b.tensors.values())
    return (num / den) ** 0.5


def comfy(w: np.ndarray) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    scale = np.float32(np.abs(w).max() / E4M3_MAX)
    return {"weight": ("F8_E4M3", w.shape, _f8_e4m3(w / scale).tobytes()),
            "scale_weight": f32(np.array(scale))}


def per_row(w: np.ndarray) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    scale = (np.abs(w).max(axis=1, keepdims=True) / E4M3_MAX).astype(np.float32)
    return {"weight": ("F8_E4M3", w.shape, _f8_e4m3(w / scale).tobytes()),
            "weight_scale": f32(scale)}


def blockwise(w: np.ndarray, b: int = 128) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    m, n = w.shape
    sr, sc = -(-m // b), -(-n // b)
    s = np.zeros((sr, sc), dtype=np.float32)
    codes = np.zeros_like(w)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * b : (i + 1) * b, j * b : (j + 1) * b]
            s[i, j] = np.abs(blk).max() / E4M3_MAX
            codes[i * b : (i + 1) * b, j * b : (j + 1) * b] = blk / s[i, j]
    return {"weight": ("F8_E4M3", w.shape, _f8_e4m3(codes).tobytes()), "weight_scale_inv": f32(s)}


@pytest.mark.parametrize("convention", [comfy, per_row, blockwise])
def test_scaled_fp8_sketches_like_the_real_weights(
    tmp_path: Path, weights: dict[str, np.ndarray], convention: object
) -> None:
    ref = sketch(write(tmp_path / "ref.safetensors", {k: f32(w) for k, w in weights.items()}))
    scaled: dict[str, tuple[str, tuple[int, ...], bytes]] = {
        "scaled_fp8": ("F8_E4M3", (0,), b"")
    }
    for k, w in weights.items():
        for leaf, t in convention(w).items():  # type: ignore[operator]
            scaled[k.removesuffix("weight") + leaf] = t
    got = sketch(write(tmp_path / "fp8.safetensors", scaled))
    assert rel(got, ref) < 0.05  # fp8 rounding, averaged by the projection
    # Without the scales the codes alone are two orders of magnitude off.
    codes = {k: v for k, v in scaled.items() if "scale" not in k or k == "scaled_fp8"}
    assert rel(sketch(write(tmp_path / "codes.safetensors", codes)), ref) > 10


def test_an_unusable_scale_leaves_the_weight_unscaled_with_a_note(tmp_path: Path) -> None:
    w = np.ones((64, 256), dtype=np.float32)
    bad = {"x.weight": ("F8_E4M3", w.shape, _f8_e4m3(w).tobytes()),
           "x.scale_weight": f32(np.full((3, 5), 2.0, dtype=np.float32))}
    fp = fingerprint_file(write(tmp_path / "bad.safetensors", bad))
    assert any("unreadable weight scales" in n for n in fp.notes)
    inf = {"x.weight": bad["x.weight"], "x.scale_weight": f32(np.array(np.inf, dtype=np.float32))}
    fp = fingerprint_file(write(tmp_path / "inf.safetensors", inf))
    assert any("unreadable weight scales" in n for n in fp.notes)
