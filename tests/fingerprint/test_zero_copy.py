"""Reading without a copy (a mapped file, an upload's ``bytes`` chunks) gives exactly
what copying gives, and never trusts a buffer its producer may reuse."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelhash.fingerprint._pass as pass_mod
from modelhash.fingerprint import fingerprint_path
from modelhash.fingerprint._pass import ChunkSource, FileSource, file_layer_work, may_map, run_pass


def _model(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    save_file({
        f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal((96, 64)) * 0.02).astype(np.float16)
        for i in range(6)
    } | {"model.norm.weight": np.ones(64, dtype=np.float32)}, str(path))
    return path


@pytest.fixture
def small_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Map files of any size, so small fixtures take the mapped path."""
    monkeypatch.setattr(pass_mod, "MAP_MIN_BYTES", 0)
    monkeypatch.delenv("MODELHASH_NO_MMAP", raising=False)


def _summary(path: Path) -> tuple[object, ...]:
    (out,) = fingerprint_path(path, layers="all", chunk=4096)
    assert out.error is None and out.fingerprint is not None
    fp = out.fingerprint
    assert fp.sketch is not None
    return (fp.files[0], fp.content.hex, fp.sketch.to_bytes())


def test_mapped_and_copied_reads_agree(tmp_path: Path, small_maps: None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = _model(tmp_path / "m.safetensors")
    src = FileSource(path)
    try:
        mapped = src.view(1) is not None
    finally:
        src.close()
    if not mapped:
        pytest.skip("this filesystem is not one the pass maps")
    got = _summary(path)
    monkeypatch.setenv("MODELHASH_NO_MMAP", "1")
    src = FileSource(path)
    try:
        assert src.view(1) is None  # the switch turns mapping off
    finally:
        src.close()
    assert _summary(path) == got


def test_mapping_is_refused_where_a_failed_page_would_kill_the_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_maps: None) -> None:
    path = _model(tmp_path / "m.safetensors")
    st = os.stat(path)
    monkeypatch.setattr(pass_mod, "_filesystem", lambda dev: "nfs4")
    assert not may_map(st)
    monkeypatch.setattr(pass_mod, "_filesystem", lambda dev: "fuse.sshfs")
    assert not may_map(st)
    monkeypatch.setattr(pass_mod, "_filesystem", lambda dev: None)  # unknown: read it
    assert not may_map(st)
    monkeypatch.setattr(pass_mod, "_filesystem", lambda dev: "ext4")
    assert may_map(st)
    monkeypatch.setattr(pass_mod, "MAP_MIN_BYTES", st.st_size + 1)
    assert not may_map(st)  # small files are read


def test_a_mapped_file_that_changed_size_is_an_error(tmp_path: Path, small_maps: None) -> None:
    path = _model(tmp_path / "m.safetensors")
    works, _ = file_layer_work(path, None, None)
    with pytest.raises(Exception, match="changed while reading"):
        run_pass(path, path.stat().st_size + 1, works)


def _sha_of_source(source: ChunkSource, chunk: int) -> tuple[str, int]:
    h = hashlib.sha256()
    works = [pass_mod.Work(lambda off, v: h.update(v), 1.0)]
    n = run_pass(source, None, works, chunk=chunk, threads=2)
    return h.hexdigest(), n


def test_large_bytes_chunks_are_lent_small_and_mutable_ones_copied() -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    want = hashlib.sha256(data).hexdigest()
    cuts = [0, 1, 700_000, 700_001, 1_900_000, 2_999_999, len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(cuts)]
    for chunk in (1 << 20, 300_000, 4096):
        assert _sha_of_source(ChunkSource(iter(pieces), head=b""), chunk) == (want, len(data))
    src = ChunkSource(iter([data]))
    lent = src.view(1 << 20)
    assert lent is not None and bytes(lent) == data[: 1 << 20]

    def reused() -> Iterator[bytearray]:
        """A producer that refills one buffer: its bytes must be copied at once."""
        buf = bytearray(500_000)
        for i in range(0, len(data), len(buf)):
            part = data[i : i + len(buf)]
            buf[: len(part)] = part
            yield buf if len(part) == len(buf) else bytearray(part)

    mutable = ChunkSource(reused())
    assert mutable.view(1 << 20) is None  # never lent
    assert _sha_of_source(ChunkSource(reused()), 1 << 20) == (want, len(data))


RSS_PROBE = """
import sys
from pathlib import Path
from modelhash.fingerprint import fingerprint_path
from modelhash.fingerprint._pass import FileSource
src = FileSource(Path(sys.argv[1]))
mapped = src.view(1) is not None
src.close()
(out,) = fingerprint_path(Path(sys.argv[1]), layers="exact")
assert out.error is None, out.error
# VmHWM, not ru_maxrss: the latter survives exec, so it would count the parent too.
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(int(mapped), int(hwm.split()[1]) * 1024)
"""


def test_a_mapped_pass_keeps_only_the_chunks_in_flight_resident(tmp_path: Path) -> None:
    """Mapped pages the pass is done with leave the process (they stay cached), so a
    large file does not count as resident memory, which container limits watch."""
    import subprocess
    import sys

    size = 192 << 20
    path = tmp_path / "big.safetensors"
    save_file({"w": np.zeros(size, dtype=np.uint8)}, str(path))
    env = {k: v for k, v in os.environ.items() if k != "MODELHASH_NO_MMAP"}
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True,
                         text=True, check=True, env=env)
    mapped, peak = (int(x) for x in out.stdout.split())
    if not mapped:
        pytest.skip("this filesystem is not one the pass maps")
    assert peak > 20 << 20  # the probe measured this process
    # Interpreter and modules take about 60 MB; the chunks in flight at most 4 x 8 MiB.
    assert peak < 128 << 20, f"peak RSS {peak >> 20} MiB for a {size >> 20} MiB file"


def test_a_mapped_file_cut_short_between_chunks_is_an_error(tmp_path: Path, small_maps: None) -> None:
    """Truncation seen before a chunk is lent is an error, not a fault on the page."""
    path = tmp_path / "cut.bin"
    path.write_bytes(os.urandom(3 << 20))
    src = FileSource(path)
    try:
        if src.view(1 << 20) is None:
            pytest.skip("this filesystem is not one the pass maps")
        os.truncate(path, 1 << 20)
        with pytest.raises(Exception, match="truncated"):
            src.view(1 << 20)
    finally:
        src.close()
