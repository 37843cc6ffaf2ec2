"""Migrations are the schema: no drift from the models, clean round trips, append-only audit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel

import modelhash.registry.models  # noqa: F401
from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import current_revision, downgrade, head_revision, upgrade
from modelhash.registry._settings import Settings
from modelhash.registry.app import create_app
from modelhash.registry.crud.audit import emit_change, record
from modelhash.registry.crud.keys import CLI


def test_models_and_migrations_do_not_drift(fresh_url):
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, SQLModel.metadata) == []
    finally:
        engine.dispose()


def test_upgrade_downgrade_round_trip(fresh_url):
    assert upgrade(fresh_url) == head_revision()
    engine = make_engine(fresh_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert set(SQLModel.metadata.tables) <= tables
        downgrade(fresh_url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert current_revision(engine) is None
        assert upgrade(fresh_url) == head_revision()
        assert upgrade(fresh_url) == head_revision()  # idempotent
        assert set(SQLModel.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("table", ["audit_event", "change_event"])
@pytest.mark.parametrize("statement", ["UPDATE {table} SET at = at", "DELETE FROM {table}"])
def test_the_audit_log_and_feed_are_append_only_in_the_database(fresh_url, table, statement):
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        with session_scope(engine) as session:
            record(session, actor=CLI, action="test", target_type="t", target_id="1")
            emit_change(session, kind="test", flag_id="f", data={})
            session.commit()
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement.format(table=table)))
        with engine.connect() as conn:
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 1
    finally:
        engine.dispose()


def test_readyz_is_503_until_migrated(fresh_url):
    app = create_app(Settings(database_url=fresh_url))
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "modelhash db upgrade" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200
        # Routes that need the schema answer 503, not 500.
        r = client.get("/v1/bases", headers={"Authorization": "Bearer mh_x"})
        assert r.status_code == 503
        upgrade(fresh_url)
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["revision"] == head_revision()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://postgres@127.0.0.1:1/test",
        "sqlite:////nonexistent-dir/for/sure/registry.db",
    ],
)
def test_readyz_is_503_while_the_database_is_unreachable(url):
    app = create_app(Settings(database_url=url))
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["detail"] == "database unreachable"
        assert client.get("/v1/export/public-key").status_code == 503
        assert client.get("/healthz").status_code == 200


def test_signatures_are_recomputed_when_upgrading_to_v2(fresh_url):
    """Revision 0003 replaces every v1 signature with a v2 one computed from the blobs."""
    from datetime import UTC, datetime

    import numpy as np

    from modelhash.fingerprint import Sketch, TensorSketch, delta_sketch
    from modelhash.fingerprint._project import K
    from modelhash.registry.crud.sketches import SIG_BYTES, keys_digest, lora_keys, signature

    rng = np.random.default_rng(3)
    base = Sketch("model", {
        f"unet:b{i}": TensorSketch(f"unet:b{i}", (320, 320), rng.standard_normal((K, K)))
        for i in range(12)
    })
    tuned = Sketch("model", {
        k: TensorSketch(k, t.shape, t.values + 0.02 * rng.standard_normal((K, K)))
        for k, t in base.tensors.items()
    })
    delta = delta_sketch(tuned, base)[0]
    lora = Sketch("lora", {
        k: TensorSketch(k, t.shape, 0.02 * rng.standard_normal((K, K)))
        for k, t in list(base.tensors.items())[:5]
    })
    upgrade(fresh_url, "0002")
    engine = make_engine(fresh_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            rows = [(1, "base", "b1", "model", None, base), (2, "flag", "f1", "delta", "b1", delta),
                    (3, "flag", "f2", "lora", "b1", lora), (4, "flag", "f3", "model", None, tuned)]
            _seed_sketches(conn, now, [(*r[:5], r[5].algorithm, len(r[5]), r[5].to_bytes())
                                       for r in rows])
            for sid in (2, 3):
                conn.execute(text(
                    "INSERT INTO sketch_signature (sketch_id, base_id, signature) "
                    "VALUES (:s, 'b1', :sig)"), {"s": sid, "sig": b"\0" * 1024})
        assert upgrade(fresh_url) == head_revision()
        with engine.connect() as conn:
            got = {r[0]: r[1:] for r in conn.execute(text(
                "SELECT sketch_id, signature, norm, modules FROM sketch_signature"))}
        assert set(got) == {2, 3}
        stored = {k: Sketch.from_bytes(v.to_bytes()) for k, v in
                  {"base": base, "delta": delta, "lora": lora}.items()}
        want_delta = signature(stored["delta"], stored["base"])
        keys = lora_keys(stored["lora"], stored["base"])
        want_lora = signature(stored["lora"], stored["base"], keys)
        assert want_delta is not None and want_lora is not None
        assert got[2] == (want_delta.bits, pytest.approx(want_delta.norm), None)
        assert got[3] == (want_lora.bits, pytest.approx(want_lora.norm), keys_digest(keys))
        assert len(got[2][0]) == SIG_BYTES
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("DELETE FROM sketch_signature"))
    finally:
        engine.dispose()


def test_raw_flag_spectra_are_backfilled_when_upgrading_to_0005(fresh_url, caplog):
    """Revision 0005 copies the invariant section of every raw model flag's blob into
    ``sketch_spectra``, skips what it cannot read, and the index then finds them."""
    import logging
    from datetime import UTC, datetime

    import numpy as np

    from modelhash.fingerprint import Sketch, TensorSketch
    from modelhash.fingerprint._invariant import Spectra, Spectrum
    from modelhash.fingerprint._project import K
    from modelhash.registry.crud.sketches import SketchIndex, blob_spectra

    rng = np.random.default_rng(4)

    def sketch(kind: str, layer: bool) -> Sketch:
        s = Sketch(kind, {
            f"unet:b{i}": TensorSketch(f"unet:b{i}", (320, 320), rng.standard_normal((K, K)))
            for i in range(6)
        })
        if layer:
            s.invariant = Spectra({f"unet:m{i}": Spectrum(
                f"unet:m{i}", (320, 320), np.sort(rng.uniform(1, 9, 32))[::-1]) for i in range(4)})
        return s

    raw = sketch("model", True).to_bytes()
    rows = [
        (1, "base", "b1", "model", None, sketch("model", True).to_bytes()),
        (2, "flag", "f-raw", "model", None, raw),
        (3, "flag", "f-v2", "model", None, sketch("model", False).to_bytes()),
        (4, "flag", "f-delta", "delta", "b1", sketch("delta", True).to_bytes()),
        (5, "flag", "f-lora", "lora", None, sketch("lora", True).to_bytes()),
        (6, "flag", "f-corrupt", "model", None, raw[:6] + b"\x00" * 40),
        (7, "flag", "f-truncated", "model", None, raw[:-9]),
        (8, "flag", "f-junk", "model", None, b"not a sketch"),
        (9, "flag", "f-raw2", "model", None, raw),
    ]
    upgrade(fresh_url, "0004")
    engine = make_engine(fresh_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            _seed_sketches(conn, now, [(*r[:5], "a", 6, r[5]) for r in rows])
        with caplog.at_level(logging.WARNING, "modelhash.registry"):
            assert upgrade(fresh_url) == head_revision() == "0005"
        warned = " ".join(r.getMessage() for r in caplog.records)
        for sid, owner in ((6, "f-corrupt"), (7, "f-truncated"), (8, "f-junk")):
            assert f"sketch {sid} of flag {owner} has an unreadable blob" in warned
        with engine.connect() as conn:
            got = {r[0]: r[1:] for r in conn.execute(text(
                "SELECT sketch_id, algorithm, section, created_at FROM sketch_spectra"))}
        assert set(got) == {2, 9}
        layer = blob_spectra(raw)
        assert layer is not None
        assert got[2][:2] == (layer.algorithm, layer.to_section()) == got[9][:2]
        assert got[2][1] == Sketch.from_bytes(raw).invariant.to_section()  # type: ignore[union-attr]
        assert got[2][2] is not None
        index = SketchIndex()
        with session_scope(engine) as session:
            index.refresh(session)
        assert set(index.raw_flags) == {"f-raw", "f-raw2"}
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("DELETE FROM sketch_spectra"))
        downgrade(fresh_url, "0004")
        assert "sketch_spectra" not in inspect(engine).get_table_names()
        assert current_revision(engine) == "0004"
        assert upgrade(fresh_url) == head_revision()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM sketch_spectra")).scalar() == 2
    finally:
        engine.dispose()


def _seed_sketches(conn: Any, now: datetime, rows: list[tuple[Any, ...]]) -> None:
    """Reference base ``b1`` and sketch rows (id, owner type, owner, kind, base id,
    algorithm, tensors, blob), written with SQL as an older revision's schema holds them."""
    conn.execute(text(
        "INSERT INTO reference_base (id, name, created_by, created_at) "
        "VALUES ('b1', 'base', 'test', :now)"), {"now": now})
    for sid, owner_type, owner, kind, base_id, algorithm, tensors, blob in rows:
        conn.execute(text(
            "INSERT INTO sketch (id, owner_type, owner_id, algorithm, kind, base_id, "
            "tensors, blob, created_at) VALUES (:id, :ot, :o, :a, :k, :b, :t, :blob, :now)"
        ), {"id": sid, "ot": owner_type, "o": owner, "a": algorithm, "k": kind, "b": base_id,
            "t": tensors, "blob": blob, "now": now})
