"""Database faults under load: every request gets an answer, never a dropped connection.

PostgreSQL backends serving the app are terminated (``pg_terminate_backend``) again
and again while client threads check, look up and submit flags over loopback.
Every request must get an HTTP answer (200/201, or 503 while the database is
unavailable), and every flag acknowledged with 201 must be stored.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import upgrade
from modelhash.registry.crud.keys import CLI, create_key
from tests.registry._uvicorn import uvicorn
from tests.utils.registry import auth, flag_body, pg_base_url, random_fingerprint

_THREADS = 4
_SECONDS = 12.0


def _killer(app_name: str, stop: threading.Event, kills: list[int]) -> None:
    engine = create_engine(pg_base_url())
    try:
        while not stop.is_set():
            with engine.begin() as conn:
                n = conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = :a"
                    ),
                    {"a": app_name},
                ).scalar_one()
            kills.append(int(n or 0))
            time.sleep(0.15)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_terminated_backends_answer_503_never_a_dropped_connection(
    empty_database, tmp_path
):
    url = empty_database("postgresql")
    upgrade(url)
    app_name = f"mh-fault-{uuid.uuid4().hex[:8]}"
    served_url = make_url(url).update_query_dict({"application_name": app_name})
    served_url_text = served_url.render_as_string(hide_password=False)
    engine = make_engine(url)
    with session_scope(engine) as session:
        _, key = create_key(session, role="submitter", name="load", actor=CLI)
    stop = threading.Event()
    kills: list[int] = []
    statuses: list[int] = []
    dropped: list[str] = []
    acknowledged: list[str] = []
    lock = threading.Lock()

    def load(base: str, worker: int) -> None:
        with httpx.Client(base_url=base, headers=auth(key), timeout=30) as client:
            i = 0
            while not stop.is_set():
                i += 1
                fp = random_fingerprint()
                try:
                    if i % 3 == 0:
                        r = client.post("/v1/flags", json=flag_body(fp))
                        if r.status_code in (200, 201):
                            with lock:
                                acknowledged.append(fp["sha256"])
                    elif i % 3 == 1:
                        r = client.post("/v1/check", json={"items": [fp]})
                    else:
                        r = client.get(f"/v1/hashes/sha256/{fp['sha256']}")
                except httpx.TransportError as exc:
                    with lock:
                        dropped.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    statuses.append(r.status_code)

    with uvicorn(served_url_text, tmp_path) as served:
        threads = [threading.Thread(target=load, args=(served.base, w)) for w in range(_THREADS)]
        killer = threading.Thread(target=_killer, args=(app_name, stop, kills))
        for t in threads:
            t.start()
        killer.start()
        time.sleep(_SECONDS)
        stop.set()
        for t in [*threads, killer]:
            t.join(60)
        output = served.output()

    assert sum(kills) > 10, kills
    assert not dropped, (len(dropped), dropped[:5], len(statuses))
    unexpected = sorted({s for s in statuses if s not in (200, 201, 503)})
    assert not unexpected, (unexpected, output[-3000:])
    assert statuses.count(503) > 0 and len(statuses) > 100
    with engine.connect() as conn:
        found = {
            v
            for (v,) in conn.execute(
                text("SELECT value FROM fingerprint WHERE algorithm = 'sha256'")
            )
        }
    engine.dispose()
    assert set(acknowledged) <= found
    assert "Exception in ASGI application" not in output


def test_a_session_that_fails_to_close_still_answers(client, keys, monkeypatch):
    from sqlalchemy.exc import OperationalError
    from sqlmodel import Session

    real_close = Session.close

    def broken_close(self: Session) -> None:
        real_close(self)
        raise OperationalError("ROLLBACK", {}, Exception("server closed the connection"))

    monkeypatch.setattr(Session, "close", broken_close)
    r = client.post("/v1/flags", json=flag_body(), headers=auth(keys["submitter"]))
    assert r.status_code == 201
    assert client.get("/v1/flags?limit=1", headers=auth(keys["submitter"])).status_code == 200


def test_database_errors_anywhere_are_503(client, keys, monkeypatch):
    from sqlalchemy.exc import PendingRollbackError

    from modelhash.registry.routes import lookups

    def broken(*_: object, **__: object) -> object:
        raise PendingRollbackError("connection invalidated")

    monkeypatch.setattr(lookups, "check", broken)
    r = client.post("/v1/check", json={"items": [random_fingerprint()]}, headers=auth(keys["reader"]))
    assert r.status_code == 503 and "database" in r.json()["detail"]
