"""The safetensors reader: agreement with the reference library, and hostile headers."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from modelhash.errors import MalformedFileError, ResourceLimitError
from modelhash.fingerprint import fingerprint_file, fingerprint_path
from modelhash.fingerprint._formats import parse_file

from .conftest import tiny_state_dict


def raw_file(tmp_path: Path, header: object, data: bytes = b"", *, name: str = "x.safetensors", raw_header: bytes | None = None) -> Path:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return p


def test_tensors_match_the_reference_library(write_safetensors: Callable[..., Path]) -> None:
    path = write_safetensors(note="hi")
    parsed = parse_file(path)
    blob = path.read_bytes()
    assert parsed.metadata == {"note": "hi"}
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(t.name for t in parsed.tensors)
        for t in parsed.tensors:
            want = f.get_tensor(t.name)
            assert t.shape == want.shape
            assert t.span is not None
            got = blob[t.span[0] : t.span[0] + t.span[1]]
            assert got == np.ascontiguousarray(want).tobytes()


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, "trailing"),
        ({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "bad data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, b"\0" * 8, "exactly"),
        ({"w": {"dtype": "F32", "shape": [1e300], "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
        (
            {
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            "overlaps",
        ),
        (
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]},
            },
            b"\0" * 6,
            "gap",
        ),
        ({"__metadata__": {"a": 1}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "__metadata__"),
        ([1, 2], b"", "not a JSON object"),
        ({"w": "x"}, b"", "exactly"),
    ],
)
def test_broken_headers_are_refused(tmp_path: Path, header: object, data: bytes, needle: str) -> None:
    with pytest.raises(MalformedFileError, match=needle):
        parse_file(raw_file(tmp_path, header, data))


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    raw = b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    with pytest.raises(MalformedFileError, match="duplicate key"):
        parse_file(raw_file(tmp_path, None, b"\0", raw_header=raw))


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000])
def test_non_json_headers_are_refused(tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(MalformedFileError):
        parse_file(raw_file(tmp_path, None, raw_header=raw))


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 5000) + b"{}")
    with pytest.raises(MalformedFileError, match="past the end"):
        parse_file(p)


def test_absurd_header_length_reads_nothing(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(ResourceLimitError, match="limit"):
        parse_file(p)


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    (tmp_path / "e.safetensors").write_bytes(b"")
    (tmp_path / "t.safetensors").write_bytes(b"\x02\0\0")
    assert "empty file" in str(fingerprint_path(tmp_path / "e.safetensors")[0].error)
    assert "truncated" in str(fingerprint_path(tmp_path / "t.safetensors")[0].error)


def test_file_without_tensors_has_no_content_hash(tmp_path: Path) -> None:
    (out,) = fingerprint_path(raw_file(tmp_path, {"__metadata__": {"a": "b"}}))
    assert out.error is not None and "no tensors" in out.error.diagnostics()
    assert out.files and out.files[0].sha256  # the exact bytes are still hashed


def test_truncation_at_every_cut_is_an_error(tmp_path: Path, write_safetensors: Callable[..., Path]) -> None:
    full = write_safetensors().read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in range(0, len(full), 37):
        cut.write_bytes(full[:n])
        (out,) = fingerprint_path(cut)
        assert out.error is not None, n


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0, max_value=10_000), byte=st.integers(min_value=0, max_value=255), cut=st.integers(min_value=0, max_value=64))
def test_mutations_agree_with_the_reference_library(tmp_path: Path, pos: int, byte: int, cut: int) -> None:
    """Whatever one mutated byte does, we accept exactly what safetensors accepts."""
    from safetensors.numpy import save

    blob = bytearray(save(tiny_state_dict()))
    blob[pos % len(blob)] = byte
    blob = blob[: len(blob) - cut]
    p = tmp_path / "m.safetensors"
    p.write_bytes(bytes(blob))
    try:
        with safe_open(str(p), framework="numpy") as f:
            for k in f.keys():  # noqa: SIM118
                f.get_tensor(k)
        reference_ok = True
    except Exception:
        reference_ok = False
    try:
        parse_file(p)
        ours_ok = True
    except MalformedFileError:
        ours_ok = False
    assert ours_ok == reference_ok


def test_good_files_still_fingerprinted_beside_a_broken_one(tmp_path: Path, write_safetensors: Callable[..., Path]) -> None:
    write_safetensors(name="a.safetensors")
    write_safetensors(tiny_state_dict(1), name="b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{broken")
    outs = fingerprint_path(tmp_path)
    assert [Path(o.path).name for o in outs] == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert [o.ok for o in outs] == [True, True, False]
    assert fingerprint_file(tmp_path / "a.safetensors").content != fingerprint_file(tmp_path / "b.safetensors").content
