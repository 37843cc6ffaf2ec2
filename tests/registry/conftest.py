"""Registry fixtures: every database test runs on SQLite and on real PostgreSQL.

PostgreSQL comes from ``MODELHASH_TEST_POSTGRES_URL`` (default: the local server,
database ``test``). Each run works in schemas of its own, dropped at the end, so
runs never collide. When PostgreSQL cannot be reached its tests are skipped, unless
``MODELHASH_REQUIRE_POSTGRES=1`` (as in CI), which makes them fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import upgrade
from modelhash.registry._settings import Settings
from modelhash.registry.app import create_app
from modelhash.registry.crud.keys import CLI, create_key
from tests.utils.registry import drop_pg_schema, new_pg_schema, pg_problem

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="session")
def _postgres_available() -> None:
    problem = pg_problem()
    if problem is None:
        return
    message = (
        f"PostgreSQL is not reachable ({problem}). Start it, or point "
        "MODELHASH_TEST_POSTGRES_URL at one (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)."
    )
    if os.environ.get("MODELHASH_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{message} MODELHASH_REQUIRE_POSTGRES=1 forbids skipping.")
    pytest.skip(message)


@pytest.fixture(scope="session")
def _pg_schemas() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for schema in made:
        drop_pg_schema(schema)


@pytest.fixture(scope="session")
def empty_database(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    _pg_schemas: list[str],
) -> Callable[[str], str]:
    """A factory: ``empty_database(backend)`` returns the URL of a new, empty database."""

    def make(backend: str) -> str:
        if backend == "sqlite":
            path = tmp_path_factory.mktemp("db") / "registry.db"
            return f"sqlite:///{path}"
        request.getfixturevalue("_postgres_available")
        schema, url = new_pg_schema()
        _pg_schemas.append(schema)
        return url

    return make


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgresql``; every test using a database runs once for each."""
    if request.param == "postgresql":
        request.getfixturevalue("_postgres_available")
    return str(request.param)


@pytest.fixture
def fresh_url(backend: str, empty_database: Callable[[str], str]) -> str:
    """An empty, unmigrated database of this test's backend."""
    return empty_database(backend)


@pytest.fixture(scope="session")
def db_url(backend: str, empty_database: Callable[[str], str]) -> str:
    """A migrated database shared by the session's tests (they use random hashes)."""
    url = empty_database(backend)
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def keys(engine: Engine) -> dict[str, str]:
    """One API key per role, plus a second submitter: ``keys["reader"]`` and so on."""
    out = {}
    for name, role in (
        ("reader", "reader"),
        ("submitter", "submitter"),
        ("submitter2", "submitter"),
        ("admin", "admin"),
    ):
        with session_scope(engine) as session:
            _, out[name] = create_key(session, role=role, name=f"test-{name}", actor=CLI)
    return out


@pytest.fixture(scope="session")
def app(db_url: str) -> FastAPI:
    return create_app(Settings(database_url=db_url, max_body_bytes=256 * 1024))


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def tmp_sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'registry.db'}"
