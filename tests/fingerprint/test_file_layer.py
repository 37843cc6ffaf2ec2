"""Known answers for every model-site hash, and independence from the chunk size."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelhash.fingerprint._pass import file_layer_work, run_pass

HELLO = {
    "sha256": "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9",
    "autov2": "b94d27b993",
    "blake3": "d74981efa70a0c880b8d8c1985d075dbcbf679b99a5f9914e5aaf96b831a9e24",
    "crc32": "85114a0d",
    "autov1": None,
    "autov3": None,
}

# bytes(range(256)) * 12288: 3 MiB, so AutoV1 is defined. Values from coreutils
# sha256sum (whole file and `dd bs=65536 skip=16 count=1`) and zlib.
BIG = {
    "sha256": "f6dd7fec8584ad00219a447071c1fa368a1caee4d9c146083d233713ddccd2c0",
    "autov2": "f6dd7fec85",
    "autov1": "7daca209",
    "blake3": "3882ee192c02d2b2886b5ee82eced39f1a739b32d08a770a3ce4dc85ca573484",
    "crc32": "56b4444f",
}


def hash_bytes(tmp_path: Path, data: bytes, autov3_offset: int | None = None, chunk: int = 1 << 20, threads: int | None = None) -> dict[str, object]:
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    works, finish = file_layer_work(p, len(data), autov3_offset)
    run_pass(p, len(data), works, chunk=chunk, threads=threads)
    out = finish().to_json()
    del out["path"], out["size"]
    return out


def test_hello_world_known_answers(tmp_path: Path) -> None:
    assert hash_bytes(tmp_path, b"hello world") == HELLO


def test_civitai_crc32_is_zlib_reversed(tmp_path: Path) -> None:
    # zlib.crc32(b"hello world") == 0x0D4A1185; Civitai prints 85114A0D.
    assert hash_bytes(tmp_path, b"hello world")["crc32"] == "85114a0d"


def test_over_two_mib_known_answers(tmp_path: Path) -> None:
    out = hash_bytes(tmp_path, bytes(range(256)) * 12288)
    for k, v in BIG.items():
        assert out[k] == v, k


def test_autov1_absent_just_under_two_mib(tmp_path: Path) -> None:
    assert hash_bytes(tmp_path, b"\0" * (2 * 1024 * 1024 - 1))["autov1"] is None
    assert hash_bytes(tmp_path, b"\0" * (2 * 1024 * 1024))["autov1"] is not None


def test_autov3_hashes_after_the_header(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\x01\x02\x03\x04"
    # sha256(b"\x01\x02\x03\x04") from coreutils: 9f64a747e1b97f13...
    assert hash_bytes(tmp_path, data, 8 + len(header))["autov3"] == "9f64a747e1b9"


def test_engine_uses_the_16_mib_rule(tmp_path: Path) -> None:
    from modelhash.fingerprint._formats._safetensors import AUTOV3_HEADER_LIMIT, SafetensorsReader

    header = json.dumps({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    big = header + b" " * (AUTOV3_HEADER_LIMIT - len(header))
    p = tmp_path / "big-header.safetensors"
    p.write_bytes(struct.pack("<Q", len(big)) + big + b"\x07")
    with p.open("rb") as fh:
        parsed = SafetensorsReader().parse(p, p.stat().st_size, fh)
    assert parsed.autov3_offset == 8


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=5000), chunk=st.integers(min_value=1, max_value=700), threads=st.integers(min_value=1, max_value=6))
def test_digests_do_not_depend_on_chunk_size_or_threads(tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk: int, threads: int) -> None:
    tmp = tmp_path_factory.mktemp("chunks")
    offset = min(len(data), 13)
    want = hash_bytes(tmp, data, offset, chunk=1 << 20, threads=1)
    assert hash_bytes(tmp, data, offset, chunk=chunk, threads=threads) == want
