"""Logs, metrics and limits: nothing a user looked up is ever written down."""

from __future__ import annotations

import json
import logging
import secrets

import pytest
from fastapi.testclient import TestClient

from modelhash.registry._logging import JsonFormatter
from modelhash.registry._settings import Settings, normalise_database_url
from tests.utils.registry import auth, flag_body, random_fingerprint


def test_unmatched_lookups_leave_no_hash_in_logs_or_metrics(client, keys, caplog):
    secret_hashes = [secrets.token_hex(32) for _ in range(3)]
    prefix = secrets.token_hex(3)[:5]
    with caplog.at_level(logging.DEBUG):
        client.get(f"/v1/hashes/sha256/{secret_hashes[0]}", headers=auth(keys["reader"]))
        client.post(
            "/v1/check",
            json={"items": [{"sha256": secret_hashes[1]}]},
            headers=auth(keys["reader"]),
        )
        client.get(
            f"/v1/hashes/sha256/{secret_hashes[2][:20]}", headers=auth(keys["reader"])
        )  # 400
        client.get(f"/v1/range/sha256/{prefix}", headers=auth(keys["reader"]))
    formatter = JsonFormatter()
    # The test's own HTTP client logs its URLs; only the server's records count.
    server = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    text = "\n".join(formatter.format(r) + r.getMessage() for r in server)
    access = [json.loads(formatter.format(r)) for r in server if r.name == "modelhash.access"]
    assert {a["route"] for a in access} >= {
        "/v1/hashes/{algorithm}/{value}",
        "/v1/check",
        "/v1/range/{algorithm}/{prefix}",
    }
    assert any(a.get("matched") is False for a in access)
    metrics = client.get("/metrics").text
    for needle in [*secret_hashes, secret_hashes[2][:20], prefix, keys["reader"]]:
        assert needle not in text
        assert needle not in metrics


def test_access_log_lines_are_json_with_route_status_and_latency(client, keys, caplog):
    fp = random_fingerprint()
    client.post("/v1/flags", json=flag_body(fp), headers=auth(keys["submitter"]))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="modelhash.access"):
        client.post(
            "/v1/check",
            json={"items": [{"sha256": fp["sha256"]}] * 2},
            headers=auth(keys["reader"]),
        )
    (record,) = [r for r in caplog.records if r.name == "modelhash.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["route"] == "/v1/check" and line["status"] == 200 and line["method"] == "POST"
    assert line["matched"] is True and line["items"] == 2 and line["duration_ms"] >= 0
    assert fp["sha256"] not in json.dumps(line)


def test_metrics_count_requests_by_route_template(client, keys):
    client.get("/healthz")
    client.get(f"/v1/hashes/sha256/{secrets.token_hex(32)}", headers=auth(keys["reader"]))
    client.get("/no/such/route")
    metrics = client.get("/metrics").text
    assert 'modelhash_http_requests_total{method="GET",route="/healthz",status="200"}' in metrics
    assert 'route="/v1/hashes/{algorithm}/{value}",status="200"' in metrics
    assert 'route="unmatched",status="404"' in metrics
    assert "modelhash_http_request_duration_seconds_bucket" in metrics
    assert 'modelhash_lookups_total{found="no",strength="strong"}' in metrics


def test_oversized_bodies_are_413(client, keys):
    big = {"items": [{"sha256": "00" * 32, "sketch": "A" * 300_000}]}
    r = client.post("/v1/check", json=big, headers=auth(keys["reader"]))
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks():
        yield b'{"items": ['
        for _ in range(4000):
            yield b'{"sha256": "' + b"0" * 64 + b'"},'
        yield b"]}"

    r = client.post(
        "/v1/check",
        content=chunks(),
        headers={**auth(keys["reader"]), "content-type": "application/json"},
    )
    assert r.status_code == 413


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain"])
def test_json_sent_with_another_content_type_is_415_with_the_fix(client, keys, ctype):
    # What `curl -d '{...}'` sends: a JSON body labelled as a form.
    body = b'{"items": [{"sha256": "' + b"0" * 64 + b'"}]}'
    r = client.post("/v1/check", content=body, headers={**auth(keys["reader"]), "content-type": ctype})
    assert r.status_code == 415
    assert "Content-Type: application/json" in r.json()["detail"]
    for ok in ("application/json", "application/json; charset=utf-8"):
        r = client.post("/v1/check", content=body, headers={**auth(keys["reader"]), "content-type": ok})
        assert r.status_code == 200, r.text
    # No declared type: FastAPI would not parse the body as JSON, so the same answer.
    r = client.post("/v1/check", content=body, headers=auth(keys["reader"]))
    assert r.status_code == 415


def test_unknown_routes_and_methods_are_4xx(client, keys):
    assert client.get("/v1/nothing", headers=auth(keys["reader"])).status_code == 404
    assert client.put("/v1/check", headers=auth(keys["reader"])).status_code == 405


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_database_urls_pick_psycopg3(given, expected):
    assert normalise_database_url(given) == expected
    assert Settings(database_url=given).database_url == expected


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MODELHASH_DATABASE_URL", "postgres://x@y/z")
    monkeypatch.setenv("MODELHASH_RANGE_BUCKET", "128")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://x@y/z" and settings.range_bucket == 128
    monkeypatch.delenv("MODELHASH_DATABASE_URL")
    assert Settings().database_url == "sqlite:///modelhash.db"


def test_the_signing_key_can_come_from_a_file(tmp_path, tmp_sqlite):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modelhash.registry._migrations import upgrade
    from modelhash.registry.app import create_app

    key = Ed25519PrivateKey.generate()
    path = tmp_path / "signing.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    upgrade(tmp_sqlite)
    app = create_app(Settings(database_url=tmp_sqlite, signing_key_file=path))
    with TestClient(app) as c:
        served = c.get("/v1/export/public-key").json()["public_key_pem"]
    expected = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assert served == expected

    path.write_text("not a key")
    app = create_app(Settings(database_url=tmp_sqlite, signing_key_file=path))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/export/public-key")
        assert r.status_code == 500 and "PEM" in r.json()["detail"]
