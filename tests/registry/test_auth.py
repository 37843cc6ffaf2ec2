"""API keys and roles: 401 without a valid key, 403 for a role that may not act."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from modelhash.registry.crud.keys import hash_key
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


def test_the_key_cache_expires_and_can_be_off(monkeypatch):
    import modelhash.registry._keycache as keycache
    from modelhash.registry._keycache import KeyCache
    from modelhash.registry.crud.keys import Principal

    now = [1000.0]
    monkeypatch.setattr(keycache.time, "monotonic", lambda: now[0])
    who = Principal(key_id=1, role="reader", label="key:1")
    cache = KeyCache(ttl=5)
    cache.put("mh_a", who)
    assert cache.get("mh_a") == who and cache.get("mh_b") is None
    now[0] += 6
    assert cache.get("mh_a") is None
    cache.put("mh_a", who)
    cache.clear()
    assert cache.get("mh_a") is None
    off = KeyCache(ttl=0)
    off.put("mh_a", who)
    assert off.get("mh_a") is None
