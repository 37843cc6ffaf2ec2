"""Flags: idempotent submission, reference bases, disputes, revocation, audit, redaction."""

from __future__ import annotations

import secrets

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func
from sqlmodel import Session, select

from modelhash.registry.models import AuditEvent, Fingerprint, Flag, Opinion, WeakHash
from tests.utils.registry import auth, flag_body, random_fingerprint


def submit(client: TestClient, key: str, body: dict, status: int = 201) -> dict:
    r = client.post("/v1/flags", json=body, headers=auth(key))
    assert r.status_code == status, r.text
    return r.json()


def audit_actions(engine: Engine, flag_id: str) -> list[str]:
    with Session(engine) as s:
        return list(
            s.exec(
                select(AuditEvent.action)
                .where(AuditEvent.target_id == flag_id)
                .order_by(AuditEvent.id)
            )
        )


def test_a_new_flag_stores_everything_and_audits_it(client, keys, engine):
    fp = random_fingerprint()
    flag = submit(client, keys["submitter"], flag_body(fp, files=[{"path": "x.safetensors"}]))
    assert flag["status"] == "active" and flag["redacted"] is False
    assert flag["fingerprints"]["sha256"] == [fp["sha256"]]
    assert flag["fingerprints"]["content-blake3-v1"] == [fp["content"]]
    assert flag["fingerprints"]["crc32"] == [fp["crc32"]]
    assert flag["note"] == "seen on two sites" and flag["evidence"] == "case-1234"
    assert flag["files"] == [{"path": "x.safetensors"}]
    assert [o["kind"] for o in flag["opinions"]] == ["confirm"]
    assert audit_actions(engine, flag["id"]) == ["flag.created"]
    with Session(engine) as s:
        strong = s.exec(
            select(Fingerprint.algorithm).where(Fingerprint.flag_id == flag["id"])
        ).all()
        weak = s.exec(select(WeakHash.algorithm).where(WeakHash.flag_id == flag["id"])).all()
    assert sorted(strong) == ["blake3", "content-blake3-v1", "sha256"]
    assert sorted(weak) == ["autov1", "autov2", "autov3", "crc32"]


def test_flagging_twice_returns_the_flag_and_records_the_second_opinion(client, keys, engine):
    fp = random_fingerprint()
    first = submit(client, keys["submitter"], flag_body(fp))
    again = submit(
        client, keys["submitter2"], flag_body(fp, note="also here", category="ncii"), status=200
    )
    assert again["id"] == first["id"]
    assert again["category"] == "csam"  # the first flag stands
    assert [(o["kind"], o["reason"]) for o in again["opinions"]] == [
        ("confirm", None),
        ("confirm", "also here"),
    ]
    # The same submitter again adds no second opinion.
    submit(client, keys["submitter2"], flag_body(fp), status=200)
    with Session(engine) as s:
        assert s.exec(select(func.count()).where(Flag.id == first["id"])).one() == 1
        assert s.exec(select(func.count()).where(Opinion.flag_id == first["id"])).one() == 2
    assert audit_actions(engine, first["id"]) == [
        "flag.created",
        "flag.resubmitted",
        "flag.resubmitted",
    ]


def test_a_resave_with_the_same_content_joins_the_flag_and_adds_its_file_hash(client, keys):
    fp = random_fingerprint()
    first = submit(client, keys["submitter"], flag_body(fp))
    resaved = random_fingerprint(content=fp["content"])
    again = submit(client, keys["submitter2"], flag_body(resaved), status=200)
    assert again["id"] == first["id"]
    assert sorted(again["fingerprints"]["sha256"]) == sorted([fp["sha256"], resaved["sha256"]])
    r = client.post(
        "/v1/check", json={"items": [{"sha256": resaved["sha256"]}]}, headers=auth(keys["reader"])
    )
    assert r.json()["results"][0]["verdict"] == "match"


def test_a_weak_hash_shared_with_a_flag_does_not_join_it(client, keys):
    fp = random_fingerprint()
    first = submit(client, keys["submitter"], flag_body(fp))
    other = random_fingerprint(crc32=fp["crc32"], autov2=fp["autov2"])
    second = submit(client, keys["submitter"], flag_body(other))
    assert second["id"] != first["id"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"category": "spam"}, "category"),
        ({"severity": "extreme"}, "severity"),
        ({"fingerprint": {"crc32": "85114a0d"}}, "no strong hash"),
        ({"fingerprint": {"md5": "00" * 16}}, "unknown hash algorithm"),
        ({"fingerprint": {}}, "fingerprint"),
        ({"note": "x" * 4001}, "note"),
        ({"unexpected": 1}, "unexpected"),
        ({"note": "a\x00b"}, "NUL"),  # PostgreSQL cannot store it: found by schemathesis
        ({"model": {"name": "\x00"}}, "NUL"),
        ({"files": [{"\x00": 1}]}, "NUL"),
    ],
)
def test_invalid_flags_are_422(client, keys, change, needle):
    r = client.post("/v1/flags", json=flag_body(**change), headers=auth(keys["submitter"]))
    assert r.status_code == 422, r.text
    assert needle in r.text


def test_a_reference_base_cannot_be_flagged_unless_an_admin_forces_it(client, keys, engine):
    base_fp = random_fingerprint()
    r = client.post(
        "/v1/bases",
        json={"name": f"sd15-{secrets.token_hex(4)}", "fingerprint": base_fp},
        headers=auth(keys["admin"]),
    )
    assert r.status_code == 201, r.text
    assert set(r.json()["fingerprints"]) == {"sha256", "blake3", "content-blake3-v1"}
    body = flag_body({"sha256": base_fp["sha256"]})
    r = client.post("/v1/flags", json=body, headers=auth(keys["submitter"]))
    assert r.status_code == 409 and "reference base" in r.json()["detail"]
    r = client.post("/v1/flags", json={**body, "force": True}, headers=auth(keys["submitter"]))
    assert r.status_code == 403
    forced = submit(client, keys["admin"], {**body, "force": True})
    with Session(engine) as s:
        event = s.exec(select(AuditEvent).where(AuditEvent.target_id == forced["id"])).one()
    assert event.detail is not None and "forced_over_base" in event.detail


def test_bases_are_listed_and_names_are_unique(client, keys):
    name = f"base-{secrets.token_hex(4)}"
    body = {"name": name, "fingerprint": {"content": secrets.token_hex(32)}}
    assert client.post("/v1/bases", json=body, headers=auth(keys["admin"])).status_code == 201
    again = {"name": name, "fingerprint": {"content": secrets.token_hex(32)}}
    assert client.post("/v1/bases", json=again, headers=auth(keys["admin"])).status_code == 409
    same_hash = {"name": name + "-2", "fingerprint": body["fingerprint"]}
    assert client.post("/v1/bases", json=same_hash, headers=auth(keys["admin"])).status_code == 409
    listed = client.get("/v1/bases", headers=auth(keys["reader"])).json()
    assert name in [b["name"] for b in listed]
    assert client.post("/v1/bases", json=body, headers=auth(keys["submitter"])).status_code == 403


def test_status_lifecycle_is_immediate_audited_and_enforced(client, keys, engine):
    flag = submit(client, keys["submitter"], flag_body())
    fid = flag["id"]

    def act(action: str, key: str, status: int = 200) -> dict:
        r = client.post(
            f"/v1/flags/{fid}/{action}", json={"reason": f"{action} because"}, headers=auth(key)
        )
        assert r.status_code == status, r.text
        return r.json()

    assert act("dispute", keys["submitter2"])["status"] == "disputed"
    assert (
        client.get(f"/v1/flags/{fid}", headers=auth(keys["reader"])).json()["status"] == "disputed"
    )
    act("dispute", keys["submitter2"])  # same key again: nothing new
    act("confirm", keys["submitter"])  # the flagger confirmed already: nothing new
    act("confirm", keys["admin"])
    act("revoke", keys["submitter"], status=403)
    revoked = act("revoke", keys["admin"])
    assert revoked["status"] == "revoked" and revoked["status_reason"] == "revoke because"
    act("revoke", keys["admin"], status=409)
    act("dispute", keys["submitter"], status=409)
    act("reinstate", keys["submitter"], status=403)
    assert act("reinstate", keys["admin"])["status"] == "active"
    act("reinstate", keys["admin"], status=409)
    assert audit_actions(engine, fid) == [
        "flag.created",
        "flag.disputed",
        "flag.confirmed",
        "flag.revoked",
        "flag.reinstated",
    ]
    trail = client.get(f"/v1/flags/{fid}/audit", headers=auth(keys["admin"])).json()
    assert [e["reason"] for e in trail][1:] == [
        "dispute because",
        "confirm because",
        "revoke because",
        "reinstate because",
    ]
    # The flag's own submitter may read its trail; another submitter may not.
    assert client.get(f"/v1/flags/{fid}/audit", headers=auth(keys["submitter"])).status_code == 200
    assert client.get(f"/v1/flags/{fid}/audit", headers=auth(keys["submitter2"])).status_code == 403


def test_status_changes_need_a_reason(client, keys):
    flag = submit(client, keys["submitter"], flag_body())
    for body in ({}, {"reason": ""}):
        r = client.post(f"/v1/flags/{flag['id']}/revoke", json=body, headers=auth(keys["admin"]))
        assert r.status_code == 422


def test_unknown_flags_are_404(client, keys):
    for path in ("/v1/flags/nope", "/v1/flags/" + "x" * 64):
        assert client.get(path, headers=auth(keys["reader"])).status_code == 404
    r = client.post("/v1/flags/nope/dispute", json={"reason": "r"}, headers=auth(keys["submitter"]))
    assert r.status_code == 404


def test_readers_see_status_but_not_notes_evidence_or_opinions(client, keys):
    flag = submit(client, keys["submitter"], flag_body())
    seen = client.get(f"/v1/flags/{flag['id']}", headers=auth(keys["reader"])).json()
    assert seen["redacted"] is True and seen["status"] == "active"
    for private in ("note", "evidence", "files", "opinions", "created_by", "status_reason"):
        assert seen[private] is None
    assert client.get("/v1/flags", headers=auth(keys["reader"])).status_code == 403
    listed = client.get("/v1/flags?limit=500", headers=auth(keys["submitter"])).json()
    mine = next(f for f in listed if f["id"] == flag["id"])
    assert mine["note"] == "seen on two sites"


def test_listing_filters_by_status(client, keys):
    flag = submit(client, keys["submitter"], flag_body())
    client.post(f"/v1/flags/{flag['id']}/revoke", json={"reason": "r"}, headers=auth(keys["admin"]))
    revoked = client.get("/v1/flags?status=revoked&limit=500", headers=auth(keys["admin"])).json()
    assert flag["id"] in [f["id"] for f in revoked]
    assert all(f["status"] == "revoked" for f in revoked)
    assert client.get("/v1/flags?status=gone", headers=auth(keys["admin"])).status_code == 422
