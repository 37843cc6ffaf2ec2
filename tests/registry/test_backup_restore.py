"""Backups restore to a registry that answers exactly as the original did.

SQLite: the online backup API while the app is serving. PostgreSQL: ``pg_dump`` of
the registry's schema and ``pg_restore`` into a fresh database.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from modelhash.registry._backup import backup_sqlite
from modelhash.registry._settings import Settings
from modelhash.registry.app import create_app
from tests.utils.registry import auth, flag_body, pg_base_url


def _state(client: TestClient, key: str) -> tuple[list[dict], int]:
    export = json.loads(client.get("/v1/export", headers=auth(key)).json()["payload"])
    return export["flags"], export["cursor"]


def _seed(client: TestClient, keys: dict[str, str]) -> None:
    for _ in range(3):
        r = client.post("/v1/flags", json=flag_body(), headers=auth(keys["submitter"]))
        assert r.status_code == 201


def _same_signing_key(a: TestClient, b: TestClient) -> None:
    assert a.get("/v1/export/public-key").json() == b.get("/v1/export/public-key").json()


def test_sqlite_online_backup_restores(tmp_path, empty_database):
    url = empty_database("sqlite")
    from modelhash.registry._db import make_engine, session_scope
    from modelhash.registry._migrations import upgrade
    from modelhash.registry.crud.keys import CLI, create_key

    upgrade(url)
    engine = make_engine(url)
    keys = {}
    for role in ("submitter", "reader"):
        with session_scope(engine) as s:
            _, keys[role] = create_key(s, role=role, name=role, actor=CLI)
    engine.dispose()
    with TestClient(create_app(Settings(database_url=url))) as live:
        _seed(live, keys)
        before = _state(live, keys["reader"])
        copy = backup_sqlite(url, tmp_path / "backup.db")  # while serving
        assert copy.stat().st_mode & 0o077 == 0
        with TestClient(create_app(Settings(database_url=f"sqlite:///{copy}"))) as restored:
            assert _state(restored, keys["reader"]) == before
            _same_signing_key(live, restored)
            r = restored.post("/v1/flags", json=flag_body(), headers=auth(keys["submitter"]))
            assert r.status_code == 201  # writable, keys and triggers intact


@pytest.mark.postgres
def test_pg_dump_restores_into_a_fresh_database(client, keys, db_url, backend, tmp_path):
    if backend != "postgresql":
        pytest.skip("pg_dump is for PostgreSQL")
    for tool in ("pg_dump", "pg_restore"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    _seed(client, keys)
    before = _state(client, keys["reader"])
    url = make_url(db_url)
    schema = url.query["options"].split("search_path=")[1]
    base = make_url(pg_base_url())
    conn = ["-h", base.host or "127.0.0.1", "-p", str(base.port or 5432), "-U",
            base.username or "postgres"]
    dump = tmp_path / "registry.dump"
    subprocess.run(["pg_dump", *conn, "-d", base.database, "-n", schema, "-Fc", "-f", str(dump)],
                   check=True, capture_output=True)
    fresh = f"mh_restore_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_base_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{fresh}"'))
    try:
        subprocess.run(["pg_restore", *conn, "-d", fresh, str(dump)], check=True,
                       capture_output=True)
        restored_url = url.set(database=fresh).render_as_string(hide_password=False)
        with TestClient(create_app(Settings(database_url=restored_url))) as restored:
            assert _state(restored, keys["reader"]) == before
            _same_signing_key(client, restored)
            r = restored.post("/v1/flags", json=flag_body(), headers=auth(keys["submitter"]))
            assert r.status_code == 201
            restored.app.state.engine.dispose()
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)'))
        admin.dispose()
