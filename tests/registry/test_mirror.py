"""The change feed and the signed export, verified with the client's own verifier."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelhash._export import (
    ExportVerificationError,
    canonical_json,
    key_id,
    verify_changes,
    verify_export,
)
from tests.utils.registry import auth, flag_body, random_fingerprint


def changes(client, key, since, limit=1000):
    r = client.get(f"/v1/changes?since={since}&limit={limit}", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def latest(client, key):
    cursor = 0
    while True:
        page = changes(client, key, cursor)
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return cursor


def test_the_feed_lists_every_change_in_order(client, keys):
    start = latest(client, keys["reader"])
    fp = random_fingerprint()
    flag = client.post("/v1/flags", json=flag_body(fp), headers=auth(keys["submitter"])).json()
    resave = random_fingerprint(content=fp["content"])
    client.post("/v1/flags", json=flag_body(resave), headers=auth(keys["submitter2"]))
    client.post(
        f"/v1/flags/{flag['id']}/dispute", json={"reason": "r"}, headers=auth(keys["submitter2"])
    )
    client.post(f"/v1/flags/{flag['id']}/revoke", json={"reason": "r"}, headers=auth(keys["admin"]))

    page = changes(client, keys["reader"], start)
    mine = [c for c in page["changes"] if c["flag_id"] == flag["id"]]
    kinds = [c["kind"] for c in mine]
    assert kinds[0] == "flag.created"
    assert mine[0]["data"]["fingerprints"]["sha256"] == [fp["sha256"]]
    assert mine[0]["data"]["status"] == "active"
    added = {
        (c["data"]["algorithm"], c["data"]["value"])
        for c in mine
        if c["kind"] == "fingerprint.added"
    }
    assert ("sha256", resave["sha256"]) in added
    statuses = [c["data"]["status"] for c in mine if c["kind"] == "flag.status"]
    assert statuses == ["disputed", "revoked"]
    cursors = [c["cursor"] for c in page["changes"]]
    assert cursors == sorted(cursors) and all(c > start for c in cursors)
    assert "note" not in json.dumps(page)  # the feed never carries notes


def test_the_feed_pages_with_a_cursor(client, keys):
    start = latest(client, keys["reader"])
    for _ in range(5):
        client.post("/v1/flags", json=flag_body(), headers=auth(keys["submitter"]))
    seen, cursor = [], start
    while True:
        page = changes(client, keys["reader"], cursor, limit=2)
        assert len(page["changes"]) <= 2
        seen += [c["cursor"] for c in page["changes"]]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    assert len(seen) >= 5 and seen == sorted(set(seen))
    last = changes(client, keys["reader"], cursor)
    signed = last.pop("signed")
    assert last == {"changes": [], "next_cursor": cursor, "has_more": False}
    assert signed["algorithm"] == "ed25519" and signed["payload"].startswith("{")


@pytest.mark.parametrize("query", ["since=-1", "since=abc", "limit=0", "limit=1001"])
def test_bad_feed_queries_are_422(client, keys, query):
    assert client.get(f"/v1/changes?{query}", headers=auth(keys["reader"])).status_code == 422


def test_the_export_verifies_and_matches_the_feed(client, keys):
    fp = random_fingerprint()
    flag = client.post("/v1/flags", json=flag_body(fp), headers=auth(keys["submitter"])).json()
    key = client.get("/v1/export/public-key").json()  # no API key needed
    assert key["algorithm"] == "ed25519" and key["key_id"] == key_id(key["public_key_pem"])
    document = client.get("/v1/export", headers=auth(keys["reader"])).json()
    payload = verify_export(document, key["public_key_pem"])
    assert document["payload"] == canonical_json(payload)
    assert payload["cursor"] == latest(client, keys["reader"])
    entry = next(f for f in payload["flags"] if f["id"] == flag["id"])
    assert entry["status"] == "active" and entry["fingerprints"]["sha256"] == [fp["sha256"]]
    assert "note" not in entry and "evidence" not in entry

    client.post(f"/v1/flags/{flag['id']}/revoke", json={"reason": "r"}, headers=auth(keys["admin"]))
    fresh = verify_export(
        client.get("/v1/export", headers=auth(keys["reader"])).json(), key["public_key_pem"]
    )
    assert fresh["cursor"] > payload["cursor"]
    assert next(f for f in fresh["flags"] if f["id"] == flag["id"])["status"] == "revoked"
    assert client.get("/v1/export").status_code == 401


def test_tampered_or_foreign_exports_are_refused(client, keys):
    pem = client.get("/v1/export/public-key").json()["public_key_pem"]
    document = client.get("/v1/export", headers=auth(keys["reader"])).json()
    verify_export(json.dumps(document), pem)

    tampered = {**document, "payload": document["payload"].replace('"active"', '"revoked"', 1)}
    if tampered["payload"] == document["payload"]:
        tampered["payload"] = document["payload"].replace("}", " }", 1)
    with pytest.raises(ExportVerificationError, match="signature"):
        verify_export(tampered, pem)

    other = Ed25519PrivateKey.generate()
    other_pem = other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ExportVerificationError, match="signed by key"):
        verify_export(document, other_pem)
    forged = {
        **document,
        "key_id": key_id(other_pem),
        "signature": base64.b64encode(other.sign(b"something else")).decode(),
    }
    with pytest.raises(ExportVerificationError, match="signature"):
        verify_export(forged, other_pem)
    for broken in (
        {**document, "algorithm": "rsa"},
        {**document, "signature": "!!"},
        "not json",
        [],
    ):
        with pytest.raises(ExportVerificationError):
            verify_export(broken, pem)  # type: ignore[arg-type]


def test_feed_pages_are_signed_with_the_export_key(client, keys):
    start = latest(client, keys["reader"])
    client.post("/v1/flags", json=flag_body(), headers=auth(keys["submitter"]))
    pem = client.get("/v1/export/public-key").json()["public_key_pem"]
    page = changes(client, keys["reader"], start)
    payload = verify_changes(page["signed"], pem)
    assert payload["since"] == start and payload["next_cursor"] == page["next_cursor"]
    assert [c["cursor"] for c in payload["changes"]] == [c["cursor"] for c in page["changes"]]
    assert payload["generated_at"]
    forged = json.loads(page["signed"]["payload"])
    forged["changes"][0]["data"]["status"] = "revoked"
    with pytest.raises(ExportVerificationError):
        verify_changes({**page["signed"], "payload": json.dumps(forged)}, pem)
