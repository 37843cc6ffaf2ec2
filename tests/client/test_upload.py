"""Upload hooks: streaming fingerprints equal file fingerprints; verdicts and policies."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from modelhash import (
    MirrorIndex,
    RegistryClient,
    Retry,
    StreamFingerprinter,
    scan_upload,
    scan_upload_async,
    scan_upload_parts,
)
from modelhash._scan import fingerprint_exact
from modelhash.errors import InputError, UnauthorizedError, UploadTooLargeError
from tests.client.test_e2e import evil_pickle
from tests.fingerprint.conftest import tiny_state_dict

ROOT = Path(__file__).resolve().parents[2]
TORCH_ZIP = ROOT / "tests" / "fixtures" / "torch" / "model_zip.pt"


def index_with(*sha256: str, status: str = "active") -> MirrorIndex:
    """An in-memory list that flags the given file hashes."""
    index = MirrorIndex(synced_at=datetime.now(UTC), registry="test")
    index.load_export({"flags": [
        {"id": f"flag-{i}", "category": "csam", "severity": "critical", "status": status,
         "fingerprints": {"sha256": [h]}}
        for i, h in enumerate(sha256)
    ]})
    return index


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("stream")
    out = []
    for seed, meta in ((1, None), (2, {"ss_network_module": "networks.lora"})):
        p = folder / f"m{seed}.safetensors"
        save_file(tiny_state_dict(seed), str(p), metadata=meta)
        out.append(p)
    big = folder / "big.safetensors"  # over 2 MiB, so AutoV1 is defined
    rng = np.random.default_rng(7)
    save_file({"w": rng.standard_normal((700, 1000)).astype(np.float32),
               "module.x": np.zeros(3, np.int8)}, str(big))
    out.append(big)
    return out


def chunked(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for p in [*points, len(data)]:
        yield data[start:p]
        start = p


def streamed(data: bytes, cuts: list[int], name: str = "upload.safetensors") -> object:
    fp = StreamFingerprinter(name, max_bytes=len(data) + 1)
    for block in chunked(data, cuts):
        fp.feed(block)
    return fp.finish()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), cuts=st.lists(st.integers(0, 3_000_000), max_size=12))
def test_any_chunking_gives_the_file_fingerprint(models: list[Path], which: int, cuts: list[int]) -> None:
    path = models[which]
    out = streamed(path.read_bytes(), cuts, name=str(path))
    (ref,) = fingerprint_exact(path)
    assert out.error is None and ref.fingerprint is not None  # type: ignore[attr-defined]
    got = out.fingerprint  # type: ignore[attr-defined]
    assert got.summary() == ref.fingerprint.summary()
    assert got.files == ref.fingerprint.files
    assert got.tensors == ref.fingerprint.tensors
    assert got.model == ref.fingerprint.model
    assert got.metadata == ref.fingerprint.metadata


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 5000), cuts=st.lists(st.integers(0, 5000), max_size=6),
       tail=st.binary(max_size=5))
def test_broken_streams_fail_like_broken_files(
    models: list[Path], tmp_path: Path, cut: int, cuts: list[int], tail: bytes
) -> None:
    data = models[0].read_bytes()
    data = data[: cut % len(data)] + tail
    p = tmp_path / "upload.safetensors"
    p.write_bytes(data)
    (ref,) = fingerprint_exact(p)
    out = streamed(data, cuts, name=str(p))
    assert (out.error is None) == (ref.error is None)  # type: ignore[attr-defined]
    if ref.error is not None:
        assert out.error.diagnostics() == ref.error.diagnostics()  # type: ignore[attr-defined]
    assert [f.sha256 for f in out.files] == [f.sha256 for f in ref.files]  # type: ignore[attr-defined]


def test_other_formats_are_spooled_and_the_spool_removed(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    data = TORCH_ZIP.read_bytes()
    verdict = scan_upload(io.BytesIO(data), name="model.pt", checker=index_with(),
                          spool_dir=spool)
    (ref,) = fingerprint_exact(TORCH_ZIP)
    assert verdict.verdict == "clean" and verdict.allow
    assert verdict.fingerprint is not None and ref.fingerprint is not None
    assert verdict.fingerprint.content == ref.fingerprint.content
    assert verdict.fingerprint.path == "model.pt"
    assert verdict.files[0].sha256 == ref.fingerprint.files[0].sha256
    assert list(spool.iterdir()) == []


def test_size_limit_stops_reading(models: list[Path], tmp_path: Path) -> None:
    data = models[2].read_bytes()
    read: list[int] = []

    def source() -> Iterator[bytes]:
        for i in range(0, len(data), 65536):
            read.append(i)
            yield data[i : i + 65536]

    with pytest.raises(UploadTooLargeError, match="1000000-byte limit"):
        scan_upload(source(), name="big.safetensors", checker=index_with(), max_bytes=1_000_000)
    assert len(read) < len(data) // 65536
    with pytest.raises(UploadTooLargeError):
        scan_upload([TORCH_ZIP.read_bytes()], name="x.pt", checker=index_with(), max_bytes=100,
                    spool_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_flagged_clean_hostile_and_flagged_hostile(models: list[Path], tmp_path: Path) -> None:
    flagged = models[1].read_bytes()
    evil = evil_pickle(tmp_path / "evil.pt").read_bytes()
    (evil_ref,) = fingerprint_exact(tmp_path / "evil.pt")
    sha_flagged = fingerprint_exact(models[1])[0].files[0].sha256
    index = index_with(sha_flagged)

    v = scan_upload([flagged], name="a.safetensors", checker=index)
    assert (v.verdict, v.allow) == ("match", False) and v.matches[0].flag_id == "flag-0"
    v = scan_upload([models[0].read_bytes()], name="b.safetensors", checker=index)
    assert (v.verdict, v.allow) == ("clean", True)
    v = scan_upload([evil], name="evil.pt", checker=index)
    assert (v.verdict, v.allow) == ("error", False) and "os.system" in (v.error or "")
    assert "evil.pt" in (v.error or "") and "modelhash-upload" not in (v.error or "")
    v = scan_upload([evil], name="evil.pt", checker=index, reject_unreadable=False)
    assert v.allow
    v = scan_upload([evil], name="evil.pt", checker=index_with(evil_ref.files[0].sha256))
    assert (v.verdict, v.allow) == ("match", False)
    v = scan_upload([flagged], name="a.safetensors", checker=index_with(sha_flagged, status="revoked"))
    assert (v.verdict, v.allow) == ("clean", True) and v.matches[0].status == "revoked"


def test_registry_outage_follows_the_policy_and_a_bad_key_raises(models: list[Path]) -> None:
    data = models[0].read_bytes()
    down = RegistryClient("http://registry.test", transport=httpx.MockTransport(
        lambda r: httpx.Response(503)), retry=Retry(attempts=1))
    v = scan_upload([data], name="m.safetensors", checker=down)
    assert (v.verdict, v.allow, v.recheck) == ("unchecked", False, True)
    v = scan_upload([data], name="m.safetensors", checker=down, unreachable="fail-open")
    assert (v.verdict, v.allow, v.recheck) == ("unchecked", True, True)
    assert v.fingerprint is not None  # fingerprinted anyway: the re-check needs no re-read
    bad_key = RegistryClient("http://registry.test", transport=httpx.MockTransport(
        lambda r: httpx.Response(401, json={"detail": "unknown or revoked API key"})))
    with pytest.raises(UnauthorizedError):
        scan_upload([data], name="m.safetensors", checker=bad_key, unreachable="fail-open")


def _example() -> ModuleType:
    path = ROOT / "docs" / "examples" / "upload_endpoint.py"
    spec = importlib.util.spec_from_file_location("upload_endpoint_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_reference_endpoint_streams_and_rejects(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    example = _example()
    storage = tmp_path / "storage"
    flagged_sha = fingerprint_exact(models[1])[0].files[0].sha256
    app = example.create_app(storage, checker=index_with(flagged_sha), max_bytes=2_000_000)

    async def body(data: bytes) -> object:
        for i in range(0, len(data), 4096):
            await asyncio.sleep(0)
            yield data[i : i + 4096]

    async def run() -> list[tuple[int, dict[str, object]]]:
        transport = httpx.ASGITransport(app=app)
        out = []
        async with httpx.AsyncClient(transport=transport, base_url="http://up") as c:
            for name, data in (
                ("ok.safetensors", models[0].read_bytes()),
                ("bad.safetensors", models[1].read_bytes()),
                ("evil.pt", evil_pickle(tmp_path / "e.pt").read_bytes()),
                ("big.safetensors", models[2].read_bytes() + b"x" * 100_000),
            ):
                r = await c.put(f"/models/{name}", content=body(data))
                out.append((r.status_code, r.json()))
        return out

    (ok, ok_body), (bad, bad_body), (evil, _), (big, _) = asyncio.run(run())
    assert ok == 201 and ok_body["verdict"] == "clean"
    assert (storage / "ok.safetensors").read_bytes() == models[0].read_bytes()
    assert bad == 403 and bad_body["verdict"] == "match"
    assert evil == 422
    assert big == 413
    assert sorted(p.name for p in storage.iterdir()) == [".staging", "ok.safetensors"]
    assert list((storage / ".staging").iterdir()) == []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), cuts=st.lists(st.integers(0, 3_000_000), max_size=12))
def test_streamed_sketch_equals_the_file_sketch(models: list[Path], which: int, cuts: list[int]) -> None:
    """Every layer comes from the same pass whatever the source: the sketch too."""
    path = models[which]
    out = streamed(path.read_bytes(), cuts, name=str(path))
    from modelhash.fingerprint import fingerprint_path

    (ref,) = fingerprint_path(path, layers="all")
    got = out.fingerprint  # type: ignore[attr-defined]
    assert ref.fingerprint is not None and ref.fingerprint.sketch is not None
    assert got.sketch is not None and set(got.sketch.tensors) == set(ref.fingerprint.sketch.tensors)
    for key, t in ref.fingerprint.sketch.tensors.items():
        np.testing.assert_allclose(got.sketch.tensors[key].values, t.values, rtol=1e-5, atol=1e-7)
    assert got.content == ref.fingerprint.content


def test_async_body_failures_and_limits_raise_and_never_hang(models: list[Path]) -> None:
    data = models[2].read_bytes()

    async def dropped() -> object:
        yield data[:100_000]
        raise ConnectionResetError("client went away")

    async def body() -> object:
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    with pytest.raises(ConnectionResetError):
        asyncio.run(scan_upload_async(dropped(), name="m.safetensors", checker=index_with()))
    with pytest.raises(UploadTooLargeError):
        asyncio.run(scan_upload_async(body(), name="m.safetensors", checker=index_with(),
                                      max_bytes=500_000))
    v = asyncio.run(scan_upload_async(body(), name="m.safetensors", checker=index_with()))
    assert v.verdict == "clean" and v.size == len(data)


def test_multi_file_upload_is_one_model(tmp_path: Path) -> None:
    from tests.fingerprint.conftest import tiny_state_dict as tiny

    sd = tiny(31)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": {k: sd[k] for k in names[:2]},
              "model-00002-of-00002.safetensors": {k: sd[k] for k in names[2:]}}
    index = {"weight_map": {k: f for f, part in shards.items() for k in part}}
    whole = tmp_path / "whole.safetensors"
    save_file(sd, str(whole))
    (ref,) = fingerprint_exact(whole)
    parts: list[tuple[str, object]] = [
        (f, [_save(part)]) for f, part in shards.items()
    ]
    parts.append(("model.safetensors.index.json", [json.dumps(index).encode()]))
    content = ref.fingerprint.content.hex  # type: ignore[union-attr]
    flagged = MirrorIndex(synced_at=datetime.now(UTC), registry="test")
    flagged.load_export({"flags": [{"id": "flag-c", "category": "csam", "severity": "critical",
                                    "status": "active",
                                    "fingerprints": {"content-blake3-v1": [content]}}]})
    (v,) = scan_upload_parts(parts, checker=flagged, spool_dir=tmp_path)  # type: ignore[arg-type]
    assert v.verdict == "match" and v.name == "upload" and v.fingerprint is not None
    assert v.fingerprint.format == "safetensors-sharded"
    assert [f.path for f in v.files] == sorted(shards)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole.safetensors"]
    for bad in ("../x.safetensors", "/abs.safetensors", ".hidden/x.safetensors", ""):
        with pytest.raises(InputError):
            scan_upload_parts([(bad, [b"x"])], checker=flagged)  # type: ignore[list-item]


def _save(sd: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(sd)
