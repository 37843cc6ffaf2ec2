"""The GGUF reader: agreement with the reference ``gguf`` package, and hostile files.

Valid files are written with the package's own ``GGUFWriter`` and read back with
its ``GGUFReader`` as the oracle. Hostile files are assembled byte by byte, so each
test names exactly the field it breaks.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelhash.errors import MalformedFileError, ResourceLimitError, UnsupportedFormatError
from modelhash.fingerprint._formats import _gguf
from modelhash.fingerprint._formats._gguf import GGML_TYPES, GgufReader
from modelhash.fingerprint._model import DTYPE_SIZES, ParsedFile

Q = gguf.GGMLQuantizationType
ALLOWED = (MalformedFileError, UnsupportedFormatError)

# GGUF value type ids.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def parse_bytes(blob: bytes) -> ParsedFile:
    return GgufReader().parse(Path("x.gguf"), len(blob), io.BytesIO(blob))


def parse_path(path: Path) -> ParsedFile:
    with path.open("rb") as fh:
        return GgufReader().parse(path, path.stat().st_size, fh)


def quant_bytes(rows: int, cols: int, qtype: Q, seed: int = 0) -> np.ndarray:
    """Random raw bytes shaped as GGUFWriter expects for a quantised (rows, cols) tensor."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (rows, cols // block * type_size), dtype=np.uint8)


Tensors = Sequence[tuple[str, np.ndarray, Q | None]]


def write_gguf(
    path: Path,
    tensors: Tensors,
    kv: Callable[[gguf.GGUFWriter], None] | None = None,
    *,
    alignment: int | None = None,
    endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
) -> Path:
    w = gguf.GGUFWriter(path, "llama", endianess=endianess)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    if kv is not None:
        kv(w)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def mixed_tensors() -> list[tuple[str, np.ndarray, Q | None]]:
    rng = np.random.default_rng(1)
    return [
        ("token_embd.weight", rng.standard_normal((8, 64)).astype(np.float32), None),
        ("blk.0.attn_q.weight", quant_bytes(4, 64, Q.Q8_0), Q.Q8_0),
        ("blk.0.ffn_gate.weight", quant_bytes(2, 256, Q.Q4_K, 2), Q.Q4_K),
        ("blk.0.ffn_down.weight", quant_bytes(3, 512, Q.Q6_K, 3), Q.Q6_K),
        ("blk.0.attn_k.weight", quant_bytes(2, 32, Q.Q4_0, 4), Q.Q4_0),
        ("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float16), None),
        ("blk.0.attn_v.weight", quant_bytes(5, 16, Q.BF16, 5), Q.BF16),
        ("ids", np.arange(5, dtype=np.int32), None),
        ("big_ids", np.arange(3, dtype=np.int64), None),
        ("small", np.arange(6, dtype=np.int8).reshape(2, 3), None),
        ("halfs", np.arange(4, dtype=np.int16), None),
        ("doubles", np.ones((2, 2, 2), dtype=np.float64), None),
    ]


def all_kinds_of_metadata(w: gguf.GGUFWriter) -> None:
    w.add_name("tiny test model")
    w.add_string("general.license", "apache-2.0")
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_uint8("t.u8", 1)
    w.add_int8("t.i8", -1)
    w.add_uint16("t.u16", 2)
    w.add_int16("t.i16", -2)
    w.add_uint32("t.u32", 3)
    w.add_int32("t.i32", -3)
    w.add_float32("t.f32", 0.5)
    w.add_bool("t.bool", True)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 0.25)
    w.add_token_list(["<s>", "</s>", "hello", "wörld"])
    w.add_token_scores([0.0, 0.0, -1.5, -2.5])
    w.add_array("t.nested", [[1, 2, 3], [4]])
    w.add_array("t.nested_strings", [["a", "b"], ["c"]])
    w.add_array("general.tags", ["x", "y"])


@pytest.fixture
def mixed_file(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "mixed.gguf", mixed_tensors(), all_kinds_of_metadata)


def assert_matches_reference(path: Path, parsed: ParsedFile) -> None:
    ref = gguf.GGUFReader(path)
    blob = path.read_bytes()
    assert parsed.format == "gguf"
    assert parsed.size == len(blob)
    assert [t.name for t in parsed.tensors] == [t.name for t in ref.tensors]
    for ours, theirs in zip(parsed.tensors, ref.tensors, strict=True):
        assert ours.dtype == Q(theirs.tensor_type).name
        assert ours.shape == tuple(reversed([int(d) for d in theirs.shape]))
        assert ours.span == (theirs.data_offset, theirs.n_bytes)
        assert ours.nbytes == theirs.n_bytes
        begin, length = ours.span
        assert blob[begin : begin + length] == theirs.data.tobytes()


def test_tensors_match_the_reference_reader(mixed_file: Path) -> None:
    parsed = parse_path(mixed_file)
    assert_matches_reference(mixed_file, parsed)
    assert parsed.notes == []
    by_name = {t.name: t for t in parsed.tensors}
    assert by_name["blk.0.attn_q.weight"].dtype == "Q8_0"
    assert by_name["blk.0.attn_q.weight"].shape == (4, 64)
    assert by_name["blk.0.attn_q.weight"].nbytes == 4 * 2 * 34
    assert by_name["blk.0.ffn_gate.weight"].shape == (2, 256)
    assert by_name["blk.0.attn_v.weight"].shape == (5, 16)
    assert by_name["doubles"].dtype == "F64"


def test_only_short_general_strings_become_metadata(mixed_file: Path) -> None:
    assert parse_path(mixed_file).metadata == {
        "general.architecture": "llama",
        "general.name": "tiny test model",
        "general.license": "apache-2.0",
    }


def test_custom_alignment_is_honoured(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "a.gguf", mixed_tensors(), alignment=64)
    parsed = parse_path(path)
    assert_matches_reference(path, parsed)
    assert all((t.span or (0, 0))[0] % 64 == 0 for t in parsed.tensors)


def test_version_2_has_the_same_layout(mixed_file: Path) -> None:
    blob = bytearray(mixed_file.read_bytes())
    blob[4:8] = struct.pack("<I", 2)
    assert parse_bytes(bytes(blob)).tensors == parse_path(mixed_file).tensors


def test_a_file_without_tensors_parses(tmp_path: Path) -> None:
    parsed = parse_path(write_gguf(tmp_path / "empty.gguf", [], all_kinds_of_metadata))
    assert parsed.tensors == []
    assert parsed.metadata["general.name"] == "tiny test model"


def test_big_endian_files_are_refused(tmp_path: Path) -> None:
    tensors = [("w", np.ones((2, 4), dtype=np.float32), None)]
    path = write_gguf(tmp_path / "be.gguf", tensors, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(MalformedFileError, match="big-endian GGUF is not supported"):
        parse_path(path)


@pytest.mark.parametrize("version", [0, 1, 4, 0xDEAD])
def test_other_versions_are_unsupported(version: int) -> None:
    blob = b"GGUF" + struct.pack("<IQQ", version, 0, 0)
    with pytest.raises(UnsupportedFormatError, match=f"version {version}"):
        parse_bytes(blob)


def test_type_table_agrees_with_the_reference_package() -> None:
    for qtype, (block, type_size) in gguf.GGML_QUANT_SIZES.items():
        assert GGML_TYPES[int(qtype)] == (qtype.name, block, type_size)
    for name, block, type_size in GGML_TYPES.values():
        if block == 1:
            assert DTYPE_SIZES[name] == type_size


def test_sniff() -> None:
    reader = GgufReader()
    assert reader.sniff(b"GGUF\x03\x00\x00\x00", Path("m.bin"))
    assert not reader.sniff(b"\x10\x00\x00\x00\x00\x00\x00\x00{", Path("m.gguf"))


def test_fingerprint_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("modelhash.fingerprint._formats._torch")
    from modelhash.fingerprint import fingerprint_file

    path = write_gguf(tmp_path / "m.gguf", mixed_tensors(), all_kinds_of_metadata)
    fp = fingerprint_file(path)
    assert fp.format == "gguf"
    assert fp.metadata["general.name"] == "tiny test model"
    assert (fp.model.kind, fp.model.architecture) == ("checkpoint", "llama")
    assert fp.model.dtypes["Q8_0"] == 1
    by_name = {t.name: t for t in fp.tensors}
    assert by_name["blk.0.attn_q.weight"].shape == (4, 64)


# Hand-assembled files for hostile cases.


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def info(name: str | bytes, ne: Sequence[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    dims = b"".join(struct.pack("<Q", d) for d in ne)
    return gstr(name) + struct.pack("<I", len(ne)) + dims + struct.pack("<IQ", ggml_type, offset)


def assemble(
    kvs: Sequence[bytes] = (),
    infos: Sequence[bytes] = (),
    data: bytes = b"",
    *,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    align: int = 32,
) -> bytes:
    head = b"GGUF" + struct.pack(
        "<IQQ",
        3,
        len(infos) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    head += b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % align)
    return head + data


def test_hand_assembled_files_agree_with_the_reference(tmp_path: Path) -> None:
    blob = assemble(
        [kv("general.name", STR, gstr("hand"))],
        [info("a", [4, 2], 0, 0), info("b", [32], 8, 32)],
        bytes(32) + bytes(34),
    )
    path = tmp_path / "hand.gguf"
    path.write_bytes(blob)
    assert_matches_reference(path, parse_bytes(blob))


HOSTILE: dict[str, tuple[bytes, type[Exception], str]] = {
    "bad magic": (b"GGML" + bytes(20), MalformedFileError, "bad magic"),
    "short header": (b"GGUF\x03\x00\x00\x00\x01", MalformedFileError, "truncated"),
    "huge tensor count": (assemble(n_tensors=2**64 - 1), ResourceLimitError, "tensor count"),
    "tensor count past the file": (assemble(n_tensors=1000), MalformedFileError, "truncated"),
    "huge kv count": (assemble(n_kv=2**63), MalformedFileError, "truncated"),
    "huge key length": (
        b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**63) + bytes(16),
        MalformedFileError,
        "truncated",
    ),
    "huge string value": (
        assemble([kv("general.name", STR, struct.pack("<Q", 2**62))]),
        MalformedFileError,
        "truncated",
    ),
    "huge skipped string value": (
        assemble([kv("x", STR, struct.pack("<Q", 2**64 - 1))]),
        MalformedFileError,
        "truncated",
    ),
    "huge fixed-size array": (
        assemble([kv("x", ARR, struct.pack("<IQ", U64, 2**61))]),
        MalformedFileError,
        "truncated",
    ),
    "huge string array": (
        assemble([kv("x", ARR, struct.pack("<IQ", STR, 2**40))]),
        MalformedFileError,
        "truncated",
    ),
    "arrays nested too deep": (
        assemble([kv("x", ARR, struct.pack("<IQ", ARR, 1) * 9 + struct.pack("<IQ", U8, 0))]),
        ResourceLimitError,
        "nested",
    ),
    "unknown value type": (
        assemble([kv("x", 13, b"")]),
        MalformedFileError,
        "unknown value type 13",
    ),
    "unknown array item type": (
        assemble([kv("x", ARR, struct.pack("<IQ", 99, 0))]),
        MalformedFileError,
        "unknown value type 99",
    ),
    "duplicate key": (
        assemble([kv("x", U8, b"\1"), kv("x", U8, b"\2")]),
        MalformedFileError,
        "duplicate metadata key",
    ),
    "key not utf-8": (
        assemble([gstr(b"\xff\xfe") + struct.pack("<I", U8) + b"\0"]),
        MalformedFileError,
        "UTF-8",
    ),
    "alignment not a power of two": (
        assemble([kv("general.alignment", U32, struct.pack("<I", 48))]),
        MalformedFileError,
        "power of two",
    ),
    "alignment zero": (
        assemble([kv("general.alignment", U32, struct.pack("<I", 0))]),
        MalformedFileError,
        "power of two",
    ),
    "alignment of the wrong type": (
        assemble([kv("general.alignment", U64, struct.pack("<Q", 64))]),
        MalformedFileError,
        "must be uint32",
    ),
    "unknown ggml type": (
        assemble([], [info("w", [4], 99)], bytes(32)),
        MalformedFileError,
        "unknown GGML type 99",
    ),
    "removed ggml type": (
        assemble([], [info("w", [32], 4)], bytes(32)),
        MalformedFileError,
        "unknown GGML type 4",
    ),
    "too many dims": (
        assemble([], [info("w", [1] * 9)], bytes(32)),
        MalformedFileError,
        "9 dimensions",
    ),
    "row not whole blocks": (
        assemble([], [info("w", [33, 32], 8)], bytes(34 * 33)),
        MalformedFileError,
        "whole number",
    ),
    "misaligned offset": (
        assemble([], [info("w", [2], 0, 4)], bytes(32)),
        MalformedFileError,
        "not aligned",
    ),
    "overlapping tensors": (
        assemble([], [info("a", [16]), info("b", [4], 0, 32)], bytes(64)),
        MalformedFileError,
        "overlaps",
    ),
    "identical spans": (
        assemble([], [info("a", [4]), info("b", [4])], bytes(32)),
        MalformedFileError,
        "overlaps",
    ),
    "truncated data": (
        assemble([], [info("a", [8]), info("b", [8], 0, 32)], bytes(40)),
        MalformedFileError,
        "truncated",
    ),
    "offset far past the end": (
        assemble([], [info("a", [8], 0, 2**63)], bytes(32)),
        MalformedFileError,
        "truncated",
    ),
    "dims whose product is astronomical": (
        assemble([], [info("a", [2**62, 2**62, 2**62])], bytes(32)),
        MalformedFileError,
        "truncated",
    ),
    "dim out of range": (
        assemble([], [info("a", [2**64 - 1])], bytes(32)),
        MalformedFileError,
        "out of range",
    ),
    "duplicate tensor names": (
        assemble([], [info("a", [4]), info("a", [4], 0, 32)], bytes(64)),
        MalformedFileError,
        "duplicate tensor name 'a'",
    ),
    "empty tensor name": (
        assemble([], [info("", [4])], bytes(32)),
        MalformedFileError,
        "empty name",
    ),
    "tensor name not utf-8": (
        assemble([], [info(b"\xc3", [4])], bytes(32)),
        MalformedFileError,
        "UTF-8",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_refused(case: str) -> None:
    blob, error, match = HOSTILE[case]
    with pytest.raises(error, match=match):
        parse_bytes(blob)


def test_metadata_entries_are_capped() -> None:
    kvs = [kv(f"general.k{i}", STR, gstr("v")) for i in range(_gguf.MAX_METADATA_ENTRIES + 5)]
    parsed = parse_bytes(assemble(kvs))
    assert len(parsed.metadata) == _gguf.MAX_METADATA_ENTRIES
    assert parsed.notes[0].startswith("5 general.* metadata strings not kept")


def test_overlong_names_hit_the_resource_limit() -> None:
    blob = assemble([], [info("n" * (_gguf.MAX_NAME + 1), [1])], bytes(32))
    with pytest.raises(ResourceLimitError, match="limit"):
        parse_bytes(blob)


@pytest.mark.parametrize(
    "items",
    [
        struct.pack("<IQ", STR, 10) + gstr("t") * 10,
        struct.pack("<IQ", ARR, 10) + struct.pack("<IQ", U8, 0) * 10,
    ],
)
def test_metadata_item_budget(monkeypatch: pytest.MonkeyPatch, items: bytes) -> None:
    monkeypatch.setattr(_gguf, "MAX_ITEMS", 10)
    blob = assemble([kv("tokens", ARR, items)])
    with pytest.raises(ResourceLimitError, match="more than 10 strings and arrays"):
        parse_bytes(blob)


def test_long_general_strings_are_skipped_with_a_note() -> None:
    blob = assemble(
        [
            kv("general.description", STR, gstr("d" * 10_000)),
            kv("general.name", STR, gstr("kept")),
        ]
    )
    parsed = parse_bytes(blob)
    assert parsed.metadata == {"general.name": "kept"}
    assert parsed.notes == [
        "1 general.* metadata strings not kept (over 4096 bytes, or past 256 entries)"
    ]


def test_unclaimed_data_is_noted() -> None:
    blob = assemble([], [info("a", [8], 0, 64)], bytes(96) + bytes(64))
    parsed = parse_bytes(blob)
    assert parsed.tensors[0].span is not None
    assert parsed.notes == ["128 bytes of the GGUF data section belong to no tensor"]


def test_split_files_say_so() -> None:
    blob = assemble(
        [kv("split.no", U16, struct.pack("<H", 1)), kv("split.count", U16, struct.pack("<H", 3))]
    )
    assert parse_bytes(blob).notes == [
        "GGUF split 2 of 3: the other splits hold the rest of the model"
    ]


def test_zero_sized_tensors_share_an_offset() -> None:
    blob = assemble([], [info("a", [0, 4]), info("b", [4, 0]), info("c", [4])], bytes(32))
    parsed = parse_bytes(blob)
    assert [t.nbytes for t in parsed.tensors] == [0, 0, 16]
    assert [t.shape for t in parsed.tensors] == [(4, 0), (0, 4), (4,)]


def test_skipped_values_are_not_loaded(tmp_path: Path) -> None:
    template = "x" * (8 * 1024 * 1024)
    vocab = [f"token{i}" for i in range(100_000)]

    def big_metadata(w: gguf.GGUFWriter) -> None:
        w.add_chat_template(template)
        w.add_token_list(vocab)
        w.add_token_scores([0.0] * len(vocab))

    path = write_gguf(tmp_path / "big.gguf", [("w", np.ones(4, np.float32), None)], big_metadata)
    tracemalloc.start()
    try:
        parsed = parse_path(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [t.name for t in parsed.tensors] == ["w"]
    assert path.stat().st_size > 9 * 1024 * 1024
    assert peak < 3 * 1024 * 1024


# Properties: whatever the bytes, parse() either succeeds with a sane result or
# raises one of the reader's own errors.


def _valid_blob() -> bytes:
    blob = assemble(
        [
            kv("general.name", STR, gstr("fuzz")),
            kv("general.alignment", U32, struct.pack("<I", 32)),
            kv("tokens", ARR, struct.pack("<IQ", STR, 3) + gstr("a") + gstr("bc") + gstr("")),
            kv(
                "nested",
                ARR,
                struct.pack("<IQ", ARR, 2)
                + struct.pack("<IQ", U16, 2)
                + bytes(4)
                + struct.pack("<IQ", F32, 1)
                + bytes(4),
            ),
            kv("flag", BOOL, b"\1"),
        ],
        [info("a", [8, 2], 0, 0), info("q", [32], 8, 64), info("h", [3], 1, 128)],
        bytes(64) + bytes(34) + bytes(30) + bytes(6),
    )
    return blob


VALID = _valid_blob()


def check_sane(parsed: ParsedFile, size: int) -> None:
    spans = sorted(t.span for t in parsed.tensors if t.span is not None)
    assert len(spans) == len(parsed.tensors)
    end = 0
    for begin, length in spans:
        assert begin >= end
        end = begin + length
    assert end <= size
    assert len({t.name for t in parsed.tensors}) == len(parsed.tensors)


def test_the_fuzz_seed_is_valid() -> None:
    parsed = parse_bytes(VALID)
    assert [t.dtype for t in parsed.tensors] == ["F32", "Q8_0", "F16"]
    check_sane(parsed, len(VALID))


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_truncation_never_escapes(n: int) -> None:
    blob = VALID[:n]
    try:
        parsed = parse_bytes(blob)
    except ALLOWED:
        return
    check_sane(parsed, n)


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    )
)
def test_mutation_never_escapes(edits: list[tuple[int, int]]) -> None:
    blob = bytearray(VALID)
    for index, value in edits:
        blob[index] = value
    try:
        parsed = parse_bytes(bytes(blob))
    except ALLOWED:
        return
    check_sane(parsed, len(blob))


@FUZZ
@given(st.binary(max_size=512))
def test_random_bodies_never_escape(body: bytes) -> None:
    blob = b"GGUF\x03\x00\x00\x00" + body
    try:
        parsed = parse_bytes(blob)
    except ALLOWED:
        return
    check_sane(parsed, len(blob))
