"""API keys and roles: 401 without a valid key, 403 for a role that may not act."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from modelhash.registry._db import session_scope
from modelhash.registry._settings import Settings
from modelhash.registry.app import create_app
from modelhash.registry.crud.keys import CLI, Principal, create_key, hash_key, revoke_key
from modelhash.registry.errors import AuthenticationError
from modelhash.registry.models import ApiKey, AuditEvent
from tests.utils.registry import auth, flag_body

READ = [
    ("GET", "/v1/hashes/sha256/" + "0" * 64),
    ("GET", "/v1/range/sha256/00000"),
    ("GET", "/v1/changes"),
    ("GET", "/v1/bases"),
]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer mh_nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer " + "mh_" + "x" * 500},
    ],
)
def test_missing_or_unknown_keys_are_401(client, headers):
    for method, path in READ:
        r = client.request(method, path, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/v1/check", json={"items": []}, headers=headers)
    assert r.status_code == 401  # authentication comes before validation


def test_roles_nest(client, keys):
    body = flag_body()
    assert client.post("/v1/flags", json=body, headers=auth(keys["reader"])).status_code == 403
    assert client.post("/v1/flags", json=body, headers=auth(keys["submitter"])).status_code == 201
    for role in ("reader", "submitter"):
        assert client.get("/v1/keys", headers=auth(keys[role])).status_code == 403
        assert (
            client.post("/v1/keys", json={"role": "reader"}, headers=auth(keys[role])).status_code
            == 403
        )
    r = client.post("/v1/flags", json=body, headers=auth(keys["reader"]))
    assert "submitter" in r.json()["detail"]


def test_admins_manage_keys_and_only_hashes_are_stored(client, keys, engine):
    r = client.post(
        "/v1/keys", json={"role": "submitter", "name": "hotline"}, headers=auth(keys["admin"])
    )
    assert r.status_code == 201
    made = r.json()
    key = made["key"]
    assert key.startswith("mh_") and len(key) > 40 and key.startswith(made["prefix"])
    with Session(engine) as s:
        row = s.get(ApiKey, made["id"])
        assert row is not None and row.secret_hash == hash_key(key)
        stored = [str(v) for v in row.model_dump().values()]
        assert key not in stored
    listed = client.get("/v1/keys", headers=auth(keys["admin"])).json()
    assert all("key" not in k for k in listed)
    assert made["id"] in [k["id"] for k in listed]
    assert client.post("/v1/flags", json=flag_body(), headers=auth(key)).status_code == 201

    r = client.delete(f"/v1/keys/{made['id']}", headers=auth(keys["admin"]))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert client.get("/v1/bases", headers=auth(key)).status_code == 401
    assert client.delete(f"/v1/keys/{made['id']}", headers=auth(keys["admin"])).status_code == 409
    assert client.delete("/v1/keys/999999", headers=auth(keys["admin"])).status_code == 404
    assert client.delete("/v1/keys/abc", headers=auth(keys["admin"])).status_code == 422
    with Session(engine) as s:
        actions = s.exec(
            select(AuditEvent.action).where(
                AuditEvent.target_type == "api_key", AuditEvent.target_id == str(made["id"])
            ).order_by(AuditEvent.id)
        ).all()
    assert list(actions) == ["key.created", "key.revoked"]


def test_key_roles_and_names_are_validated(client, keys):
    r = client.post("/v1/keys", json={"role": "root"}, headers=auth(keys["admin"]))
    assert r.status_code == 422
    r = client.post(
        "/v1/keys", json={"role": "reader", "name": "\x00"}, headers=auth(keys["admin"])
    )
    assert r.status_code == 422 and "NUL" in r.text


def test_a_revoked_key_fails_at_once_on_another_replica(db_url, keys):
    # Two app instances on one database: two replicas (or two workers).
    one = TestClient(create_app(Settings(database_url=db_url)))
    two = TestClient(create_app(Settings(database_url=db_url)))
    made = one.post("/v1/keys", json={"role": "admin"}, headers=auth(keys["admin"])).json()
    key = made["key"]
    for replica in (one, two, one, two):
        assert replica.get("/v1/keys", headers=auth(key)).status_code == 200
    assert one.delete(f"/v1/keys/{made['id']}", headers=auth(keys["admin"])).status_code == 200
    for replica in (two, one):
        assert replica.get("/v1/keys", headers=auth(key)).status_code == 401
        r = replica.post("/v1/keys", json={"role": "admin"}, headers=auth(key))
        assert r.status_code == 401


def test_a_key_revoked_while_its_request_runs_can_mint_nothing(engine):
    # The race: a request authenticated just before its key was revoked must not
    # then act. Key actions re-check the actor under the writer lock.
    with session_scope(engine) as session:
        row, _ = create_key(session, role="admin", name="doomed", actor=CLI)
    actor = Principal(key_id=row.id, role="admin", label=f"key:{row.id}")
    with session_scope(engine) as session:
        revoke_key(session, key_id=row.id, actor=CLI)
    with session_scope(engine) as session, pytest.raises(AuthenticationError):
        create_key(session, role="admin", name="minted", actor=actor)
    with session_scope(engine) as session, pytest.raises(AuthenticationError):
        revoke_key(session, key_id=row.id, actor=actor)
    with Session(engine) as s:
        assert s.exec(select(ApiKey).where(ApiKey.name == "minted")).first() is None


def test_revocation_racing_requests_never_lets_the_key_back_in(db_url, keys):
    one = TestClient(create_app(Settings(database_url=db_url)))
    two = TestClient(create_app(Settings(database_url=db_url)))
    made = one.post("/v1/keys", json={"role": "reader"}, headers=auth(keys["admin"])).json()
    revoked = threading.Event()
    late_successes: list[int] = []

    def hammer(client: TestClient) -> None:
        for _ in range(60):
            started_after = revoked.is_set()
            r = client.get("/v1/changes?limit=1", headers=auth(made["key"]))
            if started_after and r.status_code != 401:
                late_successes.append(r.status_code)

    threads = [threading.Thread(target=hammer, args=(c,)) for c in (one, two, one, two)]
    for t in threads:
        t.start()
    assert one.delete(f"/v1/keys/{made['id']}", headers=auth(keys["admin"])).status_code == 200
    revoked.set()
    for t in threads:
        t.join()
    assert late_successes == []
    assert two.get("/v1/changes", headers=auth(made["key"])).status_code == 401
