"""The per-file boundary, the shared limits, and the structured adapter sketches."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from modelhash.errors import (
    InternalReadError,
    MalformedFileError,
    ResourceLimitError,
    UnsafeFileError,
    printable,
)
from modelhash.fingerprint import _project as project_module
from modelhash.fingerprint import fingerprint_path
from modelhash.fingerprint._formats import parse_file
from modelhash.fingerprint._formats._torch import TorchLegacyReader
from modelhash.fingerprint._guard import guarded
from modelhash.fingerprint._limits import check_json, read_sidecar
from modelhash.fingerprint._lora import FactorError, LoraGroup, sketch_group
from modelhash.fingerprint._pass import SpanHasher
from modelhash.fingerprint._project import project, projections
from tests.fixtures.torch_pickles import (
    MAGIC_NUMBER,
    dct,
    legacy_bytes,
    ordered_dict,
    pickled,
    tensor,
    text,
    torch_zip,
)
from tests.hostile.build_corpus import f32, st_tensors


def _good(path: Path) -> Path:
    path.write_bytes(st_tensors({"w": ("F32", [16, 16], f32(256))}))
    return path


# -- the boundary ----------------------------------------------------------------


def test_an_unexpected_exception_is_that_files_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelhash.fingerprint._formats import _safetensors

    def broken(self: object, *args: object) -> object:
        raise TypeError("a bug")

    bad = _good(tmp_path / "bad.safetensors")
    monkeypatch.setattr(_safetensors.SafetensorsReader, "parse", broken)
    (out,) = fingerprint_path(bad)
    assert isinstance(out.error, InternalReadError)
    assert "internal error while reading: TypeError: a bug" in out.error.diagnostics()
    assert out.error.__traceback__ is None and out.error.__context__ is None
    assert out.files and out.files[0].sha256  # the bytes are still hashed


def test_out_of_memory_becomes_a_limit_error_holding_no_frames() -> None:
    def boom() -> None:
        big = bytearray(1 << 20)  # noqa: F841 - what a frame would keep alive
        raise MemoryError

    with pytest.raises(ResourceLimitError) as info:
        guarded("x", boom)
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_other_files_are_still_fingerprinted(tmp_path: Path) -> None:
    _good(tmp_path / "a.safetensors")
    (tmp_path / "b\nc.safetensors").write_bytes(b"\0" * 32)
    _good(tmp_path / "d.safetensors")
    outs = fingerprint_path(tmp_path)
    assert [o.ok for o in outs] == [True, False, True]
    bad = outs[1].error
    assert bad is not None and "\n" not in bad.diagnostics() and "b\\nc" in bad.diagnostics()


def test_printable_escapes_controls_and_surrogates() -> None:
    assert printable("a\nb\x1b[0m\ud800\u2028z") == "a\\nb\\x1b[0m\\ud800\\u2028z"
    assert printable("plain") == "plain"


# -- paths -------------------------------------------------------------------------


def test_sidecars_must_be_small_regular_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    import os

    os.mkfifo(fifo)
    with pytest.raises(MalformedFileError, match="FIFO"):
        read_sidecar(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100)
    with pytest.raises(ResourceLimitError, match="too large"):
        read_sidecar(big, 99)
    assert read_sidecar(big, 100) == b"x" * 100


# -- JSON budget ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "ok_at"),
    [(b'{"a": [1, 2, {"b": "x,[{\\"}"}]}', 6), (b'"\\\\"', 1), (b'[[], [[]], {}]', 8)],
)
def test_json_values_are_counted_outside_strings(raw: bytes, ok_at: int) -> None:
    check_json("x", raw, "j", max_values=ok_at)
    with pytest.raises(ResourceLimitError):
        check_json("x", raw, "j", max_values=ok_at - 1)


def test_json_depth_is_bounded_before_parsing() -> None:
    check_json("x", b"[" * 32 + b"]" * 32, "j", max_depth=32)
    with pytest.raises(MalformedFileError, match="deeper than 32"):
        check_json("x", b"[" * 33 + b"]" * 33, "j", max_depth=32)


# -- the pass and the sketch ------------------------------------------------------


def test_span_hasher_keeps_hashers_only_while_spans_are_read() -> None:
    import blake3

    data = bytes(range(256)) * 40
    spans = [(0, 0), (5, 300), (100, 50), (10_000, 240), (10_240, 0), (300, 7000)]
    h = SpanHasher(spans)
    for off in range(0, len(data), 333):
        h(off, memoryview(data[off : off + 333]))
        assert len(h._active) <= len(spans)
    want = [blake3.blake3(data[s : s + n]).hexdigest() for s, n in spans]
    assert h.hexdigests() == want


def test_sign_matrices_do_not_depend_on_the_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    a, bt = (x.copy() for x in projections(37, 1001))
    project_module._CACHE.clear()
    monkeypatch.setattr(project_module, "_SIGN_CHUNK_BITS", 64)
    a2, bt2 = projections(37, 1001)
    assert np.array_equal(a, a2) and np.array_equal(bt, bt2)
    project_module._CACHE.clear()


def test_too_wide_a_tensor_is_skipped_not_projected() -> None:
    plan = project_module.decoder_for("F16", (2, 3_000_000))
    assert plan == "too large to sketch"


# -- adapters: structured sketches and bad factors ---------------------------------------

_G = LoraGroup("k", "m")


@pytest.mark.parametrize(("m", "n", "r1", "r2"), [(64, 48, 4, 3), (40, 100, 8, 8), (300, 20, 2, 5)])
def test_loha_sketch_equals_the_dense_deltas(m: int, n: int, r1: int, r2: int) -> None:
    rng = np.random.default_rng(m + n)
    p, q, r, s = (rng.standard_normal(x) for x in [(m, r1), (r1, n), (m, r2), (r2, n)])
    alpha = np.array(float(r1) / 2)
    got = sketch_group(_G, {"hada_w1_a": p, "hada_w1_b": q, "hada_w2_a": r, "hada_w2_b": s,
                            "alpha": alpha}, {})
    assert not isinstance(got, str)
    np.testing.assert_allclose(got.values, project((p @ q) * (r @ s)) * 0.5, atol=1e-12)


@pytest.mark.parametrize("shapes", [((4, 4), (16, 12)), ((2, 3), (50, 40)), ((8, 1), (3, 64))])
def test_lokr_sketch_equals_the_dense_kronecker(shapes: tuple[tuple[int, int], ...]) -> None:
    rng = np.random.default_rng(1)
    w1, w2 = (rng.standard_normal(s) for s in shapes)
    got = sketch_group(_G, {"lokr_w1": w1, "lokr_w2": w2}, {})
    assert not isinstance(got, str)
    np.testing.assert_allclose(got.values, project(np.kron(w1, w2)), atol=1e-12)


def test_lokr_conv_factor_matches_torch_layout() -> None:
    rng = np.random.default_rng(2)
    w1, w2 = rng.standard_normal((2, 2)), rng.standard_normal((8, 6, 3, 3))
    dense = np.kron(w1[:, :, None, None], w2).reshape(16, -1)
    got = sketch_group(_G, {"lokr_w1": w1, "lokr_w2": w2}, {})
    assert not isinstance(got, str)
    np.testing.assert_allclose(got.values, project(dense), atol=1e-12)


@pytest.mark.parametrize(
    "arrays",
    [
        {"up": np.array(1.0), "down": np.ones((2, 3))},
        {"up": np.ones((0, 2)), "down": np.ones((2, 3))},
        {"up": np.ones((4, 3)), "down": np.ones((2, 3))},
        {"hada_w1_a": np.ones((4, 2)), "hada_w1_b": np.ones((2, 8)),
         "hada_w2_a": np.ones((5, 2)), "hada_w2_b": np.ones((2, 8))},
        {"lokr_w1": np.ones((0, 2)), "lokr_w2": np.ones((4, 4))},
    ],
    ids=["0-d", "empty", "rank mismatch", "loha shapes", "lokr empty"],
)
def test_bad_factors_are_a_clear_error(arrays: dict[str, np.ndarray]) -> None:
    with pytest.raises(FactorError):
        sketch_group(_G, arrays, {})


def test_bad_factors_in_a_file_are_malformed(tmp_path: Path) -> None:
    p = tmp_path / "l.safetensors"
    p.write_bytes(st_tensors({"m.lora_up.weight": ("F32", [64, 4], f32(256)),
                              "m.lora_down.weight": ("F32", [8, 64], f32(512))}))
    (out,) = fingerprint_path(p, layers="all")
    assert isinstance(out.error, MalformedFileError)
    assert "factor shapes disagree" in out.error.diagnostics()


# -- pickles ----------------------------------------------------------------------------


def test_ordered_dict_cannot_receive_state(tmp_path: Path) -> None:
    body = ordered_dict() + b"(" + text("real") + tensor("0", [4, 4]) + b"u"
    body += dct((text("items"), ordered_dict())) + b"b"
    path = torch_zip(tmp_path / "s.pt", pickled(body), {"0": f32(16)})
    with pytest.raises(MalformedFileError, match="OrderedDict given instance state"):
        parse_file(path)


@pytest.mark.parametrize("junk", [b"X\x04\x00\x00\x00junk0", b"(X\x01\x00\x00\x00aX\x01\x00\x00\x00b1"])
def test_pop_and_pop_mark_do_not_hide_a_global(tmp_path: Path, junk: bytes) -> None:
    sg = b"X\x02\x00\x00\x00osX\x06\x00\x00\x00system" + junk + b"\x93"
    path = tmp_path / "b.pt"
    path.write_bytes(b"\x80\x04" + sg + b"(X\x01\x00\x00\x00xtR\xff")
    with pytest.raises(UnsafeFileError, match=r"os\.system"):
        parse_file(path)


def test_protocol_1_legacy_checkpoint_reads_like_protocol_2(tmp_path: Path) -> None:
    main2 = pickled(dct((text("w"), tensor("k0", [4, 4], legacy=True))))
    p2 = tmp_path / "p2.pt"
    p2.write_bytes(legacy_bytes(main2, [("k0", 16, f32(16))]))
    main1 = dct((text("w"), tensor("k0", [4, 4], legacy=True).replace(b"\x89", b"I00\n"))) + b"."
    raw1 = legacy_bytes(main1, [("k0", 16, f32(16))]).replace(
        pickle.dumps(MAGIC_NUMBER, protocol=2), pickle.dumps(MAGIC_NUMBER, protocol=1), 1
    )
    assert TorchLegacyReader().sniff(raw1[:64], Path("x.pt"))
    p1 = tmp_path / "p1.pt"
    p1.write_bytes(raw1)
    (a,), (b,) = fingerprint_path(p2, layers="exact"), fingerprint_path(p1, layers="exact")
    assert a.fingerprint is not None and b.fingerprint is not None
    assert a.fingerprint.content == b.fingerprint.content


def test_text_files_are_not_taken_for_old_pickles() -> None:
    sniff = TorchLegacyReader().sniff
    assert not sniff(b"hello world, this is text\n", Path("x.bin"))
    assert not sniff(struct.pack("<Q", 0x284E) + b'{"a":1}', Path("x.bin"))


def test_deflated_storage_is_inflated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelhash.fingerprint._formats import _inflate

    n = 300
    items = [(text(f"t{i}"), tensor("0", [1], offset=i, numel=n, storage_type="ByteStorage"))
             for i in range(n)]
    path = torch_zip(tmp_path / "z.pt", pickled(dct(*items)), {"0": bytes(range(256)) + bytes(44)},
                     compress=True)
    calls = []
    real = _inflate.InflatedMember._inflate
    monkeypatch.setattr(_inflate.InflatedMember, "_inflate",
                        lambda self: calls.append(1) or real(self))
    (out,) = fingerprint_path(path, layers="all")
    assert out.ok and len(out.fingerprint.tensors) == n  # type: ignore[union-attr]
    assert len(calls) == 1
