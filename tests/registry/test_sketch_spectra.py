"""Raw model flags keep their invariant layer in ``sketch_spectra``: written with the
sketch row, exactly the section that ends the blob, append-only, and the only thing
the index of raw flags' spectra reads (a malformed row is logged and skipped).
Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlmodel import select

from modelhash.fingerprint import Sketch, TensorSketch
from modelhash.fingerprint._invariant import Spectra, Spectrum
from modelhash.fingerprint._project import K
from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import upgrade
from modelhash.registry.crud.bases import create_base
from modelhash.registry.crud.flags import create_flag
from modelhash.registry.crud.keys import CLI
from modelhash.registry.crud.sketches import (
    RAW_MODEL_FLAG,
    SketchIndex,
    blob_spectra,
    is_raw_model_flag,
)
from modelhash.registry.models import SketchRow, SketchSpectra
from modelhash.wire import BaseCreate, FlagCreate, encode_sketch

SHAPES = [(320, 320), (320, 768), (640, 640)]


def spectra(rng: np.random.Generator, n: int = 8) -> Spectra:
    items = {}
    for i in range(n):
        key = f"unet:block_{i}_attn"
        items[key] = Spectrum(key, SHAPES[i % 3], np.sort(rng.uniform(0.5, 30.0, 32))[::-1])
    return Spectra(items)


def model(rng: np.random.Generator, invariant: Spectra | None) -> Sketch:
    s = Sketch("model", {
        f"unet:t_{i}": TensorSketch(f"unet:t_{i}", SHAPES[i % 3], rng.standard_normal((K, K)))
        for i in range(12)
    })
    s.invariant = invariant
    return s


def _fingerprint() -> dict[str, str]:
    return {"sha256": os.urandom(32).hex(), "content": os.urandom(32).hex()}


def _flag(session: object, sketch: Sketch) -> str:
    flag, created = create_flag(session, data=FlagCreate(  # type: ignore[arg-type]
        category="other", fingerprint=_fingerprint(), sketch=encode_sketch(sketch)), actor=CLI)
    assert created
    return flag.id


def _near(sketch: Sketch, rng: np.random.Generator) -> Sketch:
    """A fine-tune of ``sketch``: its tensors moved a little, spectra of its own."""
    return Sketch("model", {
        k: TensorSketch(k, t.shape, t.values + 0.02 * rng.standard_normal((K, K)))
        for k, t in sketch.tensors.items()
    }, invariant=spectra(rng))


def test_the_raw_model_flag_rule_is_one_definition() -> None:
    row = SketchRow(owner_type="flag", owner_id="f", algorithm="a", kind="model",
                    base_id=None, tensors=1, blob=b"")
    assert is_raw_model_flag(row)
    for name, other in (("owner_type", "base"), ("kind", "delta"), ("kind", "lora"),
                        ("base_id", "b1")):
        changed = row.model_copy(update={name: other})
        assert not is_raw_model_flag(changed), (name, other)
    assert {name for name, _ in RAW_MODEL_FLAG} == {"owner_type", "kind", "base_id"}


def test_a_raw_model_flag_stores_its_section_with_its_sketch(fresh_url: str) -> None:
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    rng = np.random.default_rng(5)
    try:
        inv = spectra(rng)
        with session_scope(engine) as s:
            with_layer = _flag(s, model(rng, inv))
            without = _flag(s, model(rng, None))
        with session_scope(engine) as s:
            rows = {r.owner_id: r for r in s.exec(select(SketchRow)).all()}
            stored = {r.sketch_id: r for r in s.exec(select(SketchSpectra)).all()}
        raw = rows[with_layer]
        assert (raw.kind, raw.base_id) == ("model", None) and raw.id in stored
        got = stored[raw.id]
        from_blob = blob_spectra(raw.blob)
        assert from_blob is not None
        # Byte for byte the section the blob ends with, under its own algorithm.
        assert got.section == from_blob.to_section() == inv.to_section()
        assert got.algorithm == inv.algorithm and got.created_at is not None
        assert rows[without].id not in stored  # no layer, no row
        assert len(stored) == 1

        # A base registered later re-bases both flags; the delta rows (which keep
        # the layer in their blob) get no spectra row, nor does the base, nor a
        # flag filed as a delta of it.
        base = model(rng, spectra(rng))
        with session_scope(engine) as s:
            create_base(s, data=BaseCreate(name="base-1", fingerprint=_fingerprint(),
                                           sketch=encode_sketch(_near(Sketch.from_bytes(
                                               raw.blob), rng))), actor=CLI)
            create_base(s, data=BaseCreate(name="base-2", fingerprint=_fingerprint(),
                                           sketch=encode_sketch(base)), actor=CLI)
            delta_flag = _flag(s, _near(base, rng))
        with session_scope(engine) as s:
            rows_after = s.exec(select(SketchRow).order_by(SketchRow.id)).all()  # type: ignore[arg-type]
            stored_after = set(s.exec(select(SketchSpectra.sketch_id)).all())
        kinds = {(r.owner_id, r.kind) for r in rows_after if r.owner_type == "flag"}
        assert (delta_flag, "delta") in kinds and (with_layer, "delta") in kinds
        assert stored_after == {raw.id}
    finally:
        engine.dispose()


def test_the_spectra_table_is_append_only(fresh_url: str) -> None:
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        with session_scope(engine) as s:
            _flag(s, model(np.random.default_rng(6), spectra(np.random.default_rng(7))))
        for statement in ("UPDATE sketch_spectra SET algorithm = 'x'",
                          "DELETE FROM sketch_spectra"):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(statement))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM sketch_spectra")).scalar() == 1
    finally:
        engine.dispose()


def test_the_index_reads_the_sections_and_skips_malformed_ones(
    fresh_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    rng = np.random.default_rng(8)
    try:
        good_inv = spectra(rng)
        with session_scope(engine) as s:
            good = _flag(s, model(rng, good_inv))
            # Rows written behind the API's back: a raw flag whose blob carries the
            # layer but that has no spectra row (the blob is not read), and raw flag
            # rows whose spectra rows are malformed.
            inv = spectra(rng)
            blob = model(rng, inv).to_bytes()
            bad = {
                "no-row": None,
                "truncated": (inv.algorithm, inv.to_section()[:-3]),
                "garbage": (inv.algorithm, b"\xff" * 40),
                "empty": (inv.algorithm, b""),
                "other-algorithm": ("invariant-svals-k32-v9", inv.to_section()),
                "negative": (inv.algorithm, Spectra({"unet:x": Spectrum(
                    "unet:x", (320, 320), np.array([3.0, -1.0]))}).to_section()),
            }
            ids = {}
            for owner, spectra_row in bad.items():
                row = SketchRow(owner_type="flag", owner_id=owner, algorithm="sketch-x",
                                kind="model", base_id=None, tensors=12, blob=blob)
                s.add(row)
                s.flush()
                assert row.id is not None
                ids[owner] = row.id
                if spectra_row is not None:
                    s.add(SketchSpectra(sketch_id=row.id, algorithm=spectra_row[0],
                                        section=spectra_row[1]))
            s.commit()
        index = SketchIndex()
        with caplog.at_level(logging.WARNING, "modelhash.registry"), session_scope(engine) as s:
            index.refresh(s)
        assert set(index.raw_flags) == {good}
        ((key, group),) = index.raw.items()
        assert key[0] == good_inv.algorithm and group.n == 1 and group.flags == [good]
        (view,) = index.snapshot().raw_spectra.values()
        assert view.near(good_inv, radius=1e-6) == [int(view.ids[0])]
        warned = " ".join(r.getMessage() for r in caplog.records)
        for owner in ("truncated", "garbage", "empty", "other-algorithm", "negative"):
            assert f"sketch {ids[owner]} of flag {owner} has unreadable spectra" in warned
        assert "no-row" not in warned
    finally:
        engine.dispose()
