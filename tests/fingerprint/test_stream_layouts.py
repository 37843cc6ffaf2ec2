"""Where the layout layer meets the streaming pass: a Flux BFL checkpoint with a fused,
scaled-fp8 qkv, uploaded in random small chunks, sketches as the same file on disk.

The fused qkv is split into three row pieces whose rows are cut across chunks, row
blocks and stripes, and each element is multiplied by its row's scale on the way;
any slip in the targets, the scale's row index or a carried partial row shows here.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelhash._stream import Body, fingerprint_body
from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._dequant import DECODERS
from modelhash.fingerprint._engine import fingerprint_source
from modelhash.fingerprint._formats._safetensors import SafetensorsReader
from modelhash.fingerprint._pass import ChunkSource
from modelhash.fingerprint._project import BLOCK_ELEMENTS
from modelhash.fingerprint._sketch import Sketch

H = 64
"""Hidden size: qkv is 3H x H; H x 3H rows of a scaled fp8 qkv span several row blocks."""


def _e4m3(x: np.ndarray) -> bytes:
    table = DECODERS["F8_E4M3"].fn(np.arange(256, dtype=np.uint8))
    finite = np.where(np.isfinite(table), table, np.inf)
    flat = x.reshape(-1)
    # Nearest code, a slice at a time: the full distance matrix would be 256 floats
    # per weight (1.6 GB for the larger case).
    idx = np.concatenate([
        np.abs(flat[i : i + 65536].reshape(-1, 1) - finite.reshape(1, -1)).argmin(axis=1)
        for i in range(0, flat.size, 65536)
    ])
    return idx.astype(np.uint8).tobytes()


def _checkpoint(path: Path, rng: np.random.Generator, *, qkv_rows: int) -> Path:
    """A BFL-named Flux checkpoint: scale tensors first (F32 sorts first in safetensors)."""
    tensors: list[tuple[str, str, tuple[int, ...], bytes]] = []
    qkv = rng.standard_normal((qkv_rows, H)).astype(np.float32) * 0.02
    row_scale = (np.abs(qkv).max(axis=1, keepdims=True) / 448.0).astype(np.float32)
    lin1 = rng.standard_normal((7 * H, H)).astype(np.float32) * 0.03
    one_scale = np.float32(np.abs(lin1).max() / 448.0)
    tensors.append(("double_blocks.0.img_attn.qkv.weight_scale", "F32", row_scale.shape,
                    row_scale.tobytes()))
    tensors.append(("single_blocks.0.linear1.scale_weight", "F32", (), one_scale.tobytes()))
    lin2 = rng.standard_normal((H, 5 * H)).astype(np.float32) * 0.02
    lin2[:, 128:256] *= 8  # block-wise scales that differ along a row
    blocks = np.stack([np.abs(lin2[:, j : j + 128]).max(axis=1).max(keepdims=True)
                       for j in range(0, 5 * H, 128)], axis=1).astype(np.float32) / 448.0
    tensors.append(("single_blocks.0.linear2.weight_scale_inv", "F32", blocks.shape,
                    blocks.tobytes()))
    tensors.append(("single_blocks.0.linear2.weight", "F8_E4M3", lin2.shape,
                    _e4m3(lin2 / np.repeat(blocks, 128, axis=1)[:, : 5 * H])))
    tensors.append(("double_blocks.0.img_attn.qkv.weight", "F8_E4M3", qkv.shape,
                    _e4m3(qkv / row_scale)))
    tensors.append(("single_blocks.0.linear1.weight", "F8_E4M3", lin1.shape,
                    _e4m3(lin1 / one_scale)))
    for name, shape in [("double_blocks.0.img_attn.proj.weight", (H, H)),
                        ("double_blocks.0.txt_attn.qkv.weight", (3 * H, H)),
                        ("final_layer.adaLN_modulation.1.weight", (2 * H, H))]:
        w = (rng.standard_normal(shape) * 0.02).astype("<f2")
        tensors.append((name, "F16", shape, w.tobytes()))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _chunks(data: bytes, rng: np.random.Generator, most: int) -> Iterator[bytes]:
    at = 0
    while at < len(data):
        n = int(rng.integers(1, most + 1))
        yield data[at : at + n]
        at += n


def _streamed(path: Path, rng: np.random.Generator, most: int, chunk: int) -> Sketch:
    """The sketch of ``path``'s bytes as an upload of random chunks of at most ``most``
    bytes, read by the pass ``chunk`` bytes at a time (cuts inside rows)."""
    data = path.read_bytes()
    pf = SafetensorsReader().parse(Path(path.name), len(data), io.BytesIO(data))
    out = fingerprint_source(path.name, pf, ChunkSource(_chunks(data, rng, most)),
                             lambda got: None, chunk=chunk)
    assert out.error is None and out.fingerprint is not None
    assert out.fingerprint.sketch is not None
    return out.fingerprint.sketch


def _same(a: Sketch, b: Sketch) -> None:
    assert set(a.tensors) == set(b.tensors)
    assert a.notes == b.notes
    for k, t in a.tensors.items():
        assert t.shape == b.tensors[k].shape, k
        want = b.tensors[k].values
        # Streamed rows are summed in float32 in another order: rounding, no more.
        assert np.abs(t.values - want).max() <= 1e-5 * np.abs(want).max(), k


@pytest.mark.parametrize(("seed", "qkv_rows", "most", "chunk"), [
    (1, 3 * H, 61, 97),  # rows cut everywhere, one row block per piece
    (2, 3 * (BLOCK_ELEMENTS // H + 40), 65_537, 4099),  # pieces span row blocks, stripes
])
def test_streamed_flux_with_fused_scaled_qkv_sketches_as_the_file(
    tmp_path: Path, seed: int, qkv_rows: int, most: int, chunk: int
) -> None:
    rng = np.random.default_rng(seed)
    path = _checkpoint(tmp_path / "flux-fp8.safetensors", rng, qkv_rows=qkv_rows)
    on_disk = fingerprint_file(path).sketch
    assert on_disk is not None
    keys = set(on_disk.tensors)
    # The fused qkv became three canonical modules; the scaled one is not the codes.
    pieces = {k for k in keys if k.startswith("unet:transformer_blocks_0_attn_to_")}
    assert {"unet:transformer_blocks_0_attn_to_q", "unet:transformer_blocks_0_attn_to_k",
            "unet:transformer_blocks_0_attn_to_v"} <= pieces
    assert not any("skipped" in n for n in on_disk.notes), on_disk.notes
    _same(_streamed(path, rng, most, chunk), on_disk)


def test_the_upload_body_path_sketches_as_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    path = _checkpoint(tmp_path / "flux-fp8.safetensors", rng, qkv_rows=3 * H)
    data = path.read_bytes()
    out = fingerprint_body(Body(_chunks(data, rng, 1000), path.name, len(data)))
    assert out.error is None and out.fingerprint is not None
    assert out.fingerprint.sketch is not None
    on_disk = fingerprint_file(path).sketch
    assert on_disk is not None
    _same(out.fingerprint.sketch, on_disk)


def test_a_scale_stored_after_its_weight_is_still_applied_to_an_upload(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    path = _checkpoint(tmp_path / "flux-fp8.safetensors", rng, qkv_rows=3 * H)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    # Move every scale tensor's bytes to the end of the file.
    names = sorted((k for k in header if k != "__metadata__"),
                   key=lambda k: ("scale" in k, header[k]["data_offsets"][0]))
    body, moved = b"", {"__metadata__": header["__metadata__"]}
    for k in names:
        a, b = header[k]["data_offsets"]
        moved[k] = {**header[k], "data_offsets": [len(body), len(body) + b - a]}
        body += data[8 + n + a : 8 + n + b]
    blob = json.dumps(moved).encode()
    blob += b" " * (-len(blob) % 8)
    late = tmp_path / "late.safetensors"
    late.write_bytes(struct.pack("<Q", len(blob)) + blob + body)
    on_disk = fingerprint_file(late).sketch
    assert on_disk is not None
    _same(on_disk, fingerprint_file(path).sketch)  # type: ignore[arg-type]
    raw = late.read_bytes()
    out = fingerprint_body(Body(_chunks(raw, rng, 5000), late.name, len(raw)))
    assert out.error is None and out.fingerprint is not None
    assert out.fingerprint.sketch is not None
    _same(out.fingerprint.sketch, on_disk)
    # Read as a bare stream, the sketch says which weights it could not scale.
    pf = SafetensorsReader().parse(Path(late.name), len(raw), io.BytesIO(raw))
    bare = fingerprint_source(late.name, pf, ChunkSource(iter([raw])), lambda got: None)
    assert bare.fingerprint is not None and bare.fingerprint.sketch is not None
    assert any("weight scales after their weights in a stream" in note
               for note in bare.fingerprint.sketch.notes)


def test_scales_past_the_budget_are_not_held(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    from modelhash.fingerprint import _sketcher

    rng = np.random.default_rng(5)
    path = _checkpoint(tmp_path / "flux-fp8.safetensors", rng, qkv_rows=3 * H)
    # Room for linear2 (3 blocks) and linear1 (1), not also the qkv (3H row scales).
    monkeypatch.setattr(_sketcher, "MAX_SCALES_PER_FILE", 3 * H)
    sketch = fingerprint_file(path).sketch
    assert sketch is not None
    assert any("1 (weight scales too large)" in n for n in sketch.notes), sketch.notes
    data = path.read_bytes()
    out = fingerprint_body(Body(_chunks(data, rng, 3000), path.name, len(data)))
    assert out.fingerprint is not None and out.fingerprint.sketch is not None
    _same(out.fingerprint.sketch, sketch)
