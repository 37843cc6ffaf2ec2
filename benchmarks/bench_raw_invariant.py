"""What raw flags cost a check on the invariant layer: retrieval by spectra.

A flag filed with no reference base near it is stored raw, and the registry keeps
its invariant layer (its spectra) in memory per matrix layout, so a check can find
a permuted, rotated or rescaled copy of it (``_raw_invariant_scan`` in
``registry/crud/sketches.py``). This makes a fresh database, flags ``--targets``
models through the normal flag path (no base registered, so they are stored raw),
bulk inserts the rest (``--sizes``) as raw flag rows with their band and spectra rows, all
measuring one SD-sized matrix set (87 matrices, 32 singular values each, as an SD
1.5 checkpoint measures), then times, in this process:

- ``load``: building the index from scratch, as a process's first check does (every
  raw flag's ``sketch_spectra`` section read and parsed), the median of
  ``--load-repeats``; and, for comparison, the same index built the way it was
  before that table existed (every raw blob read in batches of 32 and inflated
  whole by ``blob_spectra`` for the section at its end), per 1,000 flags and as a
  ratio;
- ``find_matches`` on four uploads, each a 200-tensor sketch whose tensors line up
  with no flag (so every path runs and the bands find nothing):
  ``copy``: a target's spectra moved by 3e-5 (float16 rounding on a small
  model): must match, on the invariant layer;
  ``sibling``: spectra at the distance of an innocent fine-tune of the same
  base (3e-3 from every flag, so every matrix pairs and every row is measured
  in full: the worst case): must be clean;
  ``stranger``: spectra of another architecture: clean, nothing to measure;
  ``no-invariant``: a sketch without the layer (the scan does not run);
- ``near``: the spectral distance scan alone (``RawSpectraView.near``).

Filler flags share the spectra of an SD-like family: a common spectrum per matrix
moved by 3e-3 relative per flag, as fine-tunes of one base are.

    python benchmarks/bench_raw_invariant.py [--sizes 1000,10000] [--repeats 15]
        [--load-repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import func, insert, select
from sqlmodel import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelhash.fingerprint import Sketch, TensorSketch
from modelhash.fingerprint._invariant import Spectra, Spectrum
from modelhash.fingerprint._project import K
from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import upgrade
from modelhash.registry.crud.flags import create_flag
from modelhash.registry.crud.keys import CLI
from modelhash.registry.crud.sketches import (
    RAW_SPECTRAL_MARGIN,
    RawKey,
    RawSpectra,
    SketchIndex,
    blob_spectra,
    find_matches,
    index_for,
    raw_layout,
    raw_model_flag,
)
from modelhash.registry.models import Fingerprint, Flag, SketchBand, SketchRow, SketchSpectra
from modelhash.wire import FlagCreate, encode_sketch

SHAPES = [(320, 320), (320, 768), (640, 640), (640, 768), (1280, 1280), (320, 1280)]
MATRICES = 87
TENSORS = 200


def _layer(rng: np.random.Generator, common: list[np.ndarray], shift: float) -> Spectra:
    items = {}
    for i, c in enumerate(common):
        key = f"unet:block_{i}_attn"
        values = c * (1 + shift * rng.standard_normal(len(c)))
        items[key] = Spectrum(key, SHAPES[i % len(SHAPES)], np.sort(np.abs(values))[::-1])
    return Spectra(items)


def _sketch(rng: np.random.Generator, invariant: Spectra | None) -> Sketch:
    s = Sketch("model", {
        f"unet:t_{i}": TensorSketch(f"unet:t_{i}", SHAPES[i % len(SHAPES)],
                                    rng.standard_normal((K, K)))
        for i in range(TENSORS)
    })
    s.invariant = invariant
    return s


def _fingerprint() -> dict[str, str]:
    return {"sha256": os.urandom(32).hex(), "content": os.urandom(32).hex()}


def seed(url: str, n: int, targets: int) -> tuple[list[Spectra], list[np.ndarray]]:
    upgrade(url)
    engine = make_engine(url)
    rng = np.random.default_rng(0)
    common = [np.sort(rng.uniform(0.5, 30.0, 32))[::-1] for _ in range(MATRICES)]
    kept: list[Spectra] = []
    with session_scope(engine) as session:
        for _ in range(targets):
            inv = _layer(rng, common, 3e-3)
            kept.append(inv)
            create_flag(session, data=FlagCreate(
                category="other", fingerprint=_fingerprint(),
                sketch=encode_sketch(_sketch(rng, inv))), actor=CLI)
    with session_scope(engine) as session:
        next_id = 1 + session.execute(
            select(func.max(SketchRow.id))  # type: ignore[arg-type]
        ).scalar_one()
    pool = [_sketch(rng, _layer(rng, common, 3e-3)) for _ in range(min(64, n))]
    blobs = [s.to_bytes() for s in pool]
    sections = [s.invariant.to_section() for s in pool if s.invariant is not None]
    bands = [s.band_keys() for s in pool]
    now = datetime.now(UTC)
    filler = n - targets
    for start in range(0, filler, 1000):
        m = min(1000, filler - start)
        flags, hashes, rows, band_rows, spectra_rows = [], [], [], [], []
        for i in range(m):
            fid, sid, j = str(uuid.uuid4()), next_id + i, (start + i) % len(pool)
            flags.append({"id": fid, "category": "other", "severity": "high",
                          "status": "active", "files": [], "created_by": "bench",
                          "created_at": now, "updated_at": now})
            hashes.append({"flag_id": fid, "algorithm": "sha256",
                           "value": os.urandom(32).hex(), "created_at": now})
            rows.append({"id": sid, "owner_type": "flag", "owner_id": fid,
                         "algorithm": pool[j].algorithm, "kind": "model", "base_id": None,
                         "tensors": TENSORS, "blob": blobs[j], "created_at": now})
            band_rows.extend({"band": b, "sketch_id": sid} for b in set(bands[j]))
            spectra_rows.append({"sketch_id": sid, "algorithm": pool[j].invariant.algorithm,
                                 "section": sections[j], "created_at": now})
        next_id += m
        with engine.begin() as conn:
            conn.execute(insert(Flag.__table__), flags)  # type: ignore[attr-defined]
            conn.execute(insert(Fingerprint.__table__), hashes)  # type: ignore[attr-defined]
            conn.execute(insert(SketchRow.__table__), rows)  # type: ignore[attr-defined]
            conn.execute(insert(SketchBand.__table__), band_rows)  # type: ignore[attr-defined]
            conn.execute(insert(SketchSpectra.__table__), spectra_rows)  # type: ignore[attr-defined]
    engine.dispose()
    return kept, common


def _ms(fn: object, repeats: int) -> tuple[float, float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(1000 * (time.perf_counter() - t0))
    return statistics.median(out), max(out)


def load_from_blobs(session: Session) -> int:
    """The raw flags' spectra index built as it was before ``sketch_spectra``: every raw
    model flag's blob read (32 at a time) and inflated whole for its invariant section."""
    groups: dict[RawKey, RawSpectra] = {}
    ids = session.execute(
        select(SketchRow.id).where(*raw_model_flag()).order_by(SketchRow.id)  # type: ignore[arg-type]
    ).scalars().all()
    for lo in range(0, len(ids), 32):
        rows = session.execute(
            select(SketchRow.id, SketchRow.owner_id, SketchRow.blob)  # type: ignore[call-overload]
            .where(SketchRow.id.in_(ids[lo : lo + 32]))  # type: ignore[union-attr]
        )
        for sid, owner, blob in rows:
            spectra = blob_spectra(blob)
            if spectra is None or not len(spectra):
                continue
            layout = raw_layout(spectra)
            groups.setdefault((spectra.algorithm, layout), RawSpectra(layout)).add(
                int(sid), owner, spectra)
    return sum(g.n for g in groups.values())


def run(n: int, targets: int, repeats: int, load_repeats: int = 3) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'registry.db'}"
        t0 = time.perf_counter()
        kept, common = seed(url, n, targets)
        print(f"[{n:,} raw flags] seeded in {time.perf_counter() - t0:.1f}s", flush=True)
        engine = make_engine(url)
        rng = np.random.default_rng(1)
        with session_scope(engine) as session:
            loads = []
            for _ in range(load_repeats):
                fresh = SketchIndex()
                t0 = time.perf_counter()
                fresh.refresh(session)
                loads.append(time.perf_counter() - t0)
            load = statistics.median(loads)
            before = []
            for _ in range(load_repeats):
                t0 = time.perf_counter()
                old_rows = load_from_blobs(session)
                before.append(time.perf_counter() - t0)
            old = statistics.median(before)
            index = index_for(session)
            rows = sum(g.n for g in index.raw.values())
            assert old_rows == rows, (old_rows, rows)
            print(f"  load from sketch_spectra {load:.3f}s ({1000 * load / max(rows, 1):.3f}s "
                  f"per 1,000 flags); from the blobs {old:.2f}s "
                  f"({1000 * old / max(rows, 1):.2f}s per 1,000): {old / load:.1f}x faster "
                  f"(medians of {load_repeats})", flush=True)
            used = sum(g.n * (g.values[0].nbytes + g.norms[0].nbytes + 8)
                       for g in index.raw.values() if g.n)
            held = sum(g.values.nbytes + g.norms.nbytes + g.ids.nbytes
                       for g in index.raw.values())
            print(f"  {rows:,} rows with spectra, "
                  f"{used / max(rows, 1) / 1024:.1f} KiB each in memory "
                  f"({held / 2**20:.0f} MiB allocated)", flush=True)
            target = kept[0]
            copy = Spectra({k: Spectrum(k, s.shape, s.values * (1 + 3e-5 * rng.standard_normal(
                len(s.values)))) for k, s in target.items.items()})
            other = Spectra({f"llm:{k}": Spectrum(f"llm:{k}", (2048, 8192), s.values)
                             for k, s in target.items.items()})
            uploads = {
                "copy": _sketch(rng, copy),
                "sibling": _sketch(rng, _layer(rng, common, 3e-3)),
                "stranger": _sketch(rng, other),
                "no-invariant": _sketch(rng, None),
            }
            for name, up in uploads.items():
                hits = find_matches(session, up)
                layers = sorted({h.verdict.evidence.get("layer", "?") for h in hits})
                med, worst = _ms(lambda up=up: find_matches(session, up), repeats)
                print(f"  find_matches {name:13} {len(hits)} match(es) {layers} "
                      f"median {med:.1f} ms, max {worst:.1f} ms", flush=True)
            (view,) = index.snapshot().raw_spectra.values()
            radius = RAW_SPECTRAL_MARGIN * 1e-4
            for name in ("copy", "sibling"):
                inv = uploads[name].invariant
                assert inv is not None
                found = view.near(inv, radius=radius)
                med, worst = _ms(lambda inv=inv: view.near(inv, radius=radius), repeats)
                print(f"  near         {name:13} {len(found)} candidate(s) "
                      f"median {med:.1f} ms, max {worst:.1f} ms", flush=True)
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--load-repeats", type=int, default=3)
    args = ap.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        run(n, args.targets, args.repeats, args.load_repeats)


if __name__ == "__main__":
    main()
