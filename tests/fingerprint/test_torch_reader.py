"""The PyTorch readers: agreement with what torch saved, and hostile structure.

The fixtures under tests/fixtures/torch/ were written by torch itself
(tests/fixtures/make_torch_fixtures.py); expected.json holds what torch saw. The
hand-made files come from tests/fixtures/torch_pickles.py.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

import blake3
import numpy as np
import pytest

from modelhash.errors import (
    MalformedFileError,
    ModelhashError,
    ResourceLimitError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from modelhash.fingerprint import fingerprint_file, fingerprint_path
from modelhash.fingerprint._formats import _torch, parse_file
from modelhash.fingerprint._formats._torch import TorchLegacyReader
from modelhash.fingerprint._model import ParsedFile, TensorRecord
from tests.fixtures.torch_pickles import (
    dct,
    glob,
    integer,
    legacy_bytes,
    lst,
    pickled,
    set_central_size,
    tensor,
    text,
    torch_zip,
    tup,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "torch"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
STATE = EXPECTED["state_dict"]

CHECKPOINTS = {
    "model_zip.pt": ("torch-zip", ""),
    "model_zip_proto4.pt": ("torch-zip", ""),
    "model_legacy.pt": ("torch-legacy", ""),
    "model_legacy_proto4.pt": ("torch-legacy", ""),
    "model_lightning.ckpt": ("torch-zip", ""),
    "model_module_prefix.pt": ("torch-zip", "module."),
}


def tensor_bytes(path: Path, t: TensorRecord) -> bytes:
    if t.span is not None:
        with path.open("rb") as fh:
            fh.seek(t.span[0])
            return fh.read(t.span[1])
    assert t.materialize is not None
    return b"".join(t.materialize())


def by_name(parsed: ParsedFile) -> dict[str, TensorRecord]:
    return {t.name: t for t in parsed.tensors}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_checkpoints_match_what_torch_saved(name: str) -> None:
    fmt, prefix = CHECKPOINTS[name]
    path = FIXTURES / name
    parsed = parse_file(path)
    assert parsed.format == fmt
    assert sorted(t.name for t in parsed.tensors) == sorted(prefix + n for n in STATE)
    for t in parsed.tensors:
        want = STATE[t.name.removeprefix(prefix)]
        assert t.dtype == want["dtype"], t.name
        assert list(t.shape) == want["shape"], t.name
        data = tensor_bytes(path, t)
        assert len(data) == t.nbytes
        assert blake3.blake3(data).hexdigest() == want["blake3"], t.name


@pytest.mark.parametrize("name", ["model_zip.pt", "model_legacy.pt"])
def test_only_strided_views_are_materialized(name: str) -> None:
    tensors = by_name(parse_file(FIXTURES / name))
    assert tensors["out.weight_t"].span is None
    assert tensors["out.weight_t"].materialize is not None
    assert all(t.span is not None for n, t in tensors.items() if n != "out.weight_t")
    assert tensors["embed.weight"].span == tensors["head.weight"].span
    q, k = tensors["attn.q"].span, tensors["attn.k"].span
    assert q is not None and k is not None and k[0] == q[0] + q[1]


def test_lightning_checkpoint_reads_only_its_state_dict() -> None:
    parsed = parse_file(FIXTURES / "model_lightning.ckpt")
    assert len(parsed.tensors) == len(STATE)
    (note,) = parsed.notes
    assert "'state_dict'" in note
    assert "optimizer_states" in note and "epoch" in note


@pytest.mark.parametrize("name", ["embedding.pt", "embedding_paramdict.pt"])
def test_textual_inversion_embeddings(name: str) -> None:
    path = FIXTURES / name
    parsed = parse_file(path)
    (t,) = parsed.tensors
    want = EXPECTED["embedding"]["string_to_param.*"]
    assert (t.name, t.dtype, list(t.shape)) == ("string_to_param.*", "F32", want["shape"])
    assert blake3.blake3(tensor_bytes(path, t)).hexdigest() == want["blake3"]
    assert any("non-tensor entries" in n and "name" in n for n in parsed.notes)


def test_what_torch_writes_around_tensors() -> None:
    path = FIXTURES / "extras.pt"
    parsed = parse_file(path)
    want = EXPECTED["extras"]
    assert sorted(t.name for t in parsed.tensors) == sorted(want)
    for t in parsed.tensors:
        assert (t.dtype, list(t.shape)) == (want[t.name]["dtype"], want[t.name]["shape"])
        assert blake3.blake3(tensor_bytes(path, t)).hexdigest() == want[t.name]["blake3"]
    (note,) = parsed.notes
    for name in ("size.0", "device", "ids", "array", "scalar"):
        assert name in note


@pytest.mark.parametrize(("name", "kind"), [("quantized.pt", "quantized"), ("sparse.pt", "sparse")])
def test_tensor_kinds_we_do_not_read(name: str, kind: str) -> None:
    with pytest.raises(MalformedFileError, match=rf"unsupported tensor type \({kind}\)"):
        parse_file(FIXTURES / name)


def test_pickled_module_is_unsafe() -> None:
    with pytest.raises(UnsafeFileError) as info:
        parse_file(FIXTURES / "full_module.pt")
    assert info.value.globals == ["torch.nn.modules.linear.Linear"]


def test_content_hash_does_not_depend_on_the_container() -> None:
    reference = fingerprint_file(FIXTURES / "model.safetensors").content
    for name in (
        "model_zip.pt",
        "model_zip_proto4.pt",
        "model_legacy.pt",
        "model_legacy_proto4.pt",
        "model_lightning.ckpt",
        "model_module_prefix.pt",
    ):
        assert fingerprint_file(FIXTURES / name).content == reference, name
    (sharded,) = fingerprint_path(FIXTURES / "sharded")
    assert sharded.fingerprint is not None
    assert sharded.fingerprint.content == reference
    assert fingerprint_file(FIXTURES / "sharded").content == reference


# Hand-made checkpoints.

VALUES = np.arange(12, dtype="<f4").reshape(3, 4) / 8


def simple_state(**extra: bytes) -> bytes:
    pairs = [(text("w"), tensor("0", (3, 4))), (text("wt"), tensor("0", (4, 3), (1, 4)))]
    pairs += [(text(k), v) for k, v in extra.items()]
    return pickled(dct(*pairs))


def test_big_endian_zip_is_byteswapped_to_little_endian(tmp_path: Path) -> None:
    c64 = (np.arange(4) + 1j * np.arange(4)).astype("<c8")
    halves = np.arange(6, dtype="<f2")
    data = pickled(
        dct(
            (text("w"), tensor("0", (3, 4))),
            (text("wt"), tensor("0", (4, 3), (1, 4))),
            (text("c"), tensor("1", (4,), storage_type="ComplexFloatStorage")),
            (text("h"), tensor("2", (2, 3), storage_type="HalfStorage")),
            (text("b"), tensor("3", (3,), storage_type="ByteStorage")),
        )
    )
    storages_be = {
        "0": VALUES.astype(">f4").tobytes(),
        "1": c64.astype(">c8").tobytes(),
        "2": halves.astype(">f2").tobytes(),
        "3": bytes([1, 2, 3]),
    }
    path = torch_zip(tmp_path / "be.pt", data, storages_be, byteorder="big")
    got = {t.name: tensor_bytes(path, t) for t in parse_file(path).tensors}
    assert got["w"] == VALUES.tobytes()
    assert got["wt"] == np.ascontiguousarray(VALUES.T).tobytes()
    assert got["c"] == c64.tobytes()
    assert got["h"] == halves.tobytes()
    assert got["b"] == bytes([1, 2, 3])


def test_deflated_entries_are_inflated(tmp_path: Path) -> None:
    path = torch_zip(tmp_path / "z.pt", simple_state(), {"0": VALUES.tobytes()}, compress=True)
    tensors = by_name(parse_file(path))
    assert all(t.span is None for t in tensors.values())
    assert tensor_bytes(path, tensors["w"]) == VALUES.tobytes()
    assert tensor_bytes(path, tensors["wt"]) == np.ascontiguousarray(VALUES.T).tobytes()


def test_zip64_local_headers(tmp_path: Path) -> None:
    path = tmp_path / "z64.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", simple_state())
        with zf.open("archive/data/0", "w", force_zip64=True) as fh:
            fh.write(VALUES.tobytes())
    tensors = by_name(parse_file(path))
    assert tensors["w"].span is not None
    assert tensor_bytes(path, tensors["w"]) == VALUES.tobytes()


def test_materialize_chunks_large_strided_views(tmp_path: Path) -> None:
    big = np.arange(600 * 700, dtype="<f4").reshape(600, 700)
    data = pickled(dct((text("t"), tensor("0", (700, 600), (1, 700)))))
    path = torch_zip(tmp_path / "t.pt", data, {"0": big.tobytes()})
    (t,) = parse_file(path).tensors
    assert t.materialize is not None
    pieces = list(t.materialize())
    assert len(pieces) > 1
    assert b"".join(pieces) == np.ascontiguousarray(big.T).tobytes()


def test_top_level_list_and_non_tensor_leaves(tmp_path: Path) -> None:
    data = pickled(lst(tensor("0", (3, 4)), integer(7), dct((text("a"), tensor("0", (12,))))))
    path = torch_zip(tmp_path / "l.pt", data, {"0": VALUES.tobytes()})
    parsed = parse_file(path)
    assert [t.name for t in parsed.tensors] == ["0", "2.a"]
    assert parsed.notes == ["ignored 1 non-tensor entries: 1"]


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "module", "model", "params_ema"])
def test_wrapper_keys_are_followed(tmp_path: Path, key: str) -> None:
    inner = dct((text("w"), tensor("0", (3, 4))))
    other = dct((text("x"), tensor("0", (12,))))
    data = pickled(dct((text("optimizer"), other), (text(key), inner), (text("step"), integer(3))))
    path = torch_zip(tmp_path / "w.pt", data, {"0": VALUES.tobytes()})
    parsed = parse_file(path)
    assert [t.name for t in parsed.tensors] == ["w"]
    assert "optimizer" in parsed.notes[0] and "step" in parsed.notes[0]


def test_params_ema_wins_over_params(tmp_path: Path) -> None:
    data = pickled(
        dct(
            (text("params"), dct((text("a"), tensor("0", (3, 4))))),
            (text("params_ema"), dct((text("b"), tensor("0", (3, 4))))),
        )
    )
    path = torch_zip(tmp_path / "e.pt", data, {"0": VALUES.tobytes()})
    assert [t.name for t in parse_file(path).tensors] == ["b"]


def test_safetensors_is_not_claimed_by_the_legacy_reader(tmp_path: Path) -> None:
    header = b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'.ljust(0x280)
    head = struct.pack("<Q", len(header)) + header
    assert head[:2] == b"\x80\x02"
    assert not TorchLegacyReader().sniff(head[:64], tmp_path / "x.bin")
    path = tmp_path / "x.safetensors"
    path.write_bytes(head + b"\x01")
    assert parse_file(path).format == "safetensors"


def test_zip_without_data_pkl_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/other.txt", "hi")
    with pytest.raises(UnsupportedFormatError, match=r"zip file without data\.pkl"):
        parse_file(path)


def test_plain_pickle_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "p.pt"
    path.write_bytes(pickled(dct((text("a"), integer(1)))))
    with pytest.raises(MalformedFileError, match="magic number"):
        parse_file(path)


BAD_ZIP_STATES = {
    "outside storage": (tensor("0", (3, 4), offset=1), "outside its storage"),
    "storage larger than entry": (tensor("0", (4, 4)), "claims 16 elements"),
    "missing storage entry": (tensor("9", (3, 4)), "no data/9 entry"),
    "quantized storage": (tensor("0", (3, 4), storage_type="QInt8Storage"), "unsupported tensor type torch.qint8"),
    "quantized rebuild": (
        glob("torch._utils", "_rebuild_qtensor") + tup() + b"R",
        "unsupported tensor type (quantized)",
    ),
    "negative offset": (tensor("0", (3, 4), offset=-1), "non-negative"),
    "pid not a tuple": (text("storage") + b"Q", "unexpected persistent id"),
    "pid of wrong shape": (tup(text("storage"), text("0")) + b"Q", "unexpected persistent id"),
    "pid with a bad storage type": (
        tup(text("storage"), text("FloatStorage"), text("0"), text("cpu"), integer(12)) + b"Q",
        "malformed storage persistent id",
    ),
    "size and stride differ": (tensor("0", (3, 4), (1,)), "differ in length"),
}


@pytest.mark.parametrize("case", sorted(BAD_ZIP_STATES))
def test_bad_tensor_structure_is_malformed(tmp_path: Path, case: str) -> None:
    body, needle = BAD_ZIP_STATES[case]
    path = torch_zip(tmp_path / "b.pt", pickled(dct((text("x"), body))), {"0": VALUES.tobytes()})
    with pytest.raises(MalformedFileError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_file(path)


def test_quantized_tensor_outside_the_state_dict_is_ignored(tmp_path: Path) -> None:
    data = pickled(
        dct(
            (text("state_dict"), dct((text("w"), tensor("0", (3, 4))))),
            (text("optimizer"), glob("torch._utils", "_rebuild_qtensor") + tup() + b"R"),
        )
    )
    path = torch_zip(tmp_path / "q.pt", data, {"0": VALUES.tobytes()})
    assert [t.name for t in parse_file(path).tensors] == ["w"]


def test_broadcast_amplification_is_refused(tmp_path: Path) -> None:
    huge = tensor("0", (2**40, 2**40), (0, 0), numel=12)
    path = torch_zip(tmp_path / "a.pt", pickled(dct((text("x"), huge))), {"0": VALUES.tobytes()})
    with pytest.raises(ResourceLimitError, match="claim"):
        parse_file(path)


def test_many_overlapping_views_are_refused(tmp_path: Path) -> None:
    data = np.zeros(1 << 18, dtype="<f4").tobytes()
    views = [(text(f"v{i}"), tensor("0", (1 << 17,), offset=i, numel=1 << 18)) for i in range(40)]
    path = torch_zip(tmp_path / "o.pt", pickled(dct(*views)), {"0": data})
    with pytest.raises(ResourceLimitError, match="claim"):
        parse_file(path)


def test_tied_views_do_not_count_as_amplification(tmp_path: Path) -> None:
    data = np.zeros(1 << 18, dtype="<f4").tobytes()
    views = [(text(f"v{i}"), tensor("0", (1 << 18,))) for i in range(40)]
    path = torch_zip(tmp_path / "t.pt", pickled(dct(*views)), {"0": data})
    assert len(parse_file(path).tensors) == 40


def test_huge_claimed_storage_allocates_nothing(tmp_path: Path) -> None:
    body = tensor("0", (2**30, 2**30), numel=2**62)
    path = torch_zip(tmp_path / "h.pt", pickled(dct((text("x"), body))), {"0": VALUES.tobytes()})
    with pytest.raises(MalformedFileError, match="claims"):
        parse_file(path)


def test_deep_nesting_is_malformed(tmp_path: Path) -> None:
    depth = 100_000
    data = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    path = torch_zip(tmp_path / "d.pt", data, {})
    with pytest.raises(MalformedFileError, match="nested deeper"):
        parse_file(path)


def test_overlapping_zip_entries_are_refused(tmp_path: Path) -> None:
    data = simple_state()
    inner = _local_header("archive/data/1", b"\0" * 48) + b"\0" * 48
    outer = _local_header("archive/data/0", inner) + inner
    pkl = _local_header("archive/data.pkl", data) + data
    entries = [("archive/data.pkl", data, 0), ("archive/data/0", inner, len(pkl))]
    entries.append(("archive/data/1", b"\0" * 48, len(pkl) + 30 + len("archive/data/0")))
    path = tmp_path / "overlap.pt"
    path.write_bytes(pkl + outer + _central(entries, len(pkl) + len(outer)))
    with pytest.raises(MalformedFileError, match="overlap"):
        parse_file(path)


def _local_header(name: str, data: bytes) -> bytes:
    crc = zlib.crc32(data)
    return struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(data), len(data), len(name), 0
    ) + name.encode()


def _central(entries: list[tuple[str, bytes, int]], at: int) -> bytes:
    out = b""
    for name, data, offset in entries:
        crc = zlib.crc32(data)
        out += struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc, len(data),
            len(data), len(name), 0, 0, 0, 0, 0, offset,
        ) + name.encode()
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(out), at, 0)
    return out + end


def test_zip_bomb_storage_is_refused(tmp_path: Path) -> None:
    zeros = bytes(64 * 1024 * 1024)
    data = pickled(dct((text("x"), tensor("0", (len(zeros) // 4,)))))
    path = torch_zip(tmp_path / "bomb.pt", data, {"0": zeros}, compress=True)
    assert path.stat().st_size < 1024 * 1024
    with pytest.raises(ResourceLimitError, match="inflates"):
        parse_file(path)


@pytest.mark.parametrize("compress", [False, True])
def test_oversized_data_pkl_is_refused(tmp_path: Path, compress: bool) -> None:
    path = torch_zip(tmp_path / "big.pt", simple_state(), {"0": VALUES.tobytes()}, compress=compress)
    set_central_size(path, "archive/data.pkl", 300 * 1024 * 1024)
    with pytest.raises(ResourceLimitError, match=r"data\.pkl"):
        parse_file(path)


def test_legacy_pickle_larger_than_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_torch, "MAX_PICKLE_BYTES", 4096)
    main = pickled(lst(*[text("x" * 64)] * 200))
    path = tmp_path / "big.pt"
    path.write_bytes(legacy_bytes(main, []))
    with pytest.raises(ResourceLimitError, match="does not end within"):
        parse_file(path)


def legacy_state() -> bytes:
    return pickled(dct((text("w"), tensor("k0", (3, 4), legacy=True)), (text("s"), integer(1))))


def test_legacy_hand_made_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "l.pt"
    path.write_bytes(legacy_bytes(legacy_state(), [("k0", 12, VALUES.tobytes())]) + b"tail")
    parsed = parse_file(path)
    (t,) = parsed.tensors
    assert tensor_bytes(path, t) == VALUES.tobytes()
    assert "ignored 4 bytes after the last storage" in parsed.notes


def test_legacy_storage_views(tmp_path: Path) -> None:
    view = tensor("k0", (4,), legacy=True, numel=12, view=("v1", 4, 4))
    path = tmp_path / "v.pt"
    path.write_bytes(legacy_bytes(pickled(dct((text("v"), view))), [("k0", 12, VALUES.tobytes())]))
    (t,) = parse_file(path).tensors
    assert tensor_bytes(path, t) == VALUES[1].tobytes()


LEGACY_BAD = {
    "count mismatch": ([("k0", 11, VALUES.tobytes()[:44])], None, "holds 11 elements"),
    "truncated storage": ([("k0", 12, VALUES.tobytes()[:40])], None, "truncated"),
    "unknown key": ([("k0", 12, VALUES.tobytes())], ["k0", "zz"], "never used"),
    "repeated key": ([("k0", 12, VALUES.tobytes())], ["k0", "k0"], "repeats"),
    "missing storage": ([], [], "has no data"),
}


@pytest.mark.parametrize("case", sorted(LEGACY_BAD))
def test_legacy_inconsistencies_are_malformed(tmp_path: Path, case: str) -> None:
    storages, keys, needle = LEGACY_BAD[case]
    path = tmp_path / "bad.pt"
    path.write_bytes(legacy_bytes(legacy_state(), storages, keys))
    with pytest.raises(MalformedFileError, match=needle):
        parse_file(path)


@pytest.mark.parametrize("name", ["model_zip.pt", "model_legacy.pt", "model_lightning.ckpt"])
def test_truncated_checkpoints_fail_cleanly(tmp_path: Path, name: str) -> None:
    blob = (FIXTURES / name).read_bytes()
    cut_path = tmp_path / name
    step = max(1, len(blob) // 160)
    for cut in range(1, len(blob), step):
        cut_path.write_bytes(blob[:cut])
        try:
            parsed = parse_file(cut_path)
        except ModelhashError:
            continue
        for t in parsed.tensors:
            assert len(tensor_bytes(cut_path, t)) == t.nbytes
