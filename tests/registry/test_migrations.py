"""Migrations are the schema: no drift from the models, clean round trips, append-only audit."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel

import registry.models  # noqa: F401
from registry._db import make_engine, session_scope
from registry._migrations import current_revision, downgrade, head_revision, upgrade
from registry._settings import Settings
from registry.app import create_app
from registry.crud.audit import emit_change, record
from registry.crud.keys import CLI


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
