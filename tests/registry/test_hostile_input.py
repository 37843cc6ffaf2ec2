"""Hostile bodies: deep JSON, lone surrogates, and answers that cannot be rendered.

Each of these once stored a flag and then answered 500 for it forever, or made the
422 handler itself fail. Now every one is a 422 with a body that renders, and
nothing is stored.
"""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session, func, select

from modelhash.registry._body import MAX_DEPTH
from modelhash.registry.crud.flags import create_flag
from modelhash.registry.crud.keys import CLI
from modelhash.registry.errors import UnprocessableError
from modelhash.registry.models import Fingerprint, Flag
from modelhash.wire import FlagCreate
from tests.utils.registry import auth, flag_body, random_fingerprint

SURROGATE = "\\ud800"  # as it appears in the JSON text


def nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


def nested_text(depth: int) -> str:
    return '{"a":' * depth + '"leaf"' + "}" * depth


def post_raw(client, path: str, text: str, key: str):
    return client.post(
        path,
        content=text.encode("utf-8"),
        headers={**auth(key), "Content-Type": "application/json"},
    )


def stored(engine, sha: str) -> int:
    with Session(engine) as s:
        return s.exec(
            select(func.count()).select_from(Fingerprint).where(Fingerprint.value == sha)
        ).one()


@pytest.mark.parametrize("field", ["model", "files"])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 256, 5000])
def test_deep_json_is_refused_and_never_stored(client, keys, engine, field, depth):
    fp = random_fingerprint()
    value = nested_text(depth) if field == "model" else f"[{nested_text(depth)}]"
    body = json.dumps(flag_body(fp, **{field: "HOLE"})).replace('"HOLE"', value)
    r = post_raw(client, "/v1/flags", body, keys["submitter"])
    assert r.status_code == 422, r.text
    assert "nested deeper" in r.json()["detail"]
    assert stored(engine, fp["sha256"]) == 0
    listing = client.get("/v1/flags?limit=500", headers=auth(keys["submitter"]))
    assert listing.status_code == 200


def test_json_just_within_the_depth_is_stored_and_answered(client, keys):
    fp = random_fingerprint()
    # The body is level 1 and the model level 2, so the model may nest MAX_DEPTH - 1.
    body = flag_body(fp, model=nested(MAX_DEPTH - 2))
    r = client.post("/v1/flags", json=body, headers=auth(keys["submitter"]))
    assert r.status_code == 201, r.text
    again = client.get(f"/v1/flags/{r.json()['id']}", headers=auth(keys["submitter"]))
    assert again.status_code == 200 and again.json()["model"] == body["model"]


@pytest.mark.parametrize(
    ("path", "template", "role"),
    [
        ("/v1/flags", '{{"category":"csam","note":"{s}","fingerprint":{{"sha256":"{h}"}}}}', "submitter"),
        ("/v1/flags", '{{"category":"csam","evidence":"{s}","fingerprint":{{"sha256":"{h}"}}}}', "submitter"),
        ("/v1/flags", '{{"category":"csam","model":{{"k":"{s}"}},"fingerprint":{{"sha256":"{h}"}}}}', "submitter"),
        ("/v1/flags", '{{"category":"csam","files":[{{"{s}":1}}],"fingerprint":{{"sha256":"{h}"}}}}', "submitter"),
        ("/v1/keys", '{{"role":"reader","name":"{s}"}}', "admin"),
        ("/v1/bases", '{{"name":"{s}","fingerprint":{{"sha256":"{h}"}}}}', "admin"),
        ("/v1/check", '{{"items":[{{"sha256":"x{s}"}}]}}', "reader"),
        ("/v1/check", '{{"items":[{{"sha256":"{h}","{s}":"1"}}]}}', "reader"),
    ],
)
def test_lone_surrogates_are_422_with_a_body_that_renders(client, keys, path, template, role):
    h = random_fingerprint()["sha256"]
    r = post_raw(client, path, template.format(s=SURROGATE, h=h), keys[role])
    assert r.status_code == 422, r.text
    assert "Unicode" in r.json()["detail"]


def test_flag_actions_refuse_surrogates(client, keys):
    flag = client.post("/v1/flags", json=flag_body(), headers=auth(keys["submitter"])).json()
    r = post_raw(
        client, f"/v1/flags/{flag['id']}/dispute", f'{{"reason":"{SURROGATE}"}}', keys["submitter"]
    )
    assert r.status_code == 422 and "Unicode" in r.json()["detail"]
    assert client.get(f"/v1/flags/{flag['id']}", headers=auth(keys["admin"])).json()["status"] == (
        "active"
    )


def test_a_validation_error_echoing_bad_text_still_renders(client, keys):
    # Valid Unicode that fails validation is echoed, escaped and shortened.
    r = client.post(
        "/v1/check", json={"items": [{"sha256": "x" * 150 + "\u00e9"}]}, headers=auth(keys["reader"])
    )
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"][:3] == ["body", "items", 0] and len(error["input"]) <= 123


def test_the_error_body_is_always_renderable():
    from modelhash.registry._handlers import safe_errors

    errors = [
        {"type": "x", "loc": ("body", "\ud800", 3), "msg": "bad \udfff", "input": "\ud800" * 500},
        {"type": "y", "loc": ("body",), "msg": "m", "input": {"deep": [1, 2]}, "ctx": {"e": object()}},
    ]
    out = safe_errors(errors)
    json.dumps(out).encode("utf-8")
    json.dumps(out, ensure_ascii=False).encode("utf-8")
    assert "input" not in out[1]


def test_nothing_is_committed_when_the_answer_cannot_be_built(engine):
    fp = random_fingerprint()
    data = FlagCreate.model_validate(flag_body(fp))

    def refuse(_: Flag) -> None:
        raise UnprocessableError("cannot render")

    with Session(engine) as session, pytest.raises(UnprocessableError):
        create_flag(session, data=data, actor=CLI, before_commit=refuse)
    assert stored(engine, fp["sha256"]) == 0


def test_a_flag_stored_before_the_guard_is_still_listed(client, keys, engine):
    # Rows written by an older version, straight into the database.
    flag = client.post("/v1/flags", json=flag_body(), headers=auth(keys["submitter"])).json()
    deep = json.loads(nested_text(300))
    with Session(engine) as s:
        row = s.get(Flag, flag["id"])
        row.model = deep
        row.files = [{"name": "\ud800"}]
        s.add(row)
        s.commit()
    one = client.get(f"/v1/flags/{flag['id']}", headers=auth(keys["submitter"]))
    assert one.status_code == 200 and one.json()["model"] is None and one.json()["files"] is None
    listing = client.get("/v1/flags?limit=500", headers=auth(keys["submitter"]))
    assert listing.status_code == 200
