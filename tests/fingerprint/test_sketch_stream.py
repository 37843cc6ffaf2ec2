"""The streamed projection: any cuts, any stripes, any row length give ``project(W)``."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from modelhash.fingerprint import _sketcher
from modelhash.fingerprint._dequant import DECODERS
from modelhash.fingerprint._formats import parse_file
from modelhash.fingerprint._pass import run_pass
from modelhash.fingerprint._project import (
    BLOCK_ELEMENTS,
    TILE,
    K,
    Projection,
    SketchJob,
    SketchWork,
    _sign_slice,
    _signs,
    merged,
    project,
)
from modelhash.fingerprint._sketcher import Sketcher

SHAPES = [(64, 48), (300, 7), (100, 20000), (3, BLOCK_ELEMENTS + 4321), (TILE + 3, 2),
          (2, 2 * TILE + 5)]


def _stream(w: np.ndarray, dtype: str, stripes: int, cuts: list[int], lead: int) -> np.ndarray:
    """Sketch ``w`` stored as ``dtype`` at byte ``lead`` of a file cut at ``cuts``."""
    raw = w.astype("<f4" if dtype == "F32" else "<f2").tobytes()
    data = b"\0" * lead + raw + b"\0" * 5
    dec = DECODERS[dtype]
    jobs = [SketchJob(0, lead, len(raw), dec, w.shape, s, stripes) for s in range(stripes)]
    works = [SketchWork([j]) for j in jobs]
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        for work in works:
            work(a, memoryview(data)[a:b])
    out = merged(jobs)
    assert out is not None
    return out


@settings(max_examples=25, deadline=None)
@given(which=st.integers(0, len(SHAPES) - 1), dtype=st.sampled_from(["F32", "F16"]),
       stripes=st.integers(1, 3), cuts=st.lists(st.integers(0, 10**7), max_size=8),
       lead=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_any_cuts_and_stripes_give_the_projection(
    which: int, dtype: str, stripes: int, cuts: list[int], lead: int, seed: int
) -> None:
    m, n = SHAPES[which]
    w = np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)
    stored = w.astype(np.float16).astype(np.float64) if dtype == "F16" else w.astype(np.float64)
    got = _stream(w, dtype, stripes, cuts, lead)
    want = project(stored)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_missing_bytes_or_non_finite_values_give_no_sketch() -> None:
    rows = BLOCK_ELEMENTS // 40 + 100  # two row blocks
    w = np.ones((rows, 40), np.float32)
    jobs = [SketchJob(0, 0, w.nbytes, DECODERS["F32"], (rows, 40), s, 2) for s in range(2)]
    raw = memoryview(w.tobytes())
    SketchWork([jobs[0]])(0, raw)
    assert jobs[0].done == BLOCK_ELEMENTS // 40 * 40
    assert merged(jobs) is None  # stripe 1 never saw its block
    SketchWork([jobs[1]])(0, raw)
    assert merged(jobs) is not None
    bad = w.copy()
    bad[3, 7] = np.inf
    job = SketchJob(0, 0, bad.nbytes, DECODERS["F32"], bad.shape)
    job.feed(memoryview(bad.tobytes()))
    assert job.result() is None


def test_long_sides_are_generated_per_slice() -> None:
    for tag, length in ((b"rows", 70), (b"cols", 33)):
        full = _signs(tag, 70, 33, length)
        for j0, j1 in ((0, 1), (5, 29), (0, length), (length - 3, length)):
            np.testing.assert_array_equal(_sign_slice(tag, 70, 33, length, j0, j1), full[:, j0:j1])
    # A hostile shape: the projection of a 10^12-element matrix costs nothing up front.
    p = Projection(10**12, 10**9)
    assert p.rows(5, 9).shape == (K, 4) and p.cols(10**8, 10**8 + 3).shape == (3, K)


@pytest.mark.parametrize("stripes", [1, 2])
def test_striped_file_sketch_equals_the_unstriped(stripes: int, tmp_path: object) -> None:
    w = np.random.default_rng(5).standard_normal((257, 515)).astype(np.float32)
    one = _stream(w, "F32", 1, [12345, 99999], 3)
    many = _stream(w, "F32", stripes, [777, 200000], 3)
    np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-5)


def _small_model_sketch(
    path: Path, cores: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[int], dict[str, np.ndarray]]:
    """Bytes each sketch work of ``path``'s pass is fed, and the sketches it gives."""
    monkeypatch.setattr(_sketcher.os, "cpu_count", lambda: cores)
    pf = parse_file(path)
    sk = Sketcher("model", dict(pf.metadata))
    works = sk.work(pf, [t.name for t in pf.tensors], "", path.parent)
    shares = [sum(j.share for j in w.fn.jobs) for w in works if isinstance(w.fn, SketchWork)]
    run_pass(path, pf.size, works, chunk=4096, threads=cores)
    sk.after_pass(pf)
    return shares, {k: t.values for k, t in sk.finish().tensors.items()}


def test_small_tensors_spread_over_the_stripes_and_sketch_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One row block each: stripe 0 of each tensor takes all its bytes, so giving
    # stripe s of every tensor to work s would load one lane with all of them.
    rng = np.random.default_rng(3)
    sd = {f"layers.{i}.weight": rng.standard_normal((64, 64 + 8 * i)).astype(np.float16)
          for i in range(9)}
    sd["big.weight"] = rng.standard_normal((BLOCK_ELEMENTS // 256 * 3, 256)).astype(np.float16)
    path = tmp_path / "small.safetensors"
    save_file(sd, str(path))
    # The works may differ by one row block at most (the big tensor has 3 blocks).
    most = max(BLOCK_ELEMENTS * 2, *(v.nbytes for v in sd.values() if v.nbytes < BLOCK_ELEMENTS))
    for cores in (2, 3):
        shares, sketches = _small_model_sketch(path, cores, monkeypatch)
        assert sum(shares) == sum(v.nbytes for v in sd.values())
        assert max(shares) - min(shares) <= most
        _, one = _small_model_sketch(path, 1, monkeypatch)
        assert sketches.keys() == one.keys() and len(one) == len(sd)
        for key, values in one.items():  # a tensor of one block: the same sum, exactly
            if key.startswith("layers."):
                np.testing.assert_array_equal(sketches[key], values)
            else:
                np.testing.assert_allclose(sketches[key], values, rtol=1e-6, atol=1e-9)
